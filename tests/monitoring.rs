//! Monitoring: the drift statistics against scipy and NumPy, `/metrics` through a real
//! Prometheus text parser, and live drift alerts against tansu with generated streams.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use augur::gen::Rng;
use augur::monitor::stats;
use common::*;
use rdkafka::message::Message;

fn normal(rng: &mut Rng) -> f64 {
    let u = 1.0 - rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.next_f64()).cos()
}

/// Sample pairs of many shapes: equal and unequal sizes, the same or shifted
/// distributions, and heavy ties (rounded and integer values).
fn sample_pairs() -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut rng = Rng::new(2026);
    let sizes = [
        (50, 50),
        (100, 80),
        (37, 61),
        (500, 500),
        (1000, 700),
        (2000, 1500),
        (300, 3000),
        (4000, 4000),
    ];
    let mut pairs = Vec::new();
    for (k, &(n, m)) in sizes.iter().enumerate() {
        for shape in 0..3 {
            let shift = [0.0, 0.15, 0.6][shape];
            let draw = |rng: &mut Rng, shift: f64| -> f64 {
                match k % 3 {
                    0 => normal(rng) + shift,
                    // Ties: values on a 0.5 grid.
                    1 => ((normal(rng) + shift) * 2.0).round() / 2.0,
                    // Heavy ties: small counts.
                    _ => (rng.next_f64() * (4.0 + 4.0 * shift)).floor(),
                }
            };
            let a: Vec<f64> = (0..n).map(|_| draw(&mut rng, 0.0)).collect();
            let b: Vec<f64> = (0..m).map(|_| draw(&mut rng, shift)).collect();
            pairs.push((a, b));
        }
    }
    pairs
}

#[test]
fn ks_and_psi_equal_scipy_and_numpy() {
    let pairs = sample_pairs();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.json");
    let output = dir.path().join("reference.json");
    let json: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(a, b)| serde_json::json!({"a": a, "b": b}))
        .collect();
    std::fs::write(&input, serde_json::to_string(&json).unwrap()).unwrap();
    let run = Command::new(python())
        .arg(repo_root().join("tests/reference/drift_stats.py"))
        .args([&input, &output])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let reference: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let (mut worst_d, mut worst_p, mut worst_psi, mut tied) = (0.0f64, 0.0f64, 0.0f64, 0);
    for (i, ((a, b), want)) in pairs.iter().zip(&reference).enumerate() {
        let (mut a, mut b) = (a.clone(), b.clone());
        let distinct = a
            .iter()
            .chain(&b)
            .map(|x| x.to_bits())
            .collect::<BTreeSet<_>>();
        tied += usize::from(distinct.len() < a.len() + b.len());
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let got = stats::ks_2samp(&a, &b);
        let (d, p) = (
            want["statistic"].as_f64().unwrap(),
            want["p_value"].as_f64().unwrap(),
        );
        let rel = (got.p_value - p).abs() / p.max(1e-300);
        eprintln!(
            "pair {i:>2} ({} vs {}): D {:.6} (scipy {d:.6}), p {:.6e} (scipy {p:.6e}), rel {rel:.1e}",
            a.len(),
            b.len(),
            got.statistic,
            got.p_value
        );
        assert!(
            (got.statistic - d).abs() <= 1e-9,
            "pair {i}: D {} vs {d}",
            got.statistic
        );
        assert!(rel <= 1e-4, "pair {i}: p {} vs scipy {p}", got.p_value);
        let edges = stats::psi_edges(&a);
        let psi = stats::psi(
            &stats::bin_shares(&a, &edges),
            &stats::bin_shares(&b, &edges),
        );
        let want_psi = want["psi"].as_f64().unwrap();
        assert!(
            (psi - want_psi).abs() <= 1e-9,
            "pair {i}: PSI {psi} vs {want_psi}"
        );
        worst_d = worst_d.max((got.statistic - d).abs());
        worst_p = worst_p.max(rel);
        worst_psi = worst_psi.max((psi - want_psi).abs());
    }
    eprintln!(
        "{} pairs ({tied} with ties): worst |ΔD| {worst_d:.1e}, worst relative Δp {worst_p:.1e}, worst |ΔPSI| {worst_psi:.1e}",
        pairs.len()
    );
    assert!(pairs.len() >= 20 && tied >= 5);
}

/// Every metric family the monitoring issue lists, by name.
const FAMILIES: &[&str] = &[
    "augur_source_events_total",
    "augur_sink_predictions_total",
    "augur_source_dead_letters_total",
    "augur_pipeline_e2e_latency_seconds",
    "augur_pipeline_stage_duration_seconds",
    "augur_model_batch_rows",
    "augur_source_consumer_lag_records",
    "augur_state_hot_users",
    "augur_state_hot_bytes",
    "augur_state_disk_bytes",
    "augur_state_checkpoint_duration_seconds",
    "augur_online_store_behind_seconds",
    "augur_online_store_pending_users",
    "augur_model_champion_version",
    "augur_shadow_disagreements_total",
    "augur_shadow_abs_score_delta",
    "augur_shadow_score_duration_seconds",
    "augur_bandit_posterior_mean",
    "augur_drift_ks_statistic",
    "augur_drift_ks_p_value",
    "augur_drift_psi",
    "augur_drift_positive_rate",
    "augur_quality_auc",
    "augur_quality_log_loss",
    "augur_quality_accuracy",
];

#[test]
fn metrics_parse_with_a_real_prometheus_parser_and_have_every_family() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, 2);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = unique("app");
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
            ("version: champion", "version: champion\n  shadows: [\"2\"]"),
            ("url: \"\"", "url: memory://"),
            (
                "state:\n",
                "experiment:\n  name: bandit\n  mode: bandit\n  arms:\n    \
                 - { name: a, model: champion }\n    - { name: b, model: \"2\" }\n\n\
                 monitoring:\n  check_every: 1000\n  min_labels: 200\n\nstate:\n",
            ),
        ],
    );
    for t in ["control", "alerts", "shadow-predictions"] {
        broker.create_topic(&format!("{app}-{t}"), 1);
    }
    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("group"),
        "w0",
        &dir.path().join("state"),
    );
    let mut events = golden_events();
    events.push(("u-bad".into(), "{not json".into()));
    produce_keyed(&broker.producer(), &topics.events, &events);
    let impressions = events
        .iter()
        .filter(|(_, payload)| payload.contains("\"impression\""))
        .count();
    let predictions = broker.read_topic(&topics.predictions, 2, Duration::from_secs(90), |ms| {
        ms.len() >= impressions
    });
    eprintln!(
        "{} predictions for {impressions} impressions",
        predictions.len()
    );
    // Consumer lag comes with librdkafka's statistics, every 5 s.
    std::thread::sleep(Duration::from_secs(6));
    let body = http_get(port, "/metrics");
    let body = body.split("\r\n\r\n").nth(1).unwrap().to_owned();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &body).unwrap();
    let parsed = Command::new(python())
        .arg(repo_root().join("tests/reference/parse_metrics.py"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "prometheus_client could not parse /metrics: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let families: BTreeSet<String> = String::from_utf8_lossy(&parsed.stdout)
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let missing: Vec<&&str> = FAMILIES
        .iter()
        .filter(|f| {
            // prometheus_client drops the _total suffix from counter family names.
            !families.contains(**f) && !families.contains(f.trim_end_matches("_total"))
        })
        .collect();
    eprintln!("{} families parsed", families.len());
    assert!(
        missing.is_empty(),
        "missing families {missing:?} in:\n{body}"
    );
    // Histograms are histograms (explicit buckets), not summaries.
    assert!(body.contains("augur_pipeline_e2e_latency_seconds_bucket{le=\"0.005\"}"));
    assert!(body.contains("augur_pipeline_stage_duration_seconds_bucket{stage=\"decode\""));
    assert!(!body.contains("quantile="), "a summary slipped in");
    // No user id ever appears in a label.
    assert!(!body.contains("user_id") && !body.contains("u-bad"));
    drop(augur);
}

/// The generator settings of every drift test stream: churning users with click
/// affinities, one event per second of event time.
const GEN: &[&str] = &[
    "--users",
    "500",
    "--lifetime",
    "40",
    "--affinity",
    "--step-ms",
    "1000",
];

fn gen(args: &[&str]) {
    let out = Command::new(augur_bin())
        .arg("gen")
        .args(GEN)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "augur gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Firing alert records on the alerts topic, as JSON.
fn alerts(broker: &Broker, app: &str, wait: Duration) -> Vec<serde_json::Value> {
    broker
        .read_topic(&format!("{app}-alerts"), 1, wait, |_| false)
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap())
        .collect()
}

const START_TS: i64 = 1_767_225_600_000;
/// Input partitions of the drift scenarios.
const PARTITIONS: i32 = 2;
/// Events before the stream's features reach their steady state (users churn after
/// 40 events; 500 user slots): monitoring starts after them.
const WARMUP: u64 = 200_000;

/// A scratch registry whose v3 is v1 with a reference drawn from the steady state of
/// a drift-free generated stream (another seed than the test streams), champion v3.
fn registry_with_generated_reference(dir: &Path) -> std::path::PathBuf {
    let events = dir.join("train.jsonl");
    let features = dir.join("train.parquet");
    gen(&[
        "--seed",
        "7",
        "--events",
        "500000",
        "--out",
        events.to_str().unwrap(),
    ]);
    let out = Command::new(augur_bin())
        .args(["backfill", "--topology"])
        .arg(repo_root().join("topologies/ctr.yaml"))
        .arg("--input")
        .arg(&events)
        .arg("--out")
        .arg(&features)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backfill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry = dir.join("models");
    for v in ["1", "2"] {
        let to = registry.join("ctr").join(v);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.onnx", "model.json"] {
            std::fs::copy(repo_root().join("models/ctr").join(v).join(f), to.join(f)).unwrap();
        }
    }
    let out = Command::new(python())
        .arg(repo_root().join("tests/reference/make_reference.py"))
        .arg(&features)
        .arg(repo_root().join("models/ctr/1"))
        .arg(registry.join("ctr/3"))
        .arg("--after-ts")
        .arg((START_TS + WARMUP as i64 * 1000).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make_reference: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("reference: {}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(registry.join("ctr/aliases.json"), r#"{"champion": 3}"#).unwrap();
    registry
}

/// Waits until the worker has read `events` records (its own counter).
fn wait_for_events(port: u16, events: f64, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let body = http_get(port, "/metrics");
        let seen = metric_sum(&body, "augur_source_events_total");
        if seen >= events {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker read {seen} of {events} events in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs one drift scenario: a warm-up of WARMUP events with monitoring off, then
/// `events` more with monitoring on (the same stream, continued), optionally drifting.
/// Returns the alert records raised during the monitored part.
fn run_scenario(seed: &str, events: u64, drift: Option<(&str, u64)>) -> Vec<serde_json::Value> {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_with_generated_reference(dir.path());
    let app = unique("app");
    for t in ["control", "alerts"] {
        broker.create_topic(&format!("{app}-{t}"), 1);
    }
    let port = free_port();
    let topology = |monitoring: bool| {
        let sub = tempfile::tempdir_in(dir.path()).unwrap().keep();
        write_topology_with(
            &sub,
            &topics,
            "json",
            &[
                ("app: ctr", &format!("app: {app}")),
                ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
                (
                    &format!("registry: {}", repo_root().join("models").display()),
                    &format!("registry: {}", registry.display()),
                ),
                (
                    "state:\n",
                    &format!("monitoring:\n  enabled: {monitoring}\n  cooldown: 1h\n\nstate:\n"),
                ),
            ],
        )
    };
    let state = dir.path().join("state");
    let group = unique("group");
    let produce = |from: u64, to: u64| {
        let mut args = vec![
            "--seed".to_owned(),
            seed.to_owned(),
            "--from".into(),
            from.to_string(),
            "--events".into(),
            to.to_string(),
            "--to-topic".into(),
            topics.events.clone(),
            "--brokers".into(),
            broker.brokers.clone(),
        ];
        if let Some((kind, at)) = drift {
            args.extend([
                "--drift".into(),
                kind.to_owned(),
                "--drift-at".into(),
                at.to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        gen(&args);
    };

    // Warm-up: monitoring off; then a clean stop, so the state is checkpointed.
    produce(0, WARMUP);
    let warmup = Augur::start(&topology(false), &broker.brokers, &group, "w0", &state);
    wait_for_events(port, WARMUP as f64, Duration::from_secs(300));
    assert!(
        warmup.terminate(Duration::from_secs(30)),
        "warm-up worker did not stop cleanly"
    );

    let monitored = Augur::start(&topology(true), &broker.brokers, &group, "w0", &state);
    produce(WARMUP, WARMUP + events);
    wait_for_events(port, events as f64, Duration::from_secs(600));
    // Let the monitor finish its last inputs.
    std::thread::sleep(Duration::from_secs(3));
    let body = http_get(port, "/metrics");
    for family in [
        "augur_drift_ks_p_value",
        "augur_drift_psi",
        "augur_quality_auc",
        "augur_monitor_dropped_total",
        "augur_monitor_check_duration_seconds_sum",
        "augur_monitor_check_duration_seconds_count",
    ] {
        for line in body.lines().filter(|l| l.starts_with(family)) {
            eprintln!("{line}");
        }
    }
    let alerts = alerts(&broker, &app, Duration::from_secs(3));
    drop(monitored);
    alerts
}

#[test]
fn a_million_drift_free_events_raise_no_alert() {
    let alerts = run_scenario("11", 1_000_000, None);
    assert!(
        alerts.is_empty(),
        "alerts on a drift-free stream: {alerts:#?}"
    );
}

#[test]
fn injected_drift_fires_within_50k_events_and_never_before() {
    let drift_at = WARMUP + 300_000;
    let alerts = run_scenario("13", 400_000, Some(("clicks=3", drift_at)));
    let t = START_TS + drift_at as i64 * 1000;
    let firing: Vec<&serde_json::Value> =
        alerts.iter().filter(|a| a["state"] == "firing").collect();
    let mut first_drift = None;
    for a in &firing {
        let at = a["details"]["event_ts"].as_i64().unwrap();
        assert!(at >= t, "alert before the drift: {a}");
        // Events after T the worker had taken in: one event per second of event time,
        // split between the partitions (users are hashed evenly), each partition up to
        // its own newest event. The two partitions are drained at their own pace, and
        // one can be tens of thousands of events ahead of the other, so the newest
        // event time alone overstates how much of the drifted stream was seen.
        let reached: Vec<i64> = a["details"]["partition_event_ts"]
            .as_object()
            .unwrap()
            .values()
            .map(|ts| (ts.as_i64().unwrap() - t) / 1000)
            .collect();
        let after = reached.iter().map(|&r| r.max(0)).sum::<i64>() / PARTITIONS as i64;
        eprintln!(
            "{} {}: {after} events after T taken in (newest event {:+} after T; per partition {reached:?})",
            a["alert"],
            a["subject"],
            (at - t) / 1000,
        );
        if a["alert"] == "feature_drift" || a["alert"] == "prediction_drift" {
            first_drift = Some(first_drift.map_or(after, |f: i64| f.min(after)));
        }
    }
    let after = first_drift.expect("a drift alert");
    eprintln!("first drift alert {after} events after T");
    assert!(after <= 50_000, "drift alert {after} events after T");
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text =
        std::fs::read_to_string(repo_root().join("docker/grafana/augur-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let declared = std::fs::read_to_string(repo_root().join("src/metrics.rs")).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("augur_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_owned();
                used.insert(family);
            }
        }
    }
    for family in &used {
        assert!(
            declared.contains(&format!("\"{family}\"")),
            "the dashboard queries {family}, which src/metrics.rs does not declare"
        );
    }
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for needed in [
        "Throughput",
        "latency",
        "lag",
        "Dead letters",
        "drift",
        "Shadows",
        "Online store",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(needed)),
            "no panel about {needed}: {titles:?}"
        );
    }
    assert!(used.len() >= 15, "{used:?}");
}
