//! Where offline events come from: a JSON-lines file, a Parquet file, or a Kafka topic
//! read from the beginning up to its end at start. Each record arrives with a location
//! (`events.jsonl:42`, `topic user-events partition 3 offset 17`) for error messages.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::codec::{decode_event, Codec, Event, EventType, Reason, Rejection};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("kafka topic {topic}: {message}")]
    Kafka { topic: String, message: String },
}

/// Where one record came from.
#[derive(Debug, Clone)]
pub enum Location {
    /// `bytes`: how far into the file the record ends, for progress.
    Line {
        line: u64,
        bytes: u64,
    },
    Row {
        row: u64,
    },
    Offset {
        partition: i32,
        offset: i64,
    },
}

impl Location {
    /// Fraction of a file of `total` bytes read so far, when known.
    pub fn fraction(&self, total: Option<u64>) -> Option<f64> {
        match (self, total) {
            (Location::Line { bytes, .. }, Some(total)) if total > 0 => {
                Some(*bytes as f64 / total as f64)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line { line, .. } => write!(f, "line {line}"),
            Location::Row { row } => write!(f, "row {row}"),
            Location::Offset { partition, offset } => {
                write!(f, "partition {partition} offset {offset}")
            }
        }
    }
}

/// An offline event source.
#[derive(Debug, Clone)]
pub enum EventInput {
    File(PathBuf),
    Topic {
        brokers: String,
        topic: String,
        codec: Codec,
    },
}

impl EventInput {
    pub fn describe(&self) -> String {
        match self {
            EventInput::File(path) => path.display().to_string(),
            EventInput::Topic { topic, .. } => format!("topic {topic}"),
        }
    }

    /// Size hint for progress: bytes for files, records for topics.
    pub fn size_hint(&self) -> Option<u64> {
        match self {
            EventInput::File(path) => std::fs::metadata(path).ok().map(|m| m.len()),
            EventInput::Topic { .. } => None,
        }
    }

    /// Calls `each` for every record in arrival order, decoded and validated.
    /// `now_ms` bounds future timestamps as in the stream.
    pub fn for_each(
        &self,
        now_ms: i64,
        mut each: impl FnMut(Result<Event, Rejection>, Location),
    ) -> Result<(), InputError> {
        match self {
            EventInput::File(path) if is_parquet(path) => read_parquet(path, now_ms, &mut each),
            EventInput::File(path) => {
                let io = |source| InputError::Io {
                    path: path.clone(),
                    source,
                };
                let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
                let mut line = Vec::with_capacity(512);
                let (mut number, mut bytes) = (0u64, 0u64);
                loop {
                    line.clear();
                    let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                    if n == 0 {
                        return Ok(());
                    }
                    number += 1;
                    bytes += n as u64;
                    let text = trim_line(&line);
                    if text.is_empty() {
                        continue;
                    }
                    each(
                        decode_event(Codec::Json, text, now_ms),
                        Location::Line {
                            line: number,
                            bytes,
                        },
                    );
                }
            }
            EventInput::Topic {
                brokers,
                topic,
                codec,
            } => read_topic(brokers, topic, *codec, now_ms, &mut each),
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r' | b' ') {
        end -= 1;
    }
    &line[..end]
}

pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

fn read_parquet(
    path: &Path,
    now_ms: i64,
    each: &mut impl FnMut(Result<Event, Rejection>, Location),
) -> Result<(), InputError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let bad = |message: String| InputError::Parquet {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(|source| InputError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        let mut fields: [Option<&Field>; 7] = [None; 7];
        for (name, value) in row.get_column_iter() {
            let slot = match name.as_str() {
                "event_id" => 0,
                "user_id" => 1,
                "ts" => 2,
                "type" => 3,
                "item_id" => 4,
                "category" => 5,
                "amount" => 6,
                _ => continue,
            };
            fields[slot] = Some(value);
        }
        each(
            event_from_fields(&fields).and_then(|e| crate::codec::validate(e, now_ms)),
            Location::Row { row: i as u64 },
        );
    }
    Ok(())
}

fn event_from_fields(fields: &[Option<&parquet::record::Field>; 7]) -> Result<Event, Rejection> {
    use parquet::record::Field;
    const NAMES: [&str; 7] = [
        "event_id", "user_id", "ts", "type", "item_id", "category", "amount",
    ];
    let text = |i: usize| match fields[i] {
        Some(Field::Str(s)) => Ok(s.clone()),
        None | Some(Field::Null) => Err(Rejection::new(
            Reason::MissingField,
            format!("column \"{}\" is missing", NAMES[i]),
        )),
        Some(other) => Err(Rejection::new(
            Reason::WrongType,
            format!("column \"{}\": expected string, got {other}", NAMES[i]),
        )),
    };
    let ts = match fields[2] {
        Some(Field::Long(v)) => *v,
        Some(Field::Int(v)) => i64::from(*v),
        Some(Field::TimestampMillis(v)) => *v,
        None | Some(Field::Null) => {
            return Err(Rejection::new(
                Reason::MissingField,
                "column \"ts\" is missing",
            ))
        }
        Some(other) => {
            return Err(Rejection::new(
                Reason::WrongType,
                format!("column \"ts\": expected integer, got {other}"),
            ))
        }
    };
    let kind_name = text(3)?;
    let kind = EventType::parse(&kind_name).ok_or_else(|| {
        Rejection::new(
            Reason::UnknownType,
            format!("column \"type\": unknown event type \"{kind_name}\""),
        )
    })?;
    let amount = match fields[6] {
        None | Some(Field::Null) => 0.0,
        Some(Field::Double(v)) => *v,
        Some(Field::Float(v)) => f64::from(*v),
        Some(Field::Long(v)) => *v as f64,
        Some(Field::Int(v)) => f64::from(*v),
        Some(other) => {
            return Err(Rejection::new(
                Reason::WrongType,
                format!("column \"amount\": expected number, got {other}"),
            ))
        }
    };
    Ok(Event {
        event_id: text(0)?,
        user_id: text(1)?,
        ts,
        kind,
        item_id: text(4)?,
        category: text(5)?,
        amount,
    })
}

/// Reads every partition from the beginning to the high watermark seen at start,
/// decoding each record as an event.
fn read_topic(
    brokers: &str,
    topic: &str,
    codec: Codec,
    now_ms: i64,
    each: &mut impl FnMut(Result<Event, Rejection>, Location),
) -> Result<(), InputError> {
    read_topic_records(brokers, topic, |key, payload, location| {
        let decoded = if key.is_empty() {
            Err(Rejection::new(
                Reason::EmptyKey,
                "record has no key (expected the user_id)",
            ))
        } else {
            decode_event(codec, payload, now_ms)
        };
        each(decoded, location);
    })
}

/// Calls `each(key, payload, location)` for every record of every partition, from the
/// beginning to the high watermark seen at start. Order is kept within a partition,
/// which is per user for keyed topics.
pub fn read_topic_records(
    brokers: &str,
    topic: &str,
    mut each: impl FnMut(&[u8], &[u8], Location),
) -> Result<(), InputError> {
    let kafka = |e: rdkafka::error::KafkaError| InputError::Kafka {
        topic: topic.to_owned(),
        message: e.to_string(),
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "augur-offline")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(kafka)?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(InputError::Kafka {
            topic: topic.to_owned(),
            message: "topic not found or has no partitions".into(),
        });
    }
    // Assign every non-empty partition at its low watermark and read until each has
    // reached the high watermark it had at start.
    let mut remaining: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(kafka)?;
        if high > low {
            tpl.add_partition_offset(topic, partition, Offset::Offset(low))
                .map_err(kafka)?;
            remaining.insert(partition, high);
        }
    }
    consumer.assign(&tpl).map_err(kafka)?;
    // Some brokers (tansu 0.6) report a high watermark short of the last batch, so after
    // every partition has reached it, reading goes on until the topic stays quiet.
    let quiet = Duration::from_secs(2);
    loop {
        let wait = if remaining.is_empty() { quiet } else { timeout };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let location = Location::Offset {
                    partition: m.partition(),
                    offset: m.offset(),
                };
                each(
                    m.key().unwrap_or_default(),
                    m.payload().unwrap_or_default(),
                    location,
                );
                if remaining
                    .get(&m.partition())
                    .is_some_and(|&high| m.offset() + 1 >= high)
                {
                    remaining.remove(&m.partition());
                }
            }
            Some(Err(e)) => return Err(kafka(e)),
            None if remaining.is_empty() => break,
            None => {
                return Err(InputError::Kafka {
                    topic: topic.to_owned(),
                    message: format!(
                    "no record within {timeout:?}; partitions not read to the end: {remaining:?}"
                ),
                })
            }
        }
    }
    Ok(())
}
