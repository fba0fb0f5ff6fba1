//! The offline side runs the stream's own feature code: backfill equals the pandas
//! golden files (features and labels), a streaming run's logged features equal backfill
//! (skew report), features never depend on later events, and batch scoring equals the
//! stream's scores.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use augur::codec::{decode_event, Codec, Event};
use augur::config::Topology;
use augur::offline::Replay;
use common::*;
use rdkafka::Message;

fn augur(args: &[&str]) -> std::process::Output {
    Command::new(augur_bin())
        .args(args)
        .output()
        .expect("running augur")
}

fn topology_path() -> String {
    repo_root()
        .join("topologies/ctr.yaml")
        .display()
        .to_string()
}

fn golden_path() -> String {
    repo_root()
        .join("tests/data/golden/events.jsonl")
        .display()
        .to_string()
}

fn check_with_pandas(backfill: &Path) {
    let out = Command::new(python())
        .arg(repo_root().join("tests/reference/check_backfill.py"))
        .arg(backfill)
        .arg(repo_root().join("tests/data/golden"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {text}", backfill.display());
    eprintln!("{}: {text}", backfill.display());
}

#[test]
fn backfill_equals_the_golden_features_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["train.csv", "train.parquet"] {
        let out = dir.path().join(name);
        let run = augur(&[
            "backfill",
            "--topology",
            &topology_path(),
            "--input",
            &golden_path(),
            "--out",
            out.to_str().unwrap(),
            "--all-events",
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            stdout.contains("14454 events") && stdout.contains("14454 rows"),
            "{stdout}"
        );
        check_with_pandas(&out);
    }

    // Without --all-events: one row per impression, all labelled.
    let out = dir.path().join("impressions.csv");
    let run = augur(&[
        "backfill",
        "--topology",
        &topology_path(),
        "--input",
        &golden_path(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 12_454);
    assert!(rows.iter().all(|r| r.ends_with(",0") || r.ends_with(",1")));
}

#[test]
fn backfill_reports_bad_input_and_names_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let good = r#"{"event_id":"a","user_id":"u","ts":1767225703544,"type":"impression","item_id":"i","category":"c"}"#;
    std::fs::write(
        &input,
        format!(
            "{good}\nnot json\n\n{}\n",
            good.replace("impression", "hover")
        ),
    )
    .unwrap();
    let out = dir.path().join("out.csv");
    let rejects = dir.path().join("rejects.jsonl");
    let run = augur(&[
        "backfill",
        "--topology",
        &topology_path(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rejects",
        rejects.to_str().unwrap(),
    ]);
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("2 input records refused: invalid_json=1 unknown_type=1"),
        "{stdout}"
    );
    assert!(stdout.contains("line 2: invalid_json"), "{stdout}");
    assert!(stdout.contains("line 4: unknown_type"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap().lines().count(),
        2
    );

    let missing = augur(&[
        "backfill",
        "--topology",
        &topology_path(),
        "--input",
        "/nonexistent.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent.jsonl"));
}

/// Per-impression features from a replay of `events`.
fn replay_features(events: &[Event]) -> HashMap<String, Vec<f64>> {
    let topology = Topology::load(&repo_root().join("topologies/ctr.yaml")).unwrap();
    let features = topology.feature_set();
    let mut replay = Replay::new(&features, topology.scored_types(), false);
    let mut rows = HashMap::new();
    for event in events {
        let _ = replay.apply(event.clone(), |row| {
            rows.insert(row.event_id, row.features.to_vec());
        });
    }
    replay.finish(|row| {
        rows.insert(row.event_id, row.features.to_vec());
    });
    rows
}

#[test]
fn features_do_not_depend_on_later_events() {
    let events: Vec<Event> = golden_events()
        .iter()
        .map(|(_, line)| {
            decode_event(Codec::Json, line.as_bytes(), augur::codec::now_ms()).unwrap()
        })
        .collect();
    let baseline = replay_features(&events);
    let mut rng = augur::gen::Rng::new(7);
    for trial in 0..20 {
        // An impression somewhere in the stream; shuffle everything after it.
        let k = loop {
            let k = rng.below(events.len() as u64) as usize;
            if events[k].kind == augur::codec::EventType::Impression {
                break k;
            }
        };
        let mut shuffled = events.clone();
        let tail = &mut shuffled[k + 1..];
        for i in (1..tail.len()).rev() {
            tail.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let rows = replay_features(&shuffled);
        let id = &events[k].event_id;
        assert_eq!(
            rows[id], baseline[id],
            "trial {trial}: features of {id} changed when later events were shuffled"
        );
    }
}

/// `augur skew-report` of a logged-predictions file against the golden events.
fn skew_report_against_golden(logged: &Path) -> std::process::Output {
    augur(&[
        "skew-report",
        "--topology",
        &topology_path(),
        "--logged",
        logged.to_str().unwrap(),
        "--events",
        &golden_path(),
    ])
}

#[test]
fn stream_features_equal_backfill_and_batch_scores_equal_stream_scores() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, 4);
    let dir = tempfile::tempdir().unwrap();
    let topology = write_topology(dir.path(), &topics, "json");
    produce_keyed(&broker.producer(), &topics.events, &golden_events());
    let engine = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        &unique("i"),
        &dir.path().join("state"),
    );
    let messages = broker.read_topic(&topics.predictions, 4, Duration::from_secs(180), |m| {
        predictions_by_event(m).len() >= 12_454
    });
    assert!(engine.terminate(Duration::from_secs(30)));
    let logged = dir.path().join("predictions.jsonl");
    let lines: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap()).into_owned())
        .collect();
    std::fs::write(&logged, lines.join("\n") + "\n").unwrap();

    // From a file, and straight from the topic: no mismatch.
    let report = skew_report_against_golden(&logged);
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(
        text.contains(&format!(
            "compared {} logged predictions; 0 feature mismatches; 0 logged",
            lines.len()
        )),
        "{text}"
    );
    let report = augur(&[
        "skew-report",
        "--topology",
        &topology_path(),
        "--logged",
        &topics.predictions,
        "--events",
        &topics.events,
        "--brokers",
        &broker.brokers,
    ]);
    assert!(
        report.status.success(),
        "{}{}",
        String::from_utf8_lossy(&report.stdout),
        String::from_utf8_lossy(&report.stderr)
    );

    // Backfill straight from the topic equals the pandas golden files too.
    let from_topic = dir.path().join("from-topic.parquet");
    let run = augur(&[
        "backfill",
        "--topology",
        &topology_path(),
        "--from-topic",
        &topics.events,
        "--brokers",
        &broker.brokers,
        "--out",
        from_topic.to_str().unwrap(),
        "--all-events",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    check_with_pandas(&from_topic);

    // A skewed log is caught and the feature named.
    let tampered = dir.path().join("tampered.jsonl");
    let mut first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let old = first["features"]["clicks_24h"].as_f64().unwrap();
    first["features"]["clicks_24h"] = serde_json::json!(old + 1.0);
    let mut skewed = lines.clone();
    skewed[0] = first.to_string();
    std::fs::write(&tampered, skewed.join("\n")).unwrap();
    let report = skew_report_against_golden(&tampered);
    let text = String::from_utf8_lossy(&report.stdout);
    assert_eq!(report.status.code(), Some(1), "{text}");
    assert!(text.contains("1 feature mismatches"), "{text}");
    let line = text.lines().find(|l| l.starts_with("clicks_24h")).unwrap();
    assert!(line.split_whitespace().nth(1) == Some("1"), "{line}");

    // Batch prediction with the same model gives the stream's scores.
    let batch = dir.path().join("batch.jsonl");
    let run = augur(&[
        "score",
        "--topology",
        &topology_path(),
        "--input",
        &golden_path(),
        "--out",
        batch.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stream_scores: HashMap<String, f64> = predictions_by_event(&messages)
        .into_iter()
        .map(|(id, p)| (id, p[0]["score"].as_f64().unwrap()))
        .collect();
    let batch_lines = std::fs::read_to_string(&batch).unwrap();
    let mut n = 0;
    for line in batch_lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["event_id"].as_str().unwrap();
        let (b, s) = (v["score"].as_f64().unwrap(), stream_scores[id]);
        assert!((b - s).abs() <= 1e-12, "{id}: batch {b}, stream {s}");
        n += 1;
    }
    assert_eq!(n, 12_454);
}
