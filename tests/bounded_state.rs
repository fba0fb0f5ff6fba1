//! The hot state's byte budget: with far more users than fit, the least recently
//! touched leave memory after each checkpoint, and the features stay exactly right.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_byte_budget_bounds_hot_state_and_features_stay_exact() {
    const EVENTS: u64 = 300_000;
    const BUDGET: f64 = 4.0 * 1024.0 * 1024.0;
    let broker = Broker::start();
    let topics = Topics::create(&broker, 4);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[
            ("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
            ("idle_after: 10m", "idle_after: 10m\n  max_hot_bytes: 4MiB"),
        ],
    );
    let out = Command::new(augur_bin())
        .args(["gen", "--users", "200000", "--seed", "5", "--events"])
        .arg(EVENTS.to_string())
        .args(["--to-topic", &topics.events, "--brokers", &broker.brokers])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        "w0",
        &dir.path().join("state"),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let seen = metric_sum(&http_get(port, "/metrics"), "augur_source_events_total");
        if seen >= EVENTS as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "read {seen} of {EVENTS} events");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3)); // a checkpoint after the last event
    let body = http_get(port, "/metrics");
    let (hot, users, evicted) = (
        metric_sum(&body, "augur_state_hot_bytes"),
        metric_sum(&body, "augur_state_hot_users"),
        metric_sum(&body, "augur_state_budget_evictions_total"),
    );
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", augur.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "hot state {:.2} MiB for {users} users in memory (budget 4 MiB); {evicted} evictions; RSS {} MiB",
        hot / 1048576.0,
        rss_kb / 1024
    );
    assert!(hot <= BUDGET, "hot state {hot} bytes over the 4 MiB budget");
    assert!(evicted > 0.0, "the budget never had to evict");

    // Evicted users came back from sled when they returned: the stream's logged
    // features equal the backfill's, event for event.
    let report = Command::new(augur_bin())
        .args(["skew-report", "--topology"])
        .arg(&topology)
        .args([
            "--logged",
            &topics.predictions,
            "--events",
            &topics.events,
            "--brokers",
            &broker.brokers,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout).into_owned()
        + &String::from_utf8_lossy(&report.stderr);
    assert!(report.status.success(), "{text}");
    eprintln!("{}", text.lines().take(3).collect::<Vec<_>>().join("\n"));
    drop(augur);
}
