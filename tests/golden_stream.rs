//! The golden workload through the real binary against a real broker (tansu): every
//! impression's logged features equal the pandas golden file, also across SIGKILLs,
//! and no event is ever applied twice to state.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Headers, Message, OwnedMessage};

const PARTITIONS: i32 = 4;

#[test]
fn golden_stream_features_match_pandas() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let listen = format!("listen: 127.0.0.1:{admin}");
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[("listen: 127.0.0.1:0", listen.as_str())],
    );
    produce_keyed(&broker.producer(), &topics.events, &golden_events());

    let state = dir.path().join("state");
    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        &unique("i"),
        &state,
    );
    // Alive at once; ready only when the group has assigned and restored partitions
    // (tansu takes seconds to form a group).
    assert!(http_get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(
        http_get(admin, "/readyz").starts_with("HTTP/1.1 503"),
        "ready before any partition is assigned"
    );
    let predictions = wait_for_all(
        &broker,
        &topics.predictions,
        PARTITIONS,
        Duration::from_secs(180),
    );
    assert!(
        http_get(admin, "/readyz").starts_with("HTTP/1.1 200"),
        "ready once partitions are assigned"
    );
    assert!(
        augur.terminate(Duration::from_secs(30)),
        "augur exits cleanly on SIGTERM"
    );
    check_against_golden(&predictions);
    check_state_counts(&state, &topics.events, PARTITIONS);
}

#[test]
fn golden_stream_survives_sigkill() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    // Each SIGKILL lands 0.3-0.7 s after a slice is produced, before the next 2 s
    // checkpoint, so processed-but-unchecked work is lost and must be redone from the
    // sled offset without applying any event twice.
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("checkpoint_interval: 1s", "checkpoint_interval: 2s"),
            ("max_poll_interval: 30s", "max_poll_interval: 10s"),
        ],
    );
    let state = dir.path().join("state");
    let (group, instance) = (unique("g"), unique("i"));
    let events = golden_events();
    let producer = broker.producer();
    let slices: Vec<&[(String, String)]> = events.chunks(events.len() / 5 + 1).collect();
    let impressions_before = |n: usize| {
        slices[..n]
            .iter()
            .map(|s| s.iter().filter(|(_, l)| l.contains("impression")).count())
            .sum::<usize>()
    };
    let started = Instant::now();

    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, slices[0]);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        impressions_before(1),
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_millis(2500)); // a checkpoint covers slice 0
    produce_keyed(&producer, &topics.events, slices[1]);
    std::thread::sleep(Duration::from_millis(700));
    augur.kill(); // first SIGKILL: slice 1 in flight or processed but not checkpointed

    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, slices[2]);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        impressions_before(3),
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_millis(2500));
    produce_keyed(&producer, &topics.events, slices[3]);
    std::thread::sleep(Duration::from_millis(300));
    augur.kill(); // second SIGKILL

    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, slices[4]);
    let predictions = wait_for_all(
        &broker,
        &topics.predictions,
        PARTITIONS,
        Duration::from_secs(180),
    );
    assert!(
        augur.terminate(Duration::from_secs(30)),
        "augur exits cleanly on SIGTERM"
    );
    eprintln!("stream with 2 SIGKILLs took {:?}", started.elapsed());
    check_against_golden(&predictions);
    check_state_counts(&state, &topics.events, PARTITIONS);
}

#[test]
fn golden_stream_survives_a_kill_loop() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("max_poll_interval: 30s", "max_poll_interval: 10s"),
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{admin}")),
        ],
    );
    let state = dir.path().join("state");
    let (group, instance) = (unique("g"), unique("i"));
    let events = golden_events();
    let producer = broker.producer();
    let slices: Vec<&[(String, String)]> = events.chunks(events.len() / 6 + 1).collect();
    // SIGKILL at seeded random points after the worker has its partitions back: in the
    // middle of the slice, between checkpoints (every 1 s), or idle.
    let mut rng = augur::gen::Rng::new(20261127);
    let started = Instant::now();
    let mut kills = Vec::new();
    for slice in &slices[..5] {
        let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(admin, "/readyz").starts_with("HTTP/1.1 200") {
            assert!(Instant::now() < deadline, "not ready after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        produce_keyed(&producer, &topics.events, slice);
        let after = Duration::from_millis(rng.below(1_500));
        std::thread::sleep(after);
        augur.kill();
        kills.push(after);
    }
    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, slices[5]);
    let predictions = wait_for_all(
        &broker,
        &topics.predictions,
        PARTITIONS,
        Duration::from_secs(240),
    );
    assert!(augur.terminate(Duration::from_secs(30)));
    eprintln!(
        "5 SIGKILLs at {kills:?} after producing each slice; stream done in {:?}",
        started.elapsed()
    );
    check_against_golden(&predictions);
    check_state_counts(&state, &topics.events, PARTITIONS);
}

#[test]
fn sigterm_drains_within_the_grace_period_and_the_next_start_re_emits_nothing() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    // A long checkpoint interval: only the drain's final checkpoint can cover the
    // first half.
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[("checkpoint_interval: 1s", "checkpoint_interval: 1h")],
    );
    let state = dir.path().join("state");
    let (group, instance) = (unique("g"), unique("i"));
    let events = golden_events();
    let (first, second) = events.split_at(events.len() / 2);
    let first_impressions = first
        .iter()
        .filter(|(_, l)| l.contains("impression"))
        .count();
    let producer = broker.producer();

    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, first);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        first_impressions,
        Duration::from_secs(120),
    );
    let stopping = Instant::now();
    assert!(
        augur.terminate(Duration::from_secs(25)),
        "SIGTERM: augur did not exit cleanly within the 25 s grace period"
    );
    let drain = stopping.elapsed();

    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, second);
    let (predictions, re_emitted) =
        finish_and_count_re_emissions(&broker, &topics, PARTITIONS, augur);
    eprintln!("drain took {drain:?}; {re_emitted} predictions re-emitted after the restart");
    assert_eq!(
        re_emitted, 0,
        "the restart re-emitted acknowledged predictions"
    );
    check_against_golden(&predictions);
    check_state_counts(&state, &topics.events, PARTITIONS);
}

#[test]
fn a_worker_without_local_state_restores_from_the_changelog() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let app = unique("app");
    broker.create_topic(&format!("{app}-changelog"), PARTITIONS);
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[("app: ctr", &format!("app: {app}"))],
    );
    let (group, instance) = (unique("g"), unique("i"));
    let events = golden_events();
    let (first, second) = events.split_at(events.len() / 2);
    let first_impressions = first
        .iter()
        .filter(|(_, l)| l.contains("impression"))
        .count();
    let producer = broker.producer();

    // The first pod: processes the first half, drains, and its disk is lost.
    let old_state = dir.path().join("pod-a");
    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &old_state);
    produce_keyed(&producer, &topics.events, first);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        first_impressions,
        Duration::from_secs(120),
    );
    assert!(augur.terminate(Duration::from_secs(25)));
    std::fs::remove_dir_all(&old_state).unwrap();

    // The next pod starts empty: it must restore the state from the changelog and go
    // on from there, not replay the input from the beginning.
    let new_state = dir.path().join("pod-b");
    let augur = Augur::start(&topology, &broker.brokers, &group, &instance, &new_state);
    produce_keyed(&producer, &topics.events, second);
    let (predictions, re_emitted) =
        finish_and_count_re_emissions(&broker, &topics, PARTITIONS, augur);
    eprintln!("{re_emitted} predictions re-emitted after the restore");
    assert_eq!(re_emitted, 0, "the input was replayed instead of restored");
    check_against_golden(&predictions);
    check_state_counts(&new_state, &topics.events, PARTITIONS);
    // Each restore read its partition up to a fence it appended, not until it was
    // quiet: every partition of the changelog holds a fence.
    let fenced_partitions = |records: &[OwnedMessage]| {
        records
            .iter()
            .filter(|m| {
                m.headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == "augur.fence"))
            })
            .map(|m| m.partition())
            .collect::<std::collections::HashSet<i32>>()
    };
    let changelog = broker.read_topic(
        &format!("{app}-changelog"),
        PARTITIONS,
        Duration::from_secs(60),
        |records| fenced_partitions(records).len() == PARTITIONS as usize,
    );
    assert_eq!(
        fenced_partitions(&changelog).len(),
        PARTITIONS as usize,
        "changelog partitions with a fence"
    );
}

/// A tmpfs of a fixed size, unmounted on drop: a disk that really fills up.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} failed: this test needs root (CAP_SYS_ADMIN) to make a disk that fills up",
            path.display()
        );
        SmallDisk { path }
    }

    /// Writes a file until the disk refuses more; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Reads the alerts topic until a record with this alert and state shows up.
fn wait_for_alert(broker: &Broker, topic: &str, alert: &str, state: &str) -> serde_json::Value {
    let matches = |m: &rdkafka::message::OwnedMessage| {
        use rdkafka::Message;
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).ok()?;
        (v["alert"] == alert && v["state"] == state).then_some(v)
    };
    let messages = broker.read_topic(topic, 1, Duration::from_secs(60), |msgs| {
        msgs.iter().any(|m| matches(m).is_some())
    });
    messages
        .iter()
        .find_map(matches)
        .unwrap_or_else(|| panic!("no {alert} {state} record on {topic} within 60 s"))
}

#[test]
fn a_full_disk_pauses_the_partitions_with_an_alert_and_they_resume_once_space_frees() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path().join("disk"), "32m");
    let app = unique("app");
    let alerts = format!("{app}-alerts");
    broker.create_topic(&alerts, 1);
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[("app: ctr", &format!("app: {app}"))],
    );
    let state = disk.path.join("state");
    let (group, instance) = (unique("g"), unique("i"));
    let events = golden_events();
    let (first, second) = events.split_at(events.len() / 2);
    let first_impressions = first
        .iter()
        .filter(|(_, l)| l.contains("impression"))
        .count();
    let producer = broker.producer();

    let mut augur = Augur::start(&topology, &broker.brokers, &group, &instance, &state);
    produce_keyed(&producer, &topics.events, first);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        first_impressions,
        Duration::from_secs(120),
    );
    // The disk fills up; the next checkpoints cannot be written.
    let filler = disk.fill();
    produce_keyed(&producer, &topics.events, second);
    let firing = wait_for_alert(&broker, &alerts, "state_store_failed", "firing");
    eprintln!("alert: {firing}");
    assert!(
        firing["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "the alert names the cause: {firing}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        augur.child.try_wait().unwrap().is_none(),
        "a full disk must pause the worker, not stop it"
    );
    // Space frees up: the store reopens and the partitions resume by themselves.
    std::fs::remove_file(filler).unwrap();
    let resolved = wait_for_alert(&broker, &alerts, "state_store_failed", "resolved");
    eprintln!("alert: {resolved}");
    let (predictions, re_emitted) =
        finish_and_count_re_emissions(&broker, &topics, PARTITIONS, augur);
    eprintln!("{re_emitted} predictions re-emitted after the store recovered");
    check_against_golden(&predictions);
    check_state_counts(&state, &topics.events, PARTITIONS);
}
