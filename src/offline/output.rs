//! Training-data writers: CSV and Parquet, chosen by the output file's extension.
//! Columns: `event_id, user_id, ts`, the features in topology order, then `label`
//! (empty / null for events that are not scored).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::Row;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write Parquet {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: unsupported output format (expected .csv or .parquet)")]
    Format { path: PathBuf },
}

pub trait RowWriter {
    fn write(&mut self, row: &Row) -> Result<(), OutputError>;
    fn finish(self: Box<Self>) -> Result<(), OutputError>;
}

/// A writer for `path`, by extension.
pub fn create(path: &Path, features: &[String]) -> Result<Box<dyn RowWriter>, OutputError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Box::new(CsvWriter::create(path, features)?)),
        Some("parquet") => Ok(Box::new(ParquetWriter::create(path, features)?)),
        _ => Err(OutputError::Format {
            path: path.to_owned(),
        }),
    }
}

struct CsvWriter {
    out: BufWriter<File>,
    path: PathBuf,
    line: String,
}

impl CsvWriter {
    fn create(path: &Path, features: &[String]) -> Result<CsvWriter, OutputError> {
        let io = |source| OutputError::Io {
            path: path.to_owned(),
            source,
        };
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        writeln!(out, "event_id,user_id,ts,{},label", features.join(",")).map_err(io)?;
        Ok(CsvWriter {
            out,
            path: path.to_owned(),
            line: String::with_capacity(256),
        })
    }
}

fn push_csv_field(line: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        line.push('"');
        line.push_str(&field.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(field);
    }
}

impl RowWriter for CsvWriter {
    fn write(&mut self, row: &Row) -> Result<(), OutputError> {
        use std::fmt::Write as _;
        let line = &mut self.line;
        line.clear();
        push_csv_field(line, &row.event_id);
        line.push(',');
        push_csv_field(line, &row.user_id);
        let _ = write!(line, ",{}", row.ts);
        for value in row.features.iter() {
            let _ = write!(line, ",{value}");
        }
        match row.label {
            Some(label) => line.push_str(if label { ",1\n" } else { ",0\n" }),
            None => line.push_str(",\n"),
        }
        self.out
            .write_all(line.as_bytes())
            .map_err(|source| OutputError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        self.out.flush().map_err(|source| OutputError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Rows per Parquet row group.
const ROW_GROUP: usize = 128 * 1024;

struct ParquetWriter {
    writer: SerializedFileWriter<File>,
    path: PathBuf,
    event_ids: Vec<ByteArray>,
    user_ids: Vec<ByteArray>,
    ts: Vec<i64>,
    features: Vec<Vec<f64>>,
    labels: Vec<i32>,
    label_levels: Vec<i16>,
}

impl ParquetWriter {
    fn create(path: &Path, features: &[String]) -> Result<ParquetWriter, OutputError> {
        let bad = |e: parquet::errors::ParquetError| OutputError::Parquet {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let columns: String = features
            .iter()
            .map(|f| format!("  required double {f};\n"))
            .collect();
        let schema = format!(
            "message backfill {{\n  required binary event_id (STRING);\n  required binary user_id (STRING);\n  \
             required int64 ts;\n{columns}  optional int32 label;\n}}"
        );
        let schema = Arc::new(parse_message_type(&schema).map_err(bad)?);
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let file = File::create(path).map_err(|source| OutputError::Io {
            path: path.to_owned(),
            source,
        })?;
        let writer = SerializedFileWriter::new(file, schema, props).map_err(bad)?;
        Ok(ParquetWriter {
            writer,
            path: path.to_owned(),
            event_ids: Vec::new(),
            user_ids: Vec::new(),
            ts: Vec::new(),
            features: vec![Vec::new(); features.len()],
            labels: Vec::new(),
            label_levels: Vec::new(),
        })
    }

    fn flush_row_group(&mut self) -> Result<(), OutputError> {
        if self.ts.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let bad = |e: parquet::errors::ParquetError| OutputError::Parquet {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut group = self.writer.next_row_group().map_err(bad)?;
        let mut index = 0;
        while let Some(mut column) = group.next_column().map_err(bad)? {
            let n_features = self.features.len();
            match index {
                0 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&self.event_ids, None, None),
                1 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&self.user_ids, None, None),
                2 => column
                    .typed::<Int64Type>()
                    .write_batch(&self.ts, None, None),
                i if i < 3 + n_features => {
                    column
                        .typed::<DoubleType>()
                        .write_batch(&self.features[i - 3], None, None)
                }
                _ => column.typed::<Int32Type>().write_batch(
                    &self.labels,
                    Some(&self.label_levels),
                    None,
                ),
            }
            .map_err(bad)?;
            column.close().map_err(bad)?;
            index += 1;
        }
        group.close().map_err(bad)?;
        self.event_ids.clear();
        self.user_ids.clear();
        self.ts.clear();
        self.features.iter_mut().for_each(Vec::clear);
        self.labels.clear();
        self.label_levels.clear();
        Ok(())
    }
}

impl RowWriter for ParquetWriter {
    fn write(&mut self, row: &Row) -> Result<(), OutputError> {
        self.event_ids.push(ByteArray::from(row.event_id.as_str()));
        self.user_ids.push(ByteArray::from(row.user_id.as_str()));
        self.ts.push(row.ts);
        for (column, value) in self.features.iter_mut().zip(row.features.iter()) {
            column.push(*value);
        }
        match row.label {
            Some(label) => {
                self.labels.push(i32::from(label));
                self.label_levels.push(1);
            }
            None => self.label_levels.push(0),
        }
        if self.ts.len() >= ROW_GROUP {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        self.flush_row_group()?;
        let path = self.path.clone();
        self.writer
            .close()
            .map(|_| ())
            .map_err(|e| OutputError::Parquet {
                path,
                message: e.to_string(),
            })
    }
}
