//! Models: `model.json` metadata, the directory registry, and batched scoring with tract.
//! Loading is slow and happens off the hot path; a [`ScoringSession`] then scores
//! batches with no further allocation beyond its reused buffers.

pub mod registry;
pub mod tree;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tract_hir::infer::Factoid;
use tract_onnx::prelude::*;

pub use registry::{DirRegistry, ModelRegistry, Stage};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid model.json: {source}")]
    Meta {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cannot load ONNX model in tract: {message}")]
    Load { path: PathBuf, message: String },
    #[error("model {name} v{version}: {message}")]
    Mismatch {
        name: String,
        version: u32,
        message: String,
    },
    #[error("model {name} v{version}: scoring failed: {message}")]
    Score {
        name: String,
        version: u32,
        message: String,
    },
    #[error("registry {path}: {message}")]
    Registry { path: PathBuf, message: String },
}

/// The parts of `model.json` the engine reads; other keys (metrics, reference
/// distributions, lineage) are kept for tools and ignored here.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelMeta {
    pub name: String,
    pub version: u32,
    /// Feature names in the model's input order.
    pub features: Vec<String>,
    #[serde(default = "default_input")]
    pub input: String,
    /// The probabilities output; the label output is never read (tract's binary
    /// classifiers may invert it).
    #[serde(default = "default_output")]
    pub output: String,
    #[serde(default = "default_positive_index")]
    pub positive_index: usize,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Training-time distributions, the baseline of drift monitoring.
    #[serde(default)]
    pub reference: Option<Reference>,
}

/// `model.json`'s `reference`: per feature and for the score, percentiles and a sample
/// of training values, and the training label rate.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Reference {
    #[serde(default)]
    pub features: std::collections::BTreeMap<String, Distribution>,
    #[serde(default)]
    pub score: Option<Distribution>,
    #[serde(default)]
    pub positive_rate: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Distribution {
    #[serde(default)]
    pub quantiles: Vec<f64>,
    #[serde(default)]
    pub sample: Vec<f64>,
}

fn default_input() -> String {
    "features".into()
}
fn default_output() -> String {
    "probabilities".into()
}
fn default_positive_index() -> usize {
    1
}
fn default_threshold() -> f64 {
    0.5
}

/// A loaded, optimized model, shared by every partition task.
pub struct Model {
    pub meta: ModelMeta,
    plan: Arc<TypedRunnableModel>,
    /// `columns[j]` is the index, in the topology's feature order, of model input j.
    columns: Vec<usize>,
    /// Number of columns of the probabilities output.
    outputs: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({} v{})", self.meta.name, self.meta.version)
    }
}

impl Model {
    /// Loads `dir/model.json` and `dir/model.onnx`, checks the model's features against
    /// the topology's, and scores a probe batch so that a broken model fails here.
    pub fn load(dir: &Path, topology_features: &[String]) -> Result<Model, ModelError> {
        let meta_path = dir.join("model.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|source| ModelError::Read {
            path: meta_path.clone(),
            source,
        })?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|source| ModelError::Meta {
            path: meta_path.clone(),
            source,
        })?;
        let mismatch = |message: String| ModelError::Mismatch {
            name: meta.name.clone(),
            version: meta.version,
            message,
        };

        let mut columns = Vec::with_capacity(meta.features.len());
        for name in &meta.features {
            match topology_features.iter().position(|f| f == name) {
                Some(i) => columns.push(i),
                None => {
                    return Err(mismatch(format!(
                        "input feature \"{name}\" is not produced by the topology (it has: {})",
                        topology_features.join(", ")
                    )))
                }
            }
        }

        let onnx_path = dir.join("model.onnx");
        let load_err = |e: TractError| ModelError::Load {
            path: onnx_path.clone(),
            message: format!("{e:#}"),
        };
        let mut model = tree::onnx().model_for_path(&onnx_path).map_err(load_err)?;
        let batch = model.sym("N");
        let width = meta.features.len();
        let declared = model
            .input_fact(0)
            .ok()
            .and_then(|fact| fact.shape.dim(1))
            .and_then(|dim| dim.concretize())
            .and_then(|d| d.as_i64());
        if let Some(declared) = declared.filter(|d| *d != width as i64) {
            return Err(mismatch(format!(
                "model.onnx takes {declared} inputs but model.json lists {width} features ({})",
                meta.features.join(", ")
            )));
        }
        model
            .set_input_fact(0, f32::fact([batch.to_dim(), width.to_dim()]).into())
            .map_err(load_err)?;
        model
            .select_outputs_by_name([meta.output.as_str()])
            .map_err(load_err)?;
        let typed = model.into_optimized().map_err(load_err)?;
        let out_fact = typed.output_fact(0).map_err(load_err)?.clone();
        let outputs = match out_fact.shape.as_concrete().map(|s| s.to_vec()) {
            Some(shape) if shape.len() == 2 => shape[1],
            _ => match out_fact
                .shape
                .dims()
                .get(1)
                .and_then(|d| d.as_i64())
                .map(|n| n as usize)
            {
                Some(n) => n,
                None => {
                    return Err(mismatch(format!(
                        "output \"{}\" is not a [N, classes] tensor ({out_fact:?})",
                        meta.output
                    )))
                }
            },
        };
        if meta.positive_index >= outputs {
            return Err(mismatch(format!(
                "positive_index {} is out of range for output \"{}\" with {outputs} columns",
                meta.positive_index, meta.output
            )));
        }
        let plan = typed.into_runnable().map_err(load_err)?;
        let loaded = Model {
            meta,
            plan,
            columns,
            outputs,
        };
        loaded.probe()?;
        Ok(loaded)
    }

    /// Number of model inputs.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Scores a batch of zeros and ones; any non-finite score refuses the model.
    fn probe(&self) -> Result<(), ModelError> {
        let stride = self.columns.iter().max().map_or(1, |m| m + 1);
        let rows: Vec<f64> = (0..stride * 8).map(|i| (i % 2) as f64).collect();
        let mut scores = Vec::new();
        self.score(&rows, stride, &mut Vec::new(), &mut scores)?;
        if let Some(bad) = scores
            .iter()
            .find(|s| !s.is_finite() || **s < 0.0 || **s > 1.0)
        {
            return Err(ModelError::Mismatch {
                name: self.meta.name.clone(),
                version: self.meta.version,
                message: format!("probe batch scored {bad}, expected probabilities in [0, 1]"),
            });
        }
        Ok(())
    }

    /// Scores `rows` (row-major, `stride` topology features per row) and appends one
    /// positive-class probability per row to `scores`. `input` is a reusable buffer.
    pub fn score(
        &self,
        rows: &[f64],
        stride: usize,
        input: &mut Vec<f32>,
        scores: &mut Vec<f64>,
    ) -> Result<(), ModelError> {
        let n = rows.len() / stride.max(1);
        if n == 0 {
            return Ok(());
        }
        let width = self.columns.len();
        input.clear();
        input.reserve(n * width);
        for row in rows.chunks_exact(stride) {
            input.extend(self.columns.iter().map(|&c| row[c] as f32));
        }
        let score_err = |e: TractError| ModelError::Score {
            name: self.meta.name.clone(),
            version: self.meta.version,
            message: format!("{e:#}"),
        };
        let tensor = Tensor::from_shape(&[n, width], input).map_err(score_err)?;
        let outputs = self.plan.run(tvec!(tensor.into())).map_err(score_err)?;
        let view = outputs[0].try_as_plain_ram().map_err(score_err)?;
        let probabilities = view.as_slice::<f32>().map_err(score_err)?;
        let k = self.outputs;
        scores.extend((0..n).map(|i| f64::from(probabilities[i * k + self.meta.positive_index])));
        Ok(())
    }
}
