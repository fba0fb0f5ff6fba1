//! Batch prediction: replay recorded events through the stream's feature code and score
//! every scored event with the registry's model, in batches.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::{EventInput, OfflineError, OutputError, Progress, Rejections, Replay, Row};
use crate::codec::TypeMask;
use crate::features::FeatureSet;
use crate::model::Model;

const BATCH: usize = 1024;

#[derive(Debug)]
pub struct ScoreSummary {
    pub events: u64,
    pub predictions: u64,
    pub events_per_second: f64,
    pub rejections: Rejections,
}

/// Scores `input` with `model` and writes predictions to `out` (`.jsonl` or `.parquet`).
pub fn score(
    features: &FeatureSet,
    scored: TypeMask,
    model: &Model,
    input: &EventInput,
    out: &Path,
    mut rejections: Rejections,
) -> Result<ScoreSummary, OfflineError> {
    let mut sink = PredictionFile::create(out)?;
    let mut replay = Replay::new(features, scored, false);
    let mut pending: Vec<Row> = Vec::with_capacity(BATCH);
    let (mut rows, mut input_buf, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    let mut flush =
        |pending: &mut Vec<Row>, sink: &mut PredictionFile| -> Result<u64, OfflineError> {
            rows.clear();
            for row in pending.iter() {
                rows.extend_from_slice(&row.features);
            }
            scores.clear();
            model.score(&rows, features.len(), &mut input_buf, &mut scores)?;
            for (row, score) in pending.iter().zip(&scores) {
                sink.write(row, model, *score)?;
            }
            let n = pending.len() as u64;
            pending.clear();
            Ok(n)
        };
    let mut predictions = 0u64;
    let mut failure: Option<OfflineError> = None;
    let mut progress = Progress::new("score");
    let events = replay.run(input, &mut rejections, Some(&mut progress), |row| {
        pending.push(row);
        if pending.len() >= BATCH && failure.is_none() {
            match flush(&mut pending, &mut sink) {
                Ok(n) => predictions += n,
                Err(e) => failure = Some(e),
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    predictions += flush(&mut pending, &mut sink)?;
    sink.finish()?;
    Ok(ScoreSummary {
        events,
        predictions,
        events_per_second: progress.done(events),
        rejections,
    })
}

// One per run, so the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum PredictionFile {
    Jsonl {
        out: BufWriter<File>,
        path: std::path::PathBuf,
    },
    Parquet {
        writer: Option<SerializedFileWriter<File>>,
        path: std::path::PathBuf,
        columns: Columns,
    },
}

#[derive(Default)]
struct Columns {
    event_id: Vec<ByteArray>,
    user_id: Vec<ByteArray>,
    ts: Vec<i64>,
    version: Vec<i32>,
    score: Vec<f64>,
    label: Vec<i32>,
}

impl PredictionFile {
    fn create(path: &Path) -> Result<PredictionFile, OutputError> {
        let io = |source| OutputError::Io {
            path: path.to_owned(),
            source,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") => Ok(PredictionFile::Jsonl {
                out: BufWriter::new(File::create(path).map_err(io)?),
                path: path.to_owned(),
            }),
            Some("parquet") => {
                let bad = |e: parquet::errors::ParquetError| OutputError::Parquet {
                    path: path.to_owned(),
                    message: e.to_string(),
                };
                let schema = "message predictions {\n  required binary event_id (STRING);\n  required binary user_id (STRING);\n  \
                              required int64 ts;\n  required int32 version;\n  required double score;\n  required int32 label;\n}";
                let schema = Arc::new(parse_message_type(schema).map_err(bad)?);
                let props = Arc::new(
                    WriterProperties::builder()
                        .set_compression(Compression::SNAPPY)
                        .build(),
                );
                let writer =
                    SerializedFileWriter::new(File::create(path).map_err(io)?, schema, props)
                        .map_err(bad)?;
                Ok(PredictionFile::Parquet {
                    writer: Some(writer),
                    path: path.to_owned(),
                    columns: Columns::default(),
                })
            }
            _ => Err(OutputError::Format {
                path: path.to_owned(),
            }),
        }
    }

    fn write(&mut self, row: &Row, model: &Model, score: f64) -> Result<(), OutputError> {
        match self {
            PredictionFile::Jsonl { out, path } => {
                let line = serde_json::json!({
                    "event_id": row.event_id, "user_id": row.user_id, "ts": row.ts,
                    "model": model.meta.name, "version": model.meta.version, "variant": "batch",
                    "score": score, "label": row.label.map(i32::from),
                });
                writeln!(out, "{line}").map_err(|source| OutputError::Io {
                    path: path.clone(),
                    source,
                })
            }
            PredictionFile::Parquet { columns, .. } => {
                columns
                    .event_id
                    .push(ByteArray::from(row.event_id.as_str()));
                columns.user_id.push(ByteArray::from(row.user_id.as_str()));
                columns.ts.push(row.ts);
                columns.version.push(model.meta.version as i32);
                columns.score.push(score);
                columns.label.push(row.label.map_or(0, i32::from));
                if columns.ts.len() >= 128 * 1024 {
                    self.flush_group()?;
                }
                Ok(())
            }
        }
    }

    fn flush_group(&mut self) -> Result<(), OutputError> {
        let PredictionFile::Parquet {
            writer: Some(writer),
            path,
            columns,
        } = self
        else {
            return Ok(());
        };
        if columns.ts.is_empty() {
            return Ok(());
        }
        let bad = |e: parquet::errors::ParquetError| OutputError::Parquet {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut group = writer.next_row_group().map_err(bad)?;
        let mut index = 0;
        while let Some(mut column) = group.next_column().map_err(bad)? {
            match index {
                0 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&columns.event_id, None, None),
                1 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&columns.user_id, None, None),
                2 => column
                    .typed::<Int64Type>()
                    .write_batch(&columns.ts, None, None),
                3 => column
                    .typed::<Int32Type>()
                    .write_batch(&columns.version, None, None),
                4 => column
                    .typed::<DoubleType>()
                    .write_batch(&columns.score, None, None),
                _ => column
                    .typed::<Int32Type>()
                    .write_batch(&columns.label, None, None),
            }
            .map_err(bad)?;
            column.close().map_err(bad)?;
            index += 1;
        }
        group.close().map_err(bad)?;
        *columns = Columns::default();
        Ok(())
    }

    fn finish(mut self) -> Result<(), OutputError> {
        self.flush_group()?;
        match self {
            PredictionFile::Jsonl { mut out, path } => out
                .flush()
                .map_err(|source| OutputError::Io { path, source }),
            PredictionFile::Parquet { writer, path, .. } => match writer {
                Some(w) => w.close().map(|_| ()).map_err(|e| OutputError::Parquet {
                    path,
                    message: e.to_string(),
                }),
                None => Ok(()),
            },
        }
    }
}
