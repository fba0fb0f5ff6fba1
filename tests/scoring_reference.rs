//! tract scores equal onnxruntime's (the trusted reference, run in the test venv) on
//! the golden feature rows, within 1e-5.

mod common;

use std::process::Command;

use augur::model::Model;
use common::*;

fn check_model(version: u32) {
    let (names, rows) = golden_features();
    let mut ids: Vec<&String> = rows.keys().collect();
    ids.sort();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rows.csv");
    let mut text = names.join(",") + "\n";
    let mut flat = Vec::with_capacity(ids.len() * names.len());
    for id in &ids {
        let row = &rows[*id];
        text += &row
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(",");
        text += "\n";
        flat.extend_from_slice(row);
    }
    std::fs::write(&csv, text).unwrap();

    let model_dir = repo_root().join(format!("models/ctr/{version}"));
    let output = Command::new(python())
        .arg(repo_root().join("tests/reference/onnx_score.py"))
        .arg(&csv)
        .arg(model_dir.join("model.onnx"))
        .output()
        .expect("running onnxruntime");
    assert!(
        output.status.success(),
        "onnx_score.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: Vec<f64> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(reference.len(), ids.len());

    let model = Model::load(&model_dir, &names).unwrap();
    let (mut input, mut scores) = (Vec::new(), Vec::new());
    // Mixed batch sizes, as the stream scores them.
    let stride = names.len();
    for chunk in flat.chunks(stride * 97) {
        model.score(chunk, stride, &mut input, &mut scores).unwrap();
    }
    assert_eq!(scores.len(), reference.len());
    let mut worst = 0.0f64;
    for (i, (got, want)) in scores.iter().zip(&reference).enumerate() {
        let diff = (got - want).abs();
        worst = worst.max(diff);
        assert!(
            diff <= 1e-5,
            "row {} ({}): tract {got}, onnxruntime {want}",
            i,
            ids[i]
        );
    }
    eprintln!(
        "model v{version}: {} rows, max |tract - onnxruntime| = {worst:e}",
        scores.len()
    );
}

#[test]
fn tract_scores_equal_onnxruntime_v1() {
    check_model(1);
}

#[test]
fn tract_scores_equal_onnxruntime_v2() {
    check_model(2);
}

#[test]
fn a_model_whose_features_the_topology_lacks_is_refused() {
    let names: Vec<String> = ["impressions_1h", "clicks_1h"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let err = Model::load(&repo_root().join("models/ctr/1"), &names)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ctr v1") && err.contains("\"ctr_1h\" is not produced by the topology"),
        "{err}"
    );
}
