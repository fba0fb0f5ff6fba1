//! Gradient-boosted tree models (skl2onnx TreeEnsembleClassifier) scored through
//! `Model::score`, the engine's path, at batch 1, 64 and 1024, next to onnxruntime's
//! single-thread figures for the same models and rows.
//!
//! `tests/reference/trees.py` (run with `.venv/bin/python`, or `$AUGUR_TEST_PYTHON`)
//! trains and exports the models into a temporary directory and measures onnxruntime
//! (intra_op_num_threads=1, inter_op_num_threads=1; batch 1 includes Python's call
//! overhead). Models: `gb2` (GradientBoostingClassifier, 100 trees of depth 3) and `hgb2`
//! (HistGradientBoostingClassifier, 100 trees of up to 31 leaves, NaN tracked).

use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use augur::model::Model;

fn python() -> PathBuf {
    match std::env::var("AUGUR_TEST_PYTHON") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn trees(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/trees.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} with {}: {e}",
                script.display(),
                python().display()
            )
        });
    assert!(status.success(), "trees.py failed: {status}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let features: Vec<String> = manifest["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let width = features.len();
    let rows: Vec<f64> = read_f32(&dir.path().join("rows.f32"))
        .into_iter()
        .map(f64::from)
        .collect();

    for name in ["gb2", "hgb2"] {
        let entry = manifest["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap();
        let ort = &entry["ort_rows_per_s"];
        println!(
            "onnxruntime {} 1 thread, {name}: batch 1 {:.0} rows/s, batch 64 {:.0} rows/s, batch 1024 {:.0} rows/s",
            manifest["onnxruntime"].as_str().unwrap(),
            ort["1"].as_f64().unwrap(),
            ort["64"].as_f64().unwrap(),
            ort["1024"].as_f64().unwrap()
        );
        let model = Model::load(&dir.path().join(name), &features).unwrap();
        let mut group = c.benchmark_group(format!("trees_{name}"));
        for batch in [1usize, 64, 1024] {
            group.throughput(Throughput::Elements(batch as u64));
            let (mut input, mut scores) = (Vec::new(), Vec::new());
            let chunks: Vec<&[f64]> = rows.chunks_exact(batch * width).collect();
            let mut next = 0;
            group.bench_function(format!("batch_{batch}"), |b| {
                b.iter(|| {
                    scores.clear();
                    let chunk = chunks[next % chunks.len()];
                    next += 1;
                    model.score(chunk, width, &mut input, &mut scores).unwrap();
                    std::hint::black_box(&scores);
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, trees);
criterion_main!(benches);
