//! Scale-out (issue 7): several workers in one group split an 8-partition input; when
//! one dies (SIGKILL) and another joins, partitions move with their state through the
//! `<app>-changelog` topic. Against a real broker (tansu) and the real binary: the
//! final features equal golden, re-emitted predictions are identical, and no event is
//! applied twice (the changelog's and the last owners' lifetime counts equal golden).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const PARTITIONS: i32 = 8;

/// tansu 0.6 updates a member's last contact on heartbeats only, not on JoinGroup or
/// SyncGroup, and holds each of those 3 s for a static member: a member going through
/// two or three rebalance rounds in a row goes 12-18 s without a heartbeat, and with a
/// 10 s session it is expired while alive (seen: 14.5 s), which can wedge the group
/// (its leader is then a member id that no longer exists). 30 s covers that; it is also
/// how long a dead worker's partitions wait.
const SESSION_TIMEOUT: &str = "30s";

struct Worker {
    name: String,
    augur: Augur,
    admin: u16,
    state: PathBuf,
}

impl Worker {
    fn start(topology: &Path, broker: &Broker, group: &str, dir: &Path, name: &str) -> Worker {
        let admin = free_port();
        let state = dir.join(name);
        let listen = format!("127.0.0.1:{admin}");
        let augur = Augur::start_env(
            topology,
            &broker.brokers,
            group,
            &format!("{group}-{name}"),
            &state,
            &[
                ("AUGUR_ADMIN_LISTEN", listen.as_str()),
                ("AUGUR_SESSION_TIMEOUT", SESSION_TIMEOUT),
            ],
        );
        Worker {
            name: name.to_owned(),
            augur,
            admin,
            state,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        metric_sum(&metrics(self.admin), name)
    }

    fn assigned(&self) -> usize {
        self.metric("augur_source_assigned_partitions") as usize
    }
}

/// Waits until the workers together hold every partition, unchanged for `settle`;
/// returns how long that took (from the call), or None after `timeout`.
fn wait_all_assigned(workers: &[&Worker], settle: Duration, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut since: Option<(Instant, Vec<usize>)> = None;
    while started.elapsed() < timeout {
        let counts: Vec<usize> = workers.iter().map(|w| w.assigned()).collect();
        if counts.iter().sum::<usize>() == PARTITIONS as usize {
            match &since {
                Some((at, before)) if *before == counts => {
                    if at.elapsed() >= settle {
                        eprintln!(
                            "partitions per worker: {:?}",
                            workers
                                .iter()
                                .zip(&counts)
                                .map(|(w, c)| format!("{}={c}", w.name))
                                .collect::<Vec<_>>()
                        );
                        return Some(*at - started);
                    }
                }
                _ => since = Some((Instant::now(), counts)),
            }
        } else {
            since = None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn impressions_in(events: &[(String, String)]) -> usize {
    events
        .iter()
        .filter(|(_, l)| l.contains("\"type\": \"impression\""))
        .count()
}

#[test]
fn three_workers_lose_one_gain_one_and_the_state_moves_with_the_partitions() {
    let started = Instant::now();
    let broker = Broker::start();
    let topics = Topics::create(&broker, PARTITIONS);
    let app = unique("app");
    let changelog = format!("{app}-changelog");
    broker.create_topic(&changelog, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("app: ctr", &format!("app: {app}")),
            ("max_poll_interval: 30s", "max_poll_interval: 10s"),
        ],
    );
    let group = unique("g");
    let events = golden_events();
    let (first, rest) = events.split_at(events.len() * 2 / 5);
    let (second, third) = rest.split_at(rest.len() / 2);
    let producer = broker.producer();

    // w1 joins first and so leads the group. The test kills w2: when tansu 0.6 drops
    // a dead leader, the group keeps the dead member id as its leader and no SyncGroup
    // succeeds again (README, tansu caveats).
    let w1 = Worker::start(&topology, &broker, &group, dir.path(), "w1");
    let w2 = Worker::start(&topology, &broker, &group, dir.path(), "w2");
    let w3 = Worker::start(&topology, &broker, &group, dir.path(), "w3");
    let formed = wait_all_assigned(
        &[&w1, &w2, &w3],
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .expect("3 workers did not hold all 8 partitions within 60 s");
    eprintln!("group of 3 formed after {formed:?}");
    for w in [&w1, &w2, &w3] {
        assert!(w.assigned() > 0, "{} got no partition", w.name);
    }

    produce_keyed(&producer, &topics.events, first);
    wait_for(
        &broker,
        &topics.predictions,
        PARTITIONS,
        impressions_in(first),
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_millis(1500)); // checkpointed to the changelog

    // SIGKILL w2 while it processes the second slice: what it did since its last
    // checkpoint is lost and must be redone by the partitions' next owners.
    produce_keyed(&producer, &topics.events, second);
    std::thread::sleep(Duration::from_millis(400));
    let w2_partitions = w2.assigned();
    let killed = Instant::now();
    let Worker {
        augur,
        state: w2_state,
        ..
    } = w2;
    augur.kill();
    eprintln!("killed w2 (it held {w2_partitions} partitions)");

    // tansu 0.6 drops a member whose session timed out from the group without starting
    // a new generation: its partitions stay assigned to it (nobody consumes them) until
    // the membership changes again. See what the survivors do on their own first.
    let deadline = killed + Duration::from_secs(60);
    let dropped = loop {
        let members = broker.group_members(&group);
        if members.len() == 2 && !members.iter().any(|m| m.contains("-w2-")) {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "w2 still in the group 60 s after the kill: {members:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let alone = wait_all_assigned(&[&w1, &w3], Duration::from_secs(3), Duration::from_secs(10));
    eprintln!(
        "w2 dropped from the group {dropped:?} after the kill; 10 s later w1 and w3 hold {} of {PARTITIONS} partitions{}",
        w1.assigned() + w3.assigned(),
        if alone.is_some() { "" } else { " (tansu left the rest assigned to the dead member)" }
    );

    // A new worker joins with an empty disk: that changes the membership, the group
    // rebalances, and whatever w4 is assigned it restores from the changelog.
    let w4 = Worker::start(&topology, &broker, &group, dir.path(), "w4");
    let joined = Instant::now();
    let rebalanced = wait_all_assigned(
        &[&w1, &w3, &w4],
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .expect("w1, w3 and w4 did not hold all 8 partitions within 60 s of w4's start");
    eprintln!(
        "all partitions owned again {:?} after w4 started, {:?} after the kill",
        rebalanced,
        joined.duration_since(killed) + rebalanced
    );

    produce_keyed(&producer, &topics.events, third);
    let (predictions, re_emitted) =
        read_all_predictions(&broker, &topics, PARTITIONS, Duration::from_secs(120));
    let mut restored_users = Vec::new();
    let mut restore_seconds = Vec::new();
    for w in [&w1, &w3, &w4] {
        restored_users.push((w.name.clone(), w.metric("augur_state_restored_users_total")));
        restore_seconds.push((
            w.name.clone(),
            w.metric("augur_state_restore_duration_seconds_count"),
            w.metric("augur_state_restore_duration_seconds_sum"),
        ));
    }
    let dirs: Vec<PathBuf> = [&w1, &w3, &w4].iter().map(|w| w.state.clone()).collect();
    for w in [w1, w3, w4] {
        assert!(
            w.augur.terminate(Duration::from_secs(25)),
            "{} did not exit cleanly on SIGTERM",
            w.name
        );
    }
    eprintln!(
        "scale-out: {re_emitted} events predicted more than once; restored users {restored_users:?}; \
         restores (worker, count, seconds) {restore_seconds:?}; took {:?}",
        started.elapsed()
    );

    let duplicates = check_against_golden(&predictions);
    assert!(duplicates >= re_emitted);
    let w4_restored = restored_users.iter().find(|(n, _)| n == "w4").unwrap().1;
    assert!(
        w4_restored > 0.0,
        "w4 started empty and restored no user from the changelog"
    );
    let from_changelog = check_changelog_counts(&broker, &changelog, PARTITIONS);
    let mut all_dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    all_dirs.push(&w2_state);
    let sled = check_latest_state_counts(&all_dirs, &topics.events, PARTITIONS);
    for (partition, (changelog_offset, dirs)) in from_changelog.iter().zip(&sled).enumerate() {
        let newest = dirs.iter().flatten().max().copied();
        assert_eq!(
            newest,
            Some(*changelog_offset),
            "partition {partition}: the newest local checkpoint and the changelog disagree"
        );
    }
}
