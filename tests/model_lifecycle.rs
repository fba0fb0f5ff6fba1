//! Models in the running stream, against tansu and the real binary: promotion and
//! rollback under load (by the control topic, by registry polling and by the admin
//! API), a fixed split, shadows (one of them corrupt), and the in-stream bandit.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use augur::gen::{event_json, Generator};
use common::*;
use rdkafka::message::{Message, OwnedMessage};

/// A registry of its own holding copies of the committed ctr v1 and v2, champion v1.
fn scratch_registry(dir: &Path) -> PathBuf {
    let root = dir.join("models");
    for v in ["1", "2"] {
        let to = root.join("ctr").join(v);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.onnx", "model.json"] {
            std::fs::copy(repo_root().join("models/ctr").join(v).join(f), to.join(f)).unwrap();
        }
    }
    std::fs::write(root.join("ctr/aliases.json"), r#"{"champion": 1}"#).unwrap();
    root
}

/// A version whose model.onnx is not ONNX (as a half-copied or damaged file would be).
fn write_corrupt_version(registry: &Path, version: u32) {
    let dir = registry.join("ctr").join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), b"this is not an onnx file").unwrap();
    std::fs::copy(registry.join("ctr/2/model.json"), dir.join("model.json")).unwrap();
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Runs `augur models ...`; panics with its output on failure.
fn models_cli(args: &[&str]) -> String {
    let out = Command::new(augur_bin())
        .arg("models")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "augur models {args:?} failed: {text}");
    text
}

/// Produces generated events at about `rate` per second until `stop`; returns the
/// impressions' event ids.
fn stream_events(
    broker: &Broker,
    topic: &str,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let producer = broker.producer();
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let mut generator = Generator::new(11, 500);
        let start = Instant::now();
        let mut impressions = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let event = generator.next_event(1_767_225_600_000 + i as i64 * 1000);
            if event.kind == augur::codec::EventType::Impression {
                impressions.push(event.event_id.clone());
            }
            let payload = event_json(&event);
            let mut record = rdkafka::producer::BaseRecord::to(&topic)
                .key(&event.user_id)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            i += 1;
            let due = Duration::from_micros(i * 1_000_000 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
        impressions
    })
}

fn json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().unwrap()).unwrap()
}

/// Reads `topic` until every id in `ids` has a record (or 60 s pass).
fn read_all(broker: &Broker, topic: &str, partitions: i32, ids: &[String]) -> Vec<OwnedMessage> {
    let want: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    let mut last = 0;
    broker.read_topic(topic, partitions, Duration::from_secs(60), |ms| {
        for m in &ms[last..] {
            if let Some(id) = json(m)["event_id"].as_str() {
                if want.contains(id) {
                    seen.insert(id.to_owned());
                }
            }
        }
        last = ms.len();
        seen.len() == want.len()
    })
}

/// Checks the version sequence of every partition of the predictions topic: each
/// impression scored exactly once, versions switching only at the expected points;
/// returns, per switch, the latest `produced_us` of a prediction by the old version.
fn check_switches(messages: &[OwnedMessage], impressions: &[String], expected: &[u64]) -> Vec<i64> {
    let by_event = predictions_by_event(messages);
    for id in impressions {
        let n = by_event.get(id).map_or(0, Vec::len);
        assert_eq!(n, 1, "impression {id} has {n} predictions");
    }
    assert_eq!(
        by_event.len(),
        impressions.len(),
        "predictions for unknown events"
    );
    let mut partitions: BTreeMap<i32, Vec<(i64, u64, i64)>> = BTreeMap::new();
    for m in messages {
        let v = json(m);
        partitions.entry(m.partition()).or_default().push((
            m.offset(),
            v["version"].as_u64().unwrap(),
            v["produced_us"].as_i64().unwrap(),
        ));
    }
    let mut last_old = vec![i64::MIN; expected.len() - 1];
    for (partition, mut records) in partitions {
        records.sort();
        let mut runs: Vec<u64> = Vec::new();
        for (_, version, _) in &records {
            if runs.last() != Some(version) {
                runs.push(*version);
            }
        }
        // A partition may have seen no traffic in some phase; what it saw must be a
        // contiguous stretch of the expected sequence.
        let pos = expected
            .windows(runs.len())
            .position(|w| w == runs.as_slice());
        assert!(
            pos.is_some(),
            "partition {partition}: versions ran {runs:?}, expected a stretch of {expected:?}"
        );
        let pos = pos.unwrap();
        for (switch, pair) in runs.windows(2).enumerate() {
            let old = pair[0];
            let last_of_old = records
                .iter()
                .take_while(|(_, v, _)| *v == old || runs[..=switch].contains(v))
                .filter(|(_, v, _)| *v == old)
                .map(|(_, _, produced)| *produced)
                .max()
                .unwrap();
            let k = pos + switch;
            last_old[k] = last_old[k].max(last_of_old);
        }
    }
    last_old
}

fn setup(partitions: i32) -> (Broker, Topics, tempfile::TempDir, String) {
    let broker = Broker::start();
    let topics = Topics::create(&broker, partitions);
    let app = unique("app");
    broker.create_topic(&format!("{app}-control"), 1);
    broker.create_topic(&format!("{app}-alerts"), 1);
    broker.create_topic(&format!("{app}-shadow-predictions"), partitions);
    (broker, topics, tempfile::tempdir().unwrap(), app)
}

#[test]
fn promotion_and_rollback_under_load_reach_every_partition_within_two_seconds() {
    let (broker, topics, dir, app) = setup(2);
    let registry = scratch_registry(dir.path());
    // Registry polling is off (1 h): the change must arrive by the control topic.
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            ("registry: ", "poll_interval: 1h\n  registry: "),
            (
                &format!("registry: {}", repo_root().join("models").display()),
                &format!("registry: {}", registry.display()),
            ),
        ],
    );
    let topology_arg = topology.to_str().unwrap();
    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("group"),
        "w0",
        &dir.path().join("state"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let producer = stream_events(&broker, &topics.events, 400, Arc::clone(&stop));
    // Let the worker join and score with v1 for a while.
    broker.read_topic(&topics.predictions, 2, Duration::from_secs(60), |ms| {
        ms.len() >= 200
    });

    let promoted_at = now_us();
    let out = models_cli(&[
        "promote",
        "--topology",
        topology_arg,
        "--brokers",
        &broker.brokers,
        "ctr",
        "2",
    ]);
    assert!(
        out.contains("champion is now v2") && out.contains("announced"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(4));
    let rolled_back_at = now_us();
    let out = models_cli(&[
        "rollback",
        "--topology",
        topology_arg,
        "--brokers",
        &broker.brokers,
        "ctr",
    ]);
    assert!(out.contains("champion v2 -> v1"), "{out}");
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    let impressions = producer.join().unwrap();

    let messages = read_all(&broker, &topics.predictions, 2, &impressions);
    let last_old = check_switches(&messages, &impressions, &[1, 2, 1]);
    let promote_s = (last_old[0] - promoted_at) as f64 / 1e6;
    let rollback_s = (last_old[1] - rolled_back_at) as f64 / 1e6;
    eprintln!(
        "{} impressions, each scored once; last v1 prediction {promote_s:.3} s after promote, \
         last v2 prediction {rollback_s:.3} s after rollback",
        impressions.len()
    );
    assert!(
        promote_s <= 2.0,
        "promotion took {promote_s} s to reach every partition"
    );
    assert!(
        rollback_s <= 2.0,
        "rollback took {rollback_s} s to reach every partition"
    );
    drop(augur);
}

/// POSTs to the admin API with an optional bearer token; returns the status line.
fn http_post(port: u16, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn registry_polling_and_the_token_guarded_admin_api_switch_models() {
    let (broker, topics, dir, app) = setup(1);
    let registry = scratch_registry(dir.path());
    write_corrupt_version(&registry, 3);
    let port = free_port();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            (
                &format!("registry: {}", repo_root().join("models").display()),
                &format!("registry: {}", registry.display()),
            ),
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
        ],
    );
    let augur = Augur::start_env(
        &topology,
        &broker.brokers,
        &unique("group"),
        "w0",
        &dir.path().join("state"),
        &[("AUGUR_ADMIN_TOKEN", "let-me-in")],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let producer = stream_events(&broker, &topics.events, 300, Arc::clone(&stop));
    broker.read_topic(&topics.predictions, 1, Duration::from_secs(60), |ms| {
        ms.len() >= 100
    });

    // 1. Registry polling alone: no announcement on the control topic.
    let promoted_at = now_us();
    models_cli(&[
        "promote",
        "--topology",
        topology.to_str().unwrap(),
        "--no-notify",
        "ctr",
        "2",
    ]);
    std::thread::sleep(Duration::from_secs(4));

    // 2. The admin API: refused without the right token, then a rollback.
    let denied = http_post(port, "/v1/models/ctr/rollback", None);
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let denied = http_post(port, "/v1/models/ctr/rollback", Some("let-me-out"));
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let rolled_back_at = now_us();
    let ok = http_post(port, "/v1/models/ctr/rollback", Some("let-me-in"));
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("champion v2 -> v1"),
        "{ok}"
    );
    std::thread::sleep(Duration::from_secs(4));

    // 3. Promoting a corrupt version: v1 keeps serving, with an alert.
    models_cli(&[
        "promote",
        "--topology",
        topology.to_str().unwrap(),
        "--no-notify",
        "ctr",
        "3",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let impressions = producer.join().unwrap();

    let messages = read_all(&broker, &topics.predictions, 1, &impressions);
    let last_old = check_switches(&messages, &impressions, &[1, 2, 1]);
    let poll_s = (last_old[0] - promoted_at) as f64 / 1e6;
    let api_s = (last_old[1] - rolled_back_at) as f64 / 1e6;
    eprintln!("switch by registry polling: {poll_s:.3} s; rollback by the admin API: {api_s:.3} s");
    assert!(poll_s <= 2.0, "polling switch took {poll_s} s");
    assert!(api_s <= 2.0, "admin rollback took {api_s} s");

    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("augur_model_champion_version{model=\"ctr\"} 1"),
        "champion gauge missing: {metrics}"
    );
    assert!(metrics.contains("augur_model_load_failures_total{model=\"ctr\"} 1"));
    let alerts = broker.read_topic(&format!("{app}-alerts"), 1, Duration::from_secs(20), |ms| {
        !ms.is_empty()
    });
    let alert = json(alerts.first().expect("an alert record"));
    assert_eq!(alert["alert"], "model_load_failed");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("champion v3 failed to load"),
        "{alert}"
    );
    drop(augur);
}

#[test]
fn a_split_experiment_and_shadows_never_disturb_the_served_predictions() {
    let (broker, topics, dir, app) = setup(2);
    let registry = scratch_registry(dir.path());
    // v3 is corrupt: it must be reported, and never stop the champion.
    write_corrupt_version(&registry, 3);
    let port = free_port();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            (
                &format!("registry: {}", repo_root().join("models").display()),
                &format!("registry: {}", registry.display()),
            ),
            (
                "version: champion",
                "version: champion\n  shadows: [\"2\", \"3\"]",
            ),
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
            (
                "state:\n",
                "experiment:\n  name: ctr-ab\n  mode: split\n  arms:\n    \
                 - { name: control, model: champion, fraction: 0.7 }\n    \
                 - { name: treatment, model: \"2\", fraction: 0.3 }\n\nstate:\n",
            ),
        ],
    );
    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("group"),
        "w0",
        &dir.path().join("state"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let producer = stream_events(&broker, &topics.events, 500, Arc::clone(&stop));
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    let impressions = producer.join().unwrap();
    let predictions = read_all(&broker, &topics.predictions, 2, &impressions);
    let shadows = read_all(
        &broker,
        &format!("{app}-shadow-predictions"),
        2,
        &impressions,
    );

    // Served: every impression once, by the arm its user hashes to.
    let by_event = predictions_by_event(&predictions);
    assert_eq!(by_event.len(), impressions.len());
    let names = golden_features().0;
    let v1 = augur::model::Model::load(&registry.join("ctr/1"), &names).unwrap();
    let v2 = augur::model::Model::load(&registry.join("ctr/2"), &names).unwrap();
    let mut arms: HashMap<String, usize> = HashMap::new();
    let mut served_features = HashMap::new();
    for id in &impressions {
        let records = &by_event[id];
        assert_eq!(records.len(), 1, "{id}");
        let p = &records[0];
        let user = p["user_id"].as_str().unwrap();
        let split = augur::serving::experiment::Split::new(&[0.7, 0.3]);
        let (variant, version) = match split.arm("ctr-ab", user) {
            0 => ("control", 1),
            _ => ("treatment", 2),
        };
        assert_eq!(p["variant"], variant, "{p}");
        assert_eq!(p["version"], version, "{p}");
        *arms.entry(variant.to_owned()).or_default() += 1;
        served_features.insert(id.clone(), feature_row(&names, p));
    }
    eprintln!("impressions by arm: {arms:?}");

    // Shadows: only v2 (v3 is corrupt), only on the shadow topic, scores equal v2's.
    let shadow_by_event = predictions_by_event(&shadows);
    assert_eq!(
        shadow_by_event.len(),
        impressions.len(),
        "every impression shadow-scored"
    );
    let (mut input, mut scores) = (Vec::new(), Vec::new());
    for (id, records) in &shadow_by_event {
        assert_eq!(records.len(), 1, "{id}");
        let s = &records[0];
        assert_eq!(
            (s["variant"].as_str(), s["version"].as_u64()),
            (Some("shadow"), Some(2))
        );
        scores.clear();
        v2.score(&served_features[id], 12, &mut input, &mut scores)
            .unwrap();
        assert!(
            (s["score"].as_f64().unwrap() - scores[0]).abs() < 1e-12,
            "{s}"
        );
    }
    for p in predictions.iter().map(json) {
        assert_ne!(
            p["variant"], "shadow",
            "a shadow prediction on the predictions topic"
        );
    }
    // The served scores are the arm's model's.
    for id in impressions.iter().take(200) {
        let p = &by_event[id][0];
        let model = if p["version"] == 1 { &v1 } else { &v2 };
        scores.clear();
        model
            .score(&served_features[id], 12, &mut input, &mut scores)
            .unwrap();
        assert!((p["score"].as_f64().unwrap() - scores[0]).abs() < 1e-12);
    }

    // The corrupt shadow raised an alert record and a metric.
    let alerts = broker.read_topic(&format!("{app}-alerts"), 1, Duration::from_secs(20), |ms| {
        !ms.is_empty()
    });
    let alert = json(alerts.first().expect("an alert record"));
    assert_eq!(alert["alert"], "model_load_failed");
    assert!(
        alert["message"].as_str().unwrap().contains("shadow v3"),
        "{alert}"
    );
    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains("augur_model_load_failures_total{model=\"ctr\"} 1"));
    assert!(metrics.contains("augur_shadow_disagreements_total{model=\"ctr\",version=\"2\"}"));
    assert!(metrics.contains("augur_shadow_abs_score_delta_count{model=\"ctr\",version=\"2\"}"));
    drop(augur);
}

/// The logged feature vector of a prediction, in topology order.
fn feature_row(names: &[String], p: &serde_json::Value) -> Vec<f64> {
    names
        .iter()
        .map(|n| p["features"][n].as_f64().unwrap())
        .collect()
}

/// A consumer that keeps its place, for a closed loop.
fn follower(broker: &Broker, topic: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("group.id", unique("follower"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    consumer
}

#[test]
fn the_bandit_learns_the_best_arm_from_in_stream_rewards_across_a_crash() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (broker, topics, dir, app) = setup(1);
    let port = free_port();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
            (
                "state:\n",
                "experiment:\n  name: ctr-bandit\n  mode: bandit\n  seed: 42\n  arms:\n    \
                 - { name: a, model: champion }\n    - { name: b, model: champion }\n    \
                 - { name: c, model: champion }\n\nstate:\n",
            ),
        ],
    );
    let state = dir.path().join("state");
    let group = unique("group");
    let mut augur = Some(Augur::start(
        &topology,
        &broker.brokers,
        &group,
        "w0",
        &state,
    ));
    let rates: HashMap<&str, f64> = [("a", 0.04), ("b", 0.05), ("c", 0.07)].into();
    let producer = broker.producer();
    let predictions = follower(&broker, &topics.predictions);
    let send = |key: &str, payload: String| {
        let mut record = BaseRecord::to(&topics.events).key(key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    };
    let mut env = augur::gen::Rng::new(99);
    // event_id -> (variant, user, item, ts); decisions in event order.
    let mut decided: HashMap<String, String> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let (rounds, per_round, step_ms) = (47, 500, 2_000);
    let start_ts = 1_767_225_600_000i64;
    let mut regret = 0.0;
    let mut curve = Vec::new();
    let mut replayed = 0;
    for round in 0..rounds {
        if round == 20 {
            // SIGKILL mid-experiment: posteriors and pending rewards come back from the
            // checkpoint, and re-emitted predictions repeat their variant.
            augur.take().unwrap().kill();
            augur = Some(Augur::start(
                &topology,
                &broker.brokers,
                &group,
                "w0",
                &state,
            ));
        }
        let mut round_events = HashMap::new();
        for i in 0..per_round {
            let n = round * per_round + i;
            let ts = start_ts + n as i64 * step_ms;
            let (id, user, item) = (
                format!("imp-{n}"),
                format!("u{}", n % 997),
                format!("item-{n}"),
            );
            send(
                &user,
                format!(
                    r#"{{"event_id":"{id}","user_id":"{user}","ts":{ts},"type":"impression","item_id":"{item}","category":"c1"}}"#
                ),
            );
            round_events.insert(id.clone(), (user, item, ts));
            order.push(id);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut waiting = per_round;
        let mut clicks = Vec::new();
        while waiting > 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: {waiting} predictions missing"
            );
            let Some(message) = predictions.poll(Duration::from_millis(100)) else {
                continue;
            };
            let p = json(&message.unwrap().detach());
            let id = p["event_id"].as_str().unwrap().to_owned();
            let variant = p["variant"].as_str().unwrap().to_owned();
            if let Some(first) = decided.get(&id) {
                assert_eq!(first, &variant, "{id} re-emitted with another variant");
                replayed += 1;
                continue;
            }
            decided.insert(id.clone(), variant.clone());
            let Some((user, item, ts)) = round_events.get(&id) else {
                continue;
            };
            waiting -= 1;
            regret += rates["c"] - rates[variant.as_str()];
            if decided.len() % 2_000 == 0 {
                curve.push((decided.len(), regret));
            }
            if env.next_f64() < rates[variant.as_str()] {
                clicks.push((user.clone(), item.clone(), ts + 60_000));
            }
        }
        for (user, item, ts) in clicks {
            send(
                &user,
                format!(
                    r#"{{"event_id":"click-{item}","user_id":"{user}","ts":{ts},"type":"click","item_id":"{item}","category":"c1"}}"#
                ),
            );
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }
    let last: Vec<&String> = order[order.len() - 5_000..].iter().collect();
    let to_best = last.iter().filter(|id| decided[**id] == "c").count();
    eprintln!("regret curve (decisions, cumulative regret vs always c):");
    for (t, r) in &curve {
        eprintln!("  {t:>6} {r:>8.1}");
    }
    let metrics = http_get(port, "/metrics");
    let means: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("augur_bandit_posterior_mean{"))
        .collect();
    let rewards: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("augur_bandit_rewards_total{"))
        .collect();
    eprintln!("{means:#?}\n{rewards:#?}\nre-emitted after the crash: {replayed}; last 5000 to c: {to_best}");
    let settled: f64 = rewards
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(settled >= 20_000.0, "only {settled} rewards settled");
    assert!(
        to_best >= 4_500,
        "{to_best} of the last 5000 decisions went to the best arm"
    );
    drop(augur);
}
