//! `augur validate`: a valid file passes; each invalid one is refused with every
//! problem named by its path.

mod common;

use std::process::Command;

use common::*;

fn validate(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(augur_bin())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

fn reference() -> String {
    std::fs::read_to_string(repo_root().join("topologies/ctr.yaml")).unwrap()
}

fn with(from: &str, to: &str) -> String {
    let text = reference();
    assert!(text.contains(from), "reference topology has no {from:?}");
    text.replacen(from, to, 1)
}

#[test]
fn the_reference_topology_is_valid() {
    let (ok, out) = validate(&reference());
    assert!(ok, "{out}");
    assert!(out.contains("ok (12 features"), "{out}");
}

#[test]
fn invalid_topologies_are_refused_with_the_path_of_each_problem() {
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            with(
                "window: 24h, resolution: 1h }",
                "window: 1.5h, resolution: 1h }",
            ),
            vec!["features[3].window: \"1.5h\": whole units only"],
        ),
        (
            with("kind: lifetime_count", "kind: lifetime_counter"),
            vec!["features[11].kind: unknown kind \"lifetime_counter\""],
        ),
        (
            with("numerator: clicks_1h,", "numerator: clicks_2h,"),
            vec!["features[2].numerator: \"clicks_2h\" is not a feature declared before"],
        ),
        (
            with(
                "window: 1h,  resolution: 1m }",
                "window: 1h,  resolution: 7m }",
            ),
            vec!["features[0].window: 1h is not a multiple of the resolution 7m"],
        ),
        (
            with("codec: json            # json | protobuf", "codec: avro"),
            vec!["source.codec: unknown codec \"avro\""],
        ),
        (
            with("event_types: [impression]", "event_types: [view]"),
            vec!["scoring.event_types[0]: unknown event type \"view\""],
        ),
        (
            with("topic: predictions,", "topic: \"bad topic!\","),
            vec!["sinks.predictions.topic: \"bad topic!\" is not a legal Kafka topic name"],
        ),
        (
            with("name: clicks_1h,", "name: impressions_1h,"),
            vec!["features[1].name: duplicate feature name \"impressions_1h\""],
        ),
        (
            with(
                "filter: { type: click },      window: 1h",
                "filter: { type: [click, scroll] }, window: 1h",
            ),
            vec!["features[1].filter.type[1]: unknown event type \"scroll\""],
        ),
        (
            with("checkpoint_interval: 1s", "checkpoint_interval: 0s"),
            vec!["state.checkpoint_interval: must be greater than zero"],
        ),
        (
            with(
                "checkpoint_interval: 1s",
                "checkpoint_interval: 1s\n  backlog_checkpoint_interval: 500ms",
            ),
            vec!["state.backlog_checkpoint_interval: must not be shorter than state.checkpoint_interval (1s)"],
        ),
        (
            with(
                "checkpoint_interval: 1s",
                "checkpoint_interval: 1s\n  backlog_checkpoint_interval: soon",
            ),
            vec!["state.backlog_checkpoint_interval: "],
        ),
        (
            with(
                "kind: since_last, unit: 1s,",
                "kind: since_last, unit: 1s, window: 1h,",
            ),
            vec!["features[9].window: not used by kind \"since_last\""],
        ),
        (
            with(
                "kind: mean\n    field: amount",
                "kind: mean\n    field: category",
            ),
            vec!["features[7].field: \"category\" is not a numeric field"],
        ),
        (
            with("source:\n  topic", "sourc:\n  topic"),
            vec!["unknown field `sourc`"],
        ),
        (
            with("  max_batch: 256", "  max_batch: lots"),
            vec!["scoring.max_batch: invalid type"],
        ),
        (
            with("lateness: 1h ", "lateness: soon "),
            vec!["source.lateness: "],
        ),
        (
            with("listen: 127.0.0.1:9898", "listen: everywhere"),
            vec!["admin.listen: expected host:port"],
        ),
        // Several problems at once: every one is listed.
        (
            with("codec: json            # json | protobuf", "codec: xml")
                .replace("resolution: 1m }", "resolution: 0m }"),
            vec![
                "source.codec: unknown codec \"xml\"",
                "features[0].resolution: must be greater than zero",
                "features[1].resolution: must be greater than zero",
            ],
        ),
        (
            with(
                "state:\n",
                "experiment:\n  name: e\n  mode: split\n  arms:\n    - { name: a, model: champion, fraction: 0.6 }\n    - { name: a, model: \"2\", fraction: 0.6 }\nstate:\n",
            ),
            vec![
                "experiment.arms[1].name: arm names must be non-empty and unique (\"a\")",
                "experiment.arms: the fractions add up to 1.2, not 1",
            ],
        ),
        (
            with(
                "state:\n",
                "experiment:\n  name: e\n  mode: bandit\n  arms:\n    - { name: a, model: champion, fraction: 0.5 }\n    - { name: b, model: \"\" }\nstate:\n",
            ),
            vec![
                "experiment.arms[0].fraction: a bandit chooses arms itself; remove the fraction",
                "experiment.arms[1].model: must not be empty",
            ],
        ),
        (
            with(
                "state:\n",
                "experiment:\n  name: e\n  mode: epsilon\n  arms: []\nstate:\n",
            ),
            vec!["experiment.mode: unknown mode \"epsilon\" (expected split or bandit)"],
        ),
        (
            with("version: champion", "version: champion\n  poll_interval: soon"),
            vec!["model.poll_interval:"],
        ),
    ];
    assert!(cases.len() >= 8);
    for (text, expected) in cases {
        let (ok, out) = validate(&text);
        assert!(!ok, "accepted an invalid topology; expected {expected:?}");
        for needle in expected {
            assert!(out.contains(needle), "expected {needle:?} in:\n{out}");
        }
    }
}

fn validate_with_env(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(augur_bin())
        .arg("validate")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn exactly_once_delivery_is_validated_with_the_path_of_each_bad_setting() {
    // Accepted on its own, in the file or from the environment.
    let eos = with("app: ctr\n", "app: ctr\ndelivery: exactly_once\n");
    let (ok, out) = validate(&eos);
    assert!(ok, "{out}");
    let (ok, out) = validate_with_env(&reference(), &[("AUGUR__DELIVERY", "exactly_once")]);
    assert!(ok, "{out}");
    // Settings that would break the transactions are refused, each with its path.
    let bad = eos.replace(
        "  producer: {}",
        "  producer:\n    transactional.id: mine\n    enable.idempotence: false",
    );
    let (ok, out) = validate(&bad);
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("kafka.producer.transactional.id: augur sets the transactional id itself"),
        "{out}"
    );
    assert!(
        out.contains("kafka.producer.enable.idempotence: delivery: exactly_once needs the idempotent producer"),
        "{out}"
    );
    // From the environment, the variable is named.
    let (ok, out) = validate_with_env(
        &reference(),
        &[
            ("AUGUR__DELIVERY", "exactly_once"),
            ("AUGUR_KAFKA__CONSUMER__ISOLATION_LEVEL", "read_uncommitted"),
        ],
    );
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("kafka.consumer.isolation.level (set by AUGUR_KAFKA__CONSUMER__ISOLATION_LEVEL): delivery: exactly_once"),
        "{out}"
    );
    let (ok, out) = validate_with_env(&reference(), &[("AUGUR__DELIVERY", "twice")]);
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("delivery (set by AUGUR__DELIVERY): unknown delivery \"twice\""),
        "{out}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(augur_bin())
        .args(["validate", "/nonexistent/topology.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read topology /nonexistent/topology.yaml"));
}
