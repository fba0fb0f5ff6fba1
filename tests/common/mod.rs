//! Shared test harness: a real tansu broker per test, the real `augur` binary, and
//! the golden data. Each test gets its own broker port, topics, group and state dir.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn augur_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_augur"))
}

/// A random-enough suffix for topic, group and instance names.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tansu binary: `$AUGUR_TEST_TANSU`, else `tansu` on PATH or in ~/.cargo/bin.
fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("AUGUR_TEST_TANSU") {
        return PathBuf::from(path);
    }
    let home_bin =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    if home_bin.is_file() {
        return home_bin;
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("tansu"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!("tansu not found: run the tests with tests/run.sh, which installs it (cargo install tansu --locked --features dynostore)")
    })
}

/// A tansu broker with in-memory storage, killed on drop.
///
/// Keep consumer session timeouts at 10 s or more against it: tansu 0.6 holds each
/// JoinGroup and SyncGroup of a static member for 3 s, and a member's first heartbeat
/// after a 6 s session timeout finds it already expired.
pub struct Broker {
    child: Child,
    pub brokers: String,
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stderr(Stdio::null())
            .stdout(match std::env::var("AUGUR_TEST_TANSU_LOG") {
                Ok(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                Err(_) => Stdio::null(),
            })
            .spawn()
            .expect("starting tansu");
        let brokers = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&brokers).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {brokers} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, brokers }
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = rt
            .block_on(admin.create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
            .expect("create_topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("message.max.bytes", "10000000")
            .create()
            .unwrap()
    }

    /// Reads every record of a topic currently available, until `done` says so or the
    /// timeout passes.
    pub fn read_topic(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
        mut done: impl FnMut(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("receive.message.max.bytes", "100000000")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                // Under a steady stream the topic is never quiet: ask `done` every
                // 256 records too.
                Some(Ok(m)) => {
                    out.push(m.detach());
                    if out.len() % 256 != 0 {
                        continue;
                    }
                }
                Some(Err(e)) => eprintln!("reader: {e}"),
                None => {}
            }
            if done(&out) {
                break;
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Topic names for one test run.
pub struct Topics {
    pub events: String,
    pub predictions: String,
    pub dead_letter: String,
}

impl Topics {
    pub fn create(broker: &Broker, partitions: i32) -> Topics {
        let t = Topics {
            events: unique("events"),
            predictions: unique("predictions"),
            dead_letter: unique("dlq"),
        };
        broker.create_topic(&t.events, partitions);
        broker.create_topic(&t.predictions, partitions);
        broker.create_topic(&t.dead_letter, 1);
        t
    }
}

/// Writes a copy of the reference topology with this test's topics, codec and
/// registry, and returns its path.
pub fn write_topology(dir: &Path, topics: &Topics, codec: &str) -> PathBuf {
    write_topology_with(dir, topics, codec, &[])
}

/// Like [`write_topology`], with further `(from, to)` text replacements.
pub fn write_topology_with(
    dir: &Path,
    topics: &Topics,
    codec: &str,
    extra: &[(&str, &str)],
) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("topologies/ctr.yaml")).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "topology has no {from:?}");
        text.replacen(from, to, 1)
    };
    let text = replace(
        text,
        "topic: user-events",
        &format!("topic: {}", topics.events),
    );
    let text = replace(
        text,
        "codec: json            # json | protobuf",
        &format!("codec: {codec}"),
    );
    let text = replace(
        text,
        "topic: predictions,",
        &format!("topic: {},", topics.predictions),
    );
    let text = replace(
        text,
        "topic: dead-letter",
        &format!("topic: {}", topics.dead_letter),
    );
    let text = replace(
        text,
        "registry: ../models",
        &format!("registry: {}", repo_root().join("models").display()),
    );
    let mut text = replace(text, "listen: 127.0.0.1:9898", "listen: 127.0.0.1:0");
    for (from, to) in extra {
        text = replace(text, from, to);
    }
    let path = dir.join("topology.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `augur run` process.
pub struct Augur {
    pub child: Child,
}

impl Augur {
    pub fn start(
        topology: &Path,
        brokers: &str,
        group: &str,
        instance: &str,
        state_dir: &Path,
    ) -> Augur {
        Self::start_env(topology, brokers, group, instance, state_dir, &[])
    }

    /// Like [`Augur::start`], with extra environment variables.
    pub fn start_env(
        topology: &Path,
        brokers: &str,
        group: &str,
        instance: &str,
        state_dir: &Path,
        env: &[(&str, &str)],
    ) -> Augur {
        let child = Command::new(augur_bin())
            .envs(env.iter().copied())
            .args(["run", "--topology"])
            .arg(topology)
            .args([
                "--brokers",
                brokers,
                "--group",
                group,
                "--instance-id",
                instance,
                "--session-timeout",
                "10s",
                "--log-features",
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .env(
                "AUGUR_LOG",
                std::env::var("AUGUR_TEST_LOG")
                    .unwrap_or_else(|_| "augur=info,librdkafka=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting augur");
        let mut augur = Augur { child };
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = augur.child.try_wait().unwrap() {
            panic!("augur exited at start with {status}; see its error above");
        }
        augur
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits; returns whether it exited successfully.
    pub fn terminate(mut self, grace: Duration) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Augur {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The golden events, as (user_id, raw JSON line), in file order.
pub fn golden_events() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("tests/data/golden/events.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["user_id"].as_str().unwrap().to_owned(), line.to_owned())
        })
        .collect()
}

/// expected_features.csv: header names and rows by event_id.
pub fn golden_features() -> (Vec<String>, HashMap<String, Vec<f64>>) {
    let text = std::fs::read_to_string(repo_root().join("tests/data/golden/expected_features.csv"))
        .unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split(',')
        .skip(1)
        .map(str::to_owned)
        .collect();
    let rows = lines
        .map(|line| {
            let mut cells = line.split(',');
            let id = cells.next().unwrap().to_owned();
            (id, cells.map(|c| c.parse::<f64>().unwrap()).collect())
        })
        .collect();
    (header, rows)
}

/// Counts must match exactly, reals within 1e-9 relative (the golden file has 10
/// significant digits).
pub fn assert_feature_eq(event_id: &str, name: &str, got: f64, want: f64) {
    let tolerance = 1e-9 * want.abs().max(1e-12);
    assert!(
        (got - want).abs() <= tolerance,
        "event {event_id} feature {name}: engine {got}, golden {want}"
    );
}

/// Produces lines keyed by user; waits until all are acknowledged.
pub fn produce_keyed(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: &[(String, String)],
) {
    for (key, payload) in records {
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(payload.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Parses predictions (JSON) into event_id → list of records.
pub fn predictions_by_event(messages: &[OwnedMessage]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut out: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for m in messages {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        out.entry(v["event_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    out
}

/// The Python interpreter of the test venv (with onnxruntime, scipy, pandas).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("AUGUR_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.is_file(),
        "no test venv at {}: run the tests with tests/run.sh, which creates it",
        venv.display()
    );
    venv
}

/// A plain HTTP/1.1 GET on loopback; the whole response, head and body. Waits up to
/// 10 s for the server to listen (a process just started).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => panic!("nothing listens on port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// A metric's value summed over its label sets, from Prometheus text (exact family
/// name: `augur_state_hot_users` does not match `augur_state_hot_users_total`).
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
