//! The changelog topic, `<app>-changelog`: partitioned like the input, keyed by user.
//! Every checkpoint writes each changed user's encoded state, then a marker record (an
//! empty key) whose `augur.offset` header is the input offset the states are valid at.
//! All of it is acknowledged before the checkpoint reaches sled and the offset is
//! committed.
//!
//! A worker assigned a partition whose local state is missing or older than the
//! changelog's last checkpoint restores it from there: it
//! reads the partition from the beginning, keeps the last state per user (the topic
//! need not be compacted; tansu does not compact), and applies a checkpoint's users
//! only when its marker follows them, so a checkpoint cut short by a crash is ignored.
//!
//! With `delivery: exactly_once` the records and their marker are in one transaction
//! and the restore reads with `isolation.level=read_committed`: an aborted or unfinished
//! checkpoint is never read at all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The header carrying the input offset on marker records.
pub const OFFSET_HEADER: &str = "augur.offset";
/// The header of a fence record (empty key, empty value): written by a worker about to
/// restore a partition, to learn where the partition ends. Restores skip it.
pub const FENCE_HEADER: &str = "augur.fence";

/// Bytes a restore's consumer asks for per fetch (librdkafka's default is 1 MiB per
/// partition; 100k users' states are about 20 MiB).
const RESTORE_FETCH_BYTES: usize = 32 << 20;

/// Where a restore's read of the changelog stops.
#[derive(Debug, Clone, Copy)]
pub enum ReadTo {
    /// Below this offset: a fence the reader appended (see
    /// [`OutputProducer::fence`](crate::sink::OutputProducer::fence)), so every record
    /// acknowledged before it is read. Exact, whatever the broker's high watermark.
    Fence(i64),
    /// Past the high watermark, then until nothing new came for this long. tansu 0.6
    /// reports a high watermark short of the last batch, so stopping at the watermark
    /// alone could miss the last checkpoint.
    Quiet(Duration),
}

/// A partition's state as of its last complete checkpoint in the changelog.
#[derive(Debug, Default)]
pub struct Restored {
    /// Encoded user states (last one per user wins).
    pub users: HashMap<String, Vec<u8>>,
    /// The next input offset; None when the changelog holds no complete checkpoint.
    pub next_offset: Option<i64>,
    /// Records read.
    pub records: u64,
}

/// Reads partition `partition` of `topic` to its end, as `end` says where that is.
pub fn restore(
    mut config: ClientConfig,
    topic: &str,
    partition: i32,
    end: ReadTo,
) -> Result<Restored, rdkafka::error::KafkaError> {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    // The whole partition is read at once: large fetches mean fewer round trips.
    for key in ["max.partition.fetch.bytes", "fetch.max.bytes"] {
        if config.get(key).is_none() {
            config.set(key, RESTORE_FETCH_BYTES.to_string());
        }
    }
    let consumer: BaseConsumer = config.create()?;
    // Also connects to the partition's leader before the assignment; without it the
    // first records arrived half a second later on tansu.
    let (_, watermark) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let (high, quiet) = match end {
        ReadTo::Fence(offset) => (offset, Duration::ZERO),
        ReadTo::Quiet(quiet) => (watermark, quiet),
    };
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&list)?;
    let mut restored = Restored::default();
    let mut pending: HashMap<String, Vec<u8>> = HashMap::new();
    let mut last_offset = -1i64;
    let mut last_news = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                last_news = Instant::now();
                last_offset = m.offset();
                restored.records += 1;
                let key = m.key().unwrap_or_default();
                if key.is_empty() {
                    let offset = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == OFFSET_HEADER)
                            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                    });
                    if let Some(offset) = offset {
                        restored.users.extend(pending.drain());
                        restored.next_offset = Some(offset);
                    }
                } else {
                    pending.insert(
                        String::from_utf8_lossy(key).into_owned(),
                        m.payload().unwrap_or_default().to_vec(),
                    );
                }
                if matches!(end, ReadTo::Fence(_)) && last_offset + 1 >= high {
                    break;
                }
            }
            Some(Err(e)) => return Err(e),
            None => {
                // Under read_committed (delivery: exactly_once) the last offsets are
                // transaction markers, never delivered: the consumer's position passes
                // them, the last record's offset does not.
                let position = consumer
                    .position()
                    .ok()
                    .and_then(|list| {
                        list.find_partition(topic, partition)
                            .and_then(|e| match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            })
                    })
                    .unwrap_or(-1);
                let reached = last_offset + 1 >= high || position >= high;
                if reached && last_news.elapsed() >= quiet {
                    break;
                }
                if last_news.elapsed() >= Duration::from_secs(30) {
                    tracing::warn!(
                        topic,
                        partition,
                        high,
                        last_offset,
                        "changelog read stalled; restoring what was read"
                    );
                    break;
                }
            }
        }
    }
    if !pending.is_empty() {
        tracing::info!(
            topic,
            partition,
            users = pending.len(),
            "ignoring the changelog's last checkpoint, which has no marker (cut short)"
        );
    }
    Ok(restored)
}
