//! From events to a registered model in one command: backfill → train.py → register
//! (and promote if better). The model it writes loads in augur and in onnxruntime with
//! equal scores; bad training data and wrong-width models are refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use augur::model::{DirRegistry, Model, ModelRegistry};
use common::*;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A copy of the repository's registry and a topology pointing at it.
fn scratch_registry(dir: &Path) -> (PathBuf, PathBuf) {
    let models = dir.join("models");
    for version in ["1", "2"] {
        let target = models.join("ctr").join(version);
        std::fs::create_dir_all(&target).unwrap();
        for file in ["model.onnx", "model.json"] {
            std::fs::copy(
                repo_root().join("models/ctr").join(version).join(file),
                target.join(file),
            )
            .unwrap();
        }
    }
    std::fs::copy(
        repo_root().join("models/ctr/aliases.json"),
        models.join("ctr/aliases.json"),
    )
    .unwrap();
    let topology = std::fs::read_to_string(repo_root().join("topologies/ctr.yaml"))
        .unwrap()
        .replace(
            "registry: ../models",
            &format!("registry: {}", models.display()),
        );
    let path = dir.join("ctr.yaml");
    std::fs::write(&path, topology).unwrap();
    (path, models)
}

fn backfill(dir: &Path, all_events: bool) -> PathBuf {
    let out = dir.join(if all_events {
        "all.parquet"
    } else {
        "train.parquet"
    });
    let mut args = vec![
        "backfill".to_string(),
        "--topology".into(),
        repo_root()
            .join("topologies/ctr.yaml")
            .display()
            .to_string(),
        "--input".into(),
        repo_root()
            .join("tests/data/golden/events.jsonl")
            .display()
            .to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if all_events {
        args.push("--all-events".into());
    }
    let run = Command::new(augur_bin()).args(&args).output().unwrap();
    assert!(run.status.success(), "{}", text(&run));
    out
}

fn train(args: &[&str]) -> Output {
    Command::new(python())
        .arg(repo_root().join("training/train.py"))
        .args(args)
        .env("AUGUR_BIN", augur_bin())
        .output()
        .unwrap()
}

#[test]
fn train_on_backfill_registers_a_model_that_scores_like_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let (topology, models) = scratch_registry(dir.path());
    let data = backfill(dir.path(), true);
    let candidate = dir.path().join("candidate");
    let run = train(&[
        "--features",
        data.to_str().unwrap(),
        "--out",
        candidate.to_str().unwrap(),
        "--C",
        "0.5",
        "--register",
        "--topology",
        topology.to_str().unwrap(),
    ]);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(out.contains("registered ctr v3"), "{out}");
    assert!(
        out.contains("promoted ctr v3 to champion") || out.contains("not promoted: holdout AUC"),
        "the champion comparison is reported: {out}"
    );

    // The registered model loads in augur and scores like onnxruntime.
    let registry = DirRegistry::open(&models);
    let (version, model_dir) = registry.resolve("ctr", "3").unwrap();
    assert_eq!(version, 3);
    let (names, rows) = golden_features();
    let model = Model::load(&model_dir, &names).unwrap();
    let mut ids: Vec<&String> = rows.keys().collect();
    ids.sort();
    let csv = dir.path().join("rows.csv");
    let mut body = names.join(",") + "\n";
    let mut flat = Vec::new();
    for id in ids.iter().take(2000) {
        body += &rows[*id]
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(",");
        body += "\n";
        flat.extend_from_slice(&rows[*id]);
    }
    std::fs::write(&csv, body).unwrap();
    let (mut input, mut scores) = (Vec::new(), Vec::new());
    model
        .score(&flat, names.len(), &mut input, &mut scores)
        .unwrap();
    let reference = Command::new(python())
        .arg(repo_root().join("tests/reference/onnx_score.py"))
        .arg(&csv)
        .arg(model_dir.join("model.onnx"))
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", text(&reference));
    let reference: Vec<f64> = String::from_utf8_lossy(&reference.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(reference.len(), scores.len());
    for (got, want) in scores.iter().zip(&reference) {
        assert!(
            (got - want).abs() <= 1e-5,
            "tract {got}, onnxruntime {want}"
        );
    }
}

#[test]
fn train_refuses_a_null_column_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.csv");
    let run = Command::new(augur_bin())
        .args(["backfill", "--topology"])
        .arg(repo_root().join("topologies/ctr.yaml"))
        .arg("--input")
        .arg(repo_root().join("tests/data/golden/events.jsonl"))
        .arg("--out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(run.status.success());
    // Blank the ctr_24h cell (the 9th column) of one labelled row.
    let original = std::fs::read_to_string(&data).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
    let mut cells: Vec<&str> = lines[10].split(',').collect();
    cells[8] = "";
    lines[10] = cells.join(",");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let run = train(&[
        "--features",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("m").to_str().unwrap(),
    ]);
    let out = text(&run);
    assert_eq!(run.status.code(), Some(2), "{out}");
    assert!(out.contains("ctr_24h") && out.contains("null"), "{out}");
    assert!(
        !dir.path().join("m/model.onnx").exists(),
        "nothing written for bad data"
    );
}

#[test]
fn register_refuses_a_model_with_the_wrong_input_width() {
    let dir = tempfile::tempdir().unwrap();
    let (topology, models) = scratch_registry(dir.path());
    // model.json lists 11 features; model.onnx takes 12.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        repo_root().join("models/ctr/1/model.onnx"),
        bad.join("model.onnx"),
    )
    .unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("models/ctr/1/model.json")).unwrap(),
    )
    .unwrap();
    meta["features"].as_array_mut().unwrap().pop();
    std::fs::write(bad.join("model.json"), meta.to_string()).unwrap();
    let run = Command::new(augur_bin())
        .args(["models", "register", "--topology"])
        .arg(&topology)
        .arg(&bad)
        .output()
        .unwrap();
    let out = text(&run);
    assert!(!run.status.success(), "{out}");
    assert!(
        out.contains("model.onnx takes 12 inputs but model.json lists 11 features"),
        "{out}"
    );
    assert_eq!(
        DirRegistry::open(&models).versions("ctr").unwrap(),
        vec![1, 2],
        "nothing registered"
    );
}

#[test]
fn augur_train_goes_from_events_to_a_registered_model_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let (topology, models) = scratch_registry(dir.path());
    let run = Command::new(augur_bin())
        .current_dir(repo_root())
        .args(["train", "--topology"])
        .arg(&topology)
        .arg("--input")
        .arg(repo_root().join("tests/data/golden/events.jsonl"))
        .arg("--out")
        .arg(dir.path().join("candidate"))
        .arg("--python")
        .arg(python())
        .args(["--", "--C", "0.25"])
        .output()
        .unwrap();
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(out.contains("14454 events -> 12454 labelled rows"), "{out}");
    assert!(out.contains("registered ctr v3"), "{out}");
    assert_eq!(
        DirRegistry::open(&models).versions("ctr").unwrap(),
        vec![1, 2, 3]
    );
}

#[test]
fn promote_moves_the_champion_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (topology, models) = scratch_registry(dir.path());
    let run = Command::new(augur_bin())
        .args(["models", "promote", "--topology"])
        .arg(&topology)
        .args(["ctr", "2"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    // No broker listens at the topology's localhost:9092: the registry changes, and the
    // announcement's failure is a warning that says how workers will still learn of it.
    assert!(
        text(&run).contains("could not announce the change on ctr-control")
            && text(&run).contains("when they next poll the registry"),
        "{}",
        text(&run)
    );
    let registry = DirRegistry::open(&models);
    let aliases = registry.aliases("ctr").unwrap();
    assert_eq!((aliases["champion"], aliases["previous"]), (2, 1));
    assert_eq!(registry.resolve("ctr", "champion").unwrap().0, 2);
    let list = Command::new(augur_bin())
        .args(["models", "list", "--topology"])
        .arg(&topology)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("v1       None        previous")
            && listed.contains("v2       Production  champion"),
        "{listed}"
    );
    let missing = Command::new(augur_bin())
        .args(["models", "promote", "--topology"])
        .arg(&topology)
        .args(["ctr", "9"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("has no version 9"),
        "{}",
        text(&missing)
    );
}

#[test]
fn batch_scores_written_as_parquet_read_back_in_pandas() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.parquet");
    let run = Command::new(augur_bin())
        .args(["score", "--topology"])
        .arg(repo_root().join("topologies/ctr.yaml"))
        .arg("--input")
        .arg(repo_root().join("tests/data/golden/events.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let check = Command::new(python())
        .arg("-c")
        .arg(
            "import sys, pandas as pd\n\
             df = pd.read_parquet(sys.argv[1])\n\
             assert len(df) == 12454 and df.event_id.is_unique, len(df)\n\
             assert df.score.between(0, 1).all() and set(df.label) <= {0, 1}\n\
             print(len(df), df.label.sum())",
        )
        .arg(&out)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "12454 1297");
}
