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
use rdkafka::error::RDKafkaErrorCode;
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
        panic!("tansu not found: run the tests with tests/run.sh, which installs it (cargo install tansu --locked --features dynostore,postgres)")
    })
}

/// A tansu broker, killed on drop: in-memory storage ([`Broker::start`]) or a fresh
/// PostgreSQL database ([`Broker::start_postgres`]), which survives a restart.
///
/// Keep consumer session timeouts at 10 s or more against it: tansu 0.6 holds each
/// JoinGroup and SyncGroup of a static member for 3 s, and a member's first heartbeat
/// after a 6 s session timeout finds it already expired.
pub struct Broker {
    child: Option<Child>,
    pub brokers: String,
    port: u16,
    storage: String,
    database: Option<PgDatabase>,
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_with("memory://tansu/".into(), None)
    }

    /// A broker storing everything in a new PostgreSQL database (dropped with the
    /// broker), on `$AUGUR_TEST_POSTGRES_URL`'s server; needs tansu built with its
    /// `postgres` feature (tests/run.sh does that).
    pub fn start_postgres() -> Broker {
        let database = PgDatabase::create();
        Self::start_with(database.url.clone(), Some(database))
    }

    fn start_with(storage: String, database: Option<PgDatabase>) -> Broker {
        let port = free_port();
        let mut broker = Broker {
            child: None,
            brokers: format!("127.0.0.1:{port}"),
            port,
            storage,
            database,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = match std::env::var("AUGUR_TEST_TANSU_LOG") {
            Ok(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            Err(_) => Stdio::null(),
        };
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .stderr(Stdio::null())
            .stdout(log)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&self.brokers).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tansu exited with {status} (storage {})", self.storage);
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within 30 s",
                self.brokers
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("broker running")
            .id()
            .to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGSTOP: the broker holds its connections but answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Broker::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage (after [`Broker::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Creates a topic, retrying a request that timed out: a tansu sharing two cores
    /// with a parallel release test run has taken longer than the request's timeout.
    /// On a retry, the topic already existing means the timed-out request made it.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let result = match rt.block_on(admin.create_topics(&[topic], &options)) {
                Ok(mut results) => results.pop().expect("one result per topic").map(|_| ()),
                Err(e) => match e.rdkafka_error_code() {
                    Some(code) => Err((name.to_string(), code)),
                    None => panic!("creating topic {name}: {e}"),
                },
            };
            match result {
                Ok(()) => return,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if attempt > 1 => return,
                Err((_, code))
                    if attempt < ATTEMPTS
                        && matches!(
                            code,
                            RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut
                        ) =>
                {
                    eprintln!(
                        "creating topic {name}: {code} (attempt {attempt} of {ATTEMPTS}); retrying"
                    );
                }
                Err((t, code)) => panic!("creating topic {t}: {code}"),
            }
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

    /// The members of a consumer group as the broker lists them (DescribeGroups).
    pub fn group_members(&self, group: &str) -> Vec<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        match consumer.fetch_group_list(Some(group), Duration::from_secs(5)) {
            Ok(list) => list
                .groups()
                .iter()
                .flat_map(|g| g.members().iter().map(|m| m.id().to_owned()))
                .collect(),
            Err(e) => panic!("describing group {group}: {e}"),
        }
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
            // tansu has no transactions; its PostgreSQL storage cannot answer a
            // read_committed ListOffsets on PostgreSQL < 16.
            .set("isolation.level", "read_uncommitted")
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
        if let Some(child) = &self.child {
            // A frozen broker does not die of SIGKILL until it is continued.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        // The database (if any) is dropped after the broker is gone.
        self.database.take();
    }
}

/// A PostgreSQL database with tansu's schema (tests/data/tansu-postgres.sql), created
/// for one broker and dropped after it.
pub struct PgDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl PgDatabase {
    /// `$AUGUR_TEST_POSTGRES_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`:
    /// any database on the server the tests may create databases on.
    pub fn server_url() -> String {
        std::env::var("AUGUR_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    pub fn create() -> PgDatabase {
        let server = Self::server_url();
        let name = unique("tansu").replace('-', "_");
        let (path, query) = server.split_once('?').unwrap_or((&server, ""));
        let (base, _) = path
            .rsplit_once('/')
            .expect("a postgres URL ends with /database");
        // tansu's client prefers TLS and checks the server's certificate against the
        // host: a local server's self-signed one fails, so no TLS unless the URL asks.
        let query = if query.contains("sslmode=") {
            query.to_owned()
        } else if query.is_empty() {
            "sslmode=disable".to_owned()
        } else {
            format!("{query}&sslmode=disable")
        };
        let url = format!("{base}/{name}?{query}");
        psql(&server, &["-c", &format!("create database {name}")]);
        let schema = repo_root().join("tests/data/tansu-postgres.sql");
        psql(&url, &["-q", "-f", schema.to_str().unwrap()]);
        PgDatabase { url, name, server }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([self.server.as_str(), "-q", "-c"])
            .arg(format!(
                "drop database if exists {} with (force)",
                self.name
            ))
            .stdout(Stdio::null())
            .status();
    }
}

fn psql(url: &str, args: &[&str]) {
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
        .expect("running psql (PostgreSQL's client; tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "psql {url} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        // 10 s unless the caller sets AUGUR_SESSION_TIMEOUT (the flag would win).
        let session_timeout: &[&str] = if env.iter().any(|(k, _)| *k == "AUGUR_SESSION_TIMEOUT") {
            &[]
        } else {
            &["--session-timeout", "10s"]
        };
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
                "--log-features",
            ])
            .args(session_timeout)
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

/// The admin endpoint's Prometheus text.
pub fn metrics(admin_port: u16) -> String {
    http_get(admin_port, "/metrics")
}

// ---------------------------------------------------------------------------------------
// Golden checks shared by the stream tests (golden_stream, scale_out, broker_outage).

/// Impressions in the golden stream.
pub const GOLDEN_IMPRESSIONS: usize = 12_454;

/// The golden stream's impression event ids, in file order.
pub fn impression_ids() -> Vec<String> {
    golden_events()
        .iter()
        .filter(|(_, line)| line.contains("\"type\": \"impression\""))
        .map(|(_, line)| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Every impression has at least one prediction; all copies of one are identical
/// (deterministic re-emission: same score, features, model version and variant);
/// features equal the golden file. Returns the number of extra copies.
pub fn check_against_golden(predictions: &HashMap<String, Vec<serde_json::Value>>) -> usize {
    let (names, golden) = golden_features();
    let impressions = impression_ids();
    assert_eq!(impressions.len(), GOLDEN_IMPRESSIONS);
    let mut duplicates = 0;
    for id in &impressions {
        let copies = predictions
            .get(id)
            .unwrap_or_else(|| panic!("impression {id} has no prediction"));
        for copy in &copies[1..] {
            duplicates += 1;
            assert_eq!(
                copy["score"], copies[0]["score"],
                "re-emitted prediction for {id} differs"
            );
            assert_eq!(
                copy["features"], copies[0]["features"],
                "re-emitted features for {id} differ"
            );
            assert_eq!(copy["version"], copies[0]["version"]);
            assert_eq!(copy["variant"], copies[0]["variant"]);
        }
        let p = &copies[0];
        assert_eq!(p["model"], "ctr");
        let score = p["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{id}: score {score}");
        let want = &golden[id];
        for (name, want) in names.iter().zip(want) {
            let got = p["features"][name]
                .as_f64()
                .unwrap_or_else(|| panic!("{id}: feature {name} missing"));
            assert_feature_eq(id, name, got, *want);
        }
    }
    let extra: Vec<_> = predictions
        .keys()
        .filter(|k| !golden.contains_key(*k))
        .take(3)
        .collect();
    assert!(
        extra.is_empty(),
        "predictions for unknown events: {extra:?}"
    );
    eprintln!(
        "checked {} impressions against golden; {duplicates} identical re-emissions",
        impressions.len()
    );
    duplicates
}

/// Each golden user's number of events.
pub fn golden_event_counts() -> HashMap<String, u64> {
    let mut expected: HashMap<String, u64> = HashMap::new();
    for (user, _) in golden_events() {
        *expected.entry(user).or_default() += 1;
    }
    expected
}

/// A user state's lifetime event count (the reference topology's `events_total`).
pub fn lifetime_events(state: &augur::state::UserState) -> u64 {
    state
        .aggs
        .iter()
        .find_map(|a| match a {
            augur::state::AggState::Lifetime(n) => Some(*n),
            _ => None,
        })
        .expect("the reference topology has a lifetime count")
}

/// Asserts that the users' lifetime event counts equal the golden counts, for every
/// golden user: no event was applied twice (or skipped).
pub fn assert_golden_counts(users: &HashMap<String, augur::state::UserState>, what: &str) {
    let expected = golden_event_counts();
    for (user, state) in users {
        assert_eq!(
            Some(&lifetime_events(state)),
            expected.get(user),
            "{what}: user {user}: events applied to state"
        );
    }
    assert_eq!(users.len(), expected.len(), "{what}: every user has state");
}

fn reference_state_hash() -> u64 {
    augur::config::Topology::load(&repo_root().join("topologies/ctr.yaml"))
        .unwrap()
        .state_hash()
}

/// The final sled state of one worker: each user's lifetime event count equals its
/// number of golden events, so no event was applied twice (or skipped).
pub fn check_state_counts(state_dir: &Path, topic: &str, partitions: i32) {
    check_latest_state_counts(&[state_dir], topic, partitions);
}

/// Like [`check_state_counts`] across several workers' state dirs (all stopped): each
/// partition's state is taken from the dir whose checkpoint of it is the newest, that
/// is, from its last owner. Returns, per partition, the dirs' checkpointed offsets.
pub fn check_latest_state_counts(
    state_dirs: &[&Path],
    topic: &str,
    partitions: i32,
) -> Vec<Vec<Option<i64>>> {
    let hash = reference_state_hash();
    let stores: Vec<_> = state_dirs
        .iter()
        .filter(|d| d.exists())
        .map(|d| augur::state::store::StateStore::open(d, hash).unwrap())
        .collect();
    let mut users = HashMap::new();
    let mut offsets = Vec::new();
    for partition in 0..partitions {
        let parts: Vec<_> = stores
            .iter()
            .map(|s| s.partition(topic, partition).unwrap())
            .collect();
        let next: Vec<Option<i64>> = parts.iter().map(|p| p.next_offset().unwrap()).collect();
        let newest = (0..parts.len()).max_by_key(|i| next[*i]).unwrap();
        for item in parts[newest].users() {
            let (user, state) = item.unwrap();
            assert!(
                users.insert(user.clone(), state).is_none(),
                "user {user} has state in two partitions"
            );
        }
        offsets.push(next);
    }
    assert_golden_counts(&users, "sled");
    offsets
}

/// Every partition of `<app>-changelog` restored the way a worker restores it; the
/// users' lifetime counts must equal golden. Returns each partition's restored offset.
pub fn check_changelog_counts(broker: &Broker, changelog: &str, partitions: i32) -> Vec<i64> {
    let mut users = HashMap::new();
    let mut offsets = Vec::new();
    for partition in 0..partitions {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &broker.brokers)
            .set("group.id", unique("changelog-check"))
            .set("fetch.wait.max.ms", "10")
            .set("isolation.level", "read_uncommitted");
        let restored = augur::state::changelog::restore(
            config,
            changelog,
            partition,
            augur::state::changelog::ReadTo::Quiet(Duration::from_millis(1000)),
        )
        .unwrap();
        offsets.push(restored.next_offset.unwrap_or(-1));
        for (user, bytes) in restored.users {
            let state = augur::state::decode_user_state(&bytes).unwrap();
            assert!(users.insert(user, state).is_none());
        }
    }
    assert_golden_counts(&users, "changelog");
    offsets
}

/// Reads the predictions topic until `want` distinct events have a prediction.
pub fn wait_for(
    broker: &Broker,
    topic: &str,
    partitions: i32,
    want: usize,
    timeout: Duration,
) -> HashMap<String, Vec<serde_json::Value>> {
    let messages = broker.read_topic(topic, partitions, timeout, |msgs| {
        predictions_by_event(msgs).len() >= want
    });
    predictions_by_event(&messages)
}

/// Reads the predictions topic until every golden impression has a prediction.
pub fn wait_for_all(
    broker: &Broker,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> HashMap<String, Vec<serde_json::Value>> {
    wait_for(broker, topic, partitions, GOLDEN_IMPRESSIONS, timeout)
}

/// Waits for every impression's prediction, gives a wrongly re-emitted copy time to
/// show up, and reads the whole predictions topic again; returns the predictions with
/// the number of events predicted more than once.
pub fn read_all_predictions(
    broker: &Broker,
    topics: &Topics,
    partitions: i32,
    timeout: Duration,
) -> (HashMap<String, Vec<serde_json::Value>>, usize) {
    wait_for_all(broker, &topics.predictions, partitions, timeout);
    std::thread::sleep(Duration::from_secs(2));
    let messages = broker.read_topic(
        &topics.predictions,
        partitions,
        Duration::from_secs(5),
        |_| false,
    );
    let predictions = predictions_by_event(&messages);
    let re_emitted = predictions.values().filter(|c| c.len() > 1).count();
    (predictions, re_emitted)
}

/// Like [`read_all_predictions`], then stops the worker cleanly (so its state is
/// checkpointed).
pub fn finish_and_count_re_emissions(
    broker: &Broker,
    topics: &Topics,
    partitions: i32,
    augur: Augur,
) -> (HashMap<String, Vec<serde_json::Value>>, usize) {
    let out = read_all_predictions(broker, topics, partitions, Duration::from_secs(120));
    assert!(augur.terminate(Duration::from_secs(25)));
    out
}
