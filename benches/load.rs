//! Load harness against a real broker (not criterion): `cargo bench --bench load`.
//!
//! Starts its own tansu on loopback and, in one run:
//!
//! 1. **Drain throughput.** Pre-produces N scenario-shaped events (generator seed 42,
//!    100k users, default N = 1,000,000) to an input topic with P partitions (default 4),
//!    then drains that backlog twice: with `target/release/augur run` (reference
//!    topology with the bench's topics, feature logging off, the online-store mirror on
//!    with `memory://`, monitoring and the admin port on) and with a plain rdkafka
//!    consumer → producer written here that forwards the same bytes (same key, same
//!    value) with the engine's client settings and no work. The rate is
//!    N / (last output − first consume): the first consume is augur's smallest
//!    `received_us` (the passthrough records its own); the last output is the moment a
//!    reader in this process, counting the output topic while the drain runs, has seen
//!    the expected number of records (one prediction per impression for augur; N
//!    records for the passthrough), so the output is acknowledged and readable.
//! 2. **Latency.** For each offered rate (default 5k/s and 20k/s), a fresh input topic,
//!    a fresh consumer (augur or passthrough), a paced producer (linger.ms 5, record
//!    timestamp set at send) for warm-up + measured seconds; latency is input record
//!    timestamp (ms) → `produced_us` of the prediction (augur) or the passthrough's own
//!    wall clock just before its send. Warm-up records are dropped.
//!
//! Prints progress on stderr and one JSON line of results on stdout. `AUGUR_BENCH_BIN`
//! runs another `augur` binary than this build's (for before/after comparisons).
//!
//! Options (after `--`): `--events N --users U --partitions P --rates 5000,20000
//! --latency-secs S --warmup-secs W --drain-rounds R --skip-latency --skip-drain`. A criterion-style
//! filter that does not mention `load` (as in `cargo bench -- score_linear`) skips it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[path = "support/tansu.rs"]
mod tansu;

use augur::codec::EventType;
use augur::gen::{event_json, Generator};
use tansu::{free_port, Tansu};

const SEED: u64 = 42;
const T0: i64 = 1_767_225_600_000;
/// The paced producer's linger. With 0, librdkafka sends about one produce request per
/// record at these rates, more than tansu answers (at 5k/s the input itself falls
/// seconds behind); 5 ms is augur's own producer default.
const PACED_LINGER_MS: &str = "5";

struct Opts {
    events: u64,
    users: u32,
    partitions: i32,
    rates: Vec<f64>,
    latency_secs: f64,
    warmup_secs: f64,
    drain: bool,
    drain_rounds: u32,
    latency: bool,
}

fn parse_opts() -> Option<Opts> {
    let mut o = Opts {
        events: 1_000_000,
        users: 100_000,
        partitions: 4,
        rates: vec![5_000.0, 20_000.0],
        latency_secs: 15.0,
        warmup_secs: 3.0,
        drain: true,
        drain_rounds: 3,
        latency: true,
    };
    let mut args = std::env::args().skip(1);
    let mut filter_says_skip = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("option without a value");
        match arg.as_str() {
            "--bench" => {}
            "--events" => o.events = value().parse().unwrap(),
            "--users" => o.users = value().parse().unwrap(),
            "--partitions" => o.partitions = value().parse().unwrap(),
            "--rates" => o.rates = value().split(',').map(|r| r.parse().unwrap()).collect(),
            "--latency-secs" => o.latency_secs = value().parse().unwrap(),
            "--warmup-secs" => o.warmup_secs = value().parse().unwrap(),
            "--skip-latency" => o.latency = false,
            "--skip-drain" => o.drain = false,
            "--drain-rounds" => o.drain_rounds = value().parse().unwrap(),
            other if !other.starts_with('-') => filter_says_skip |= !other.contains("load"),
            other => eprintln!("load: ignoring {other}"),
        }
    }
    (!filter_says_skip).then_some(o)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// `count` generator events as (user id, JSON), and how many are impressions.
fn generate(seed: u64, users: u32, count: u64) -> (Vec<(String, String)>, u64) {
    let mut generator = Generator::new(seed, users);
    let mut impressions = 0;
    let events = (0..count)
        .map(|i| {
            let event = generator.next_event(T0 + i as i64 * 50);
            impressions += u64::from(event.kind == EventType::Impression);
            let json = event_json(&event);
            (event.user_id, json)
        })
        .collect();
    (events, impressions)
}

fn send_retrying(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, str, str>,
) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_micros(500));
            }
            Err((e, _)) => panic!("producing: {e}"),
        }
    }
}

/// Produces the backlog as fast as the broker takes it.
fn produce_backlog(brokers: &str, topic: &str, events: &[(String, String)]) -> f64 {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .unwrap();
    let started = Instant::now();
    for (user, json) in events {
        send_retrying(
            &producer,
            BaseRecord::to(topic)
                .key(user.as_str())
                .payload(json.as_str()),
        );
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Produces `events` at `rate` per second of wall clock, each record's timestamp set
/// to the wall clock at its send. Returns the achieved rate and the first send (ms).
fn produce_paced(brokers: &str, topic: &str, events: &[(String, String)], rate: f64) -> (f64, i64) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", PACED_LINGER_MS)
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let started = Instant::now();
    let first_ms = now_us() / 1000;
    for (i, (user, json)) in events.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let ts = now_us() / 1000;
        send_retrying(
            &producer,
            BaseRecord::to(topic)
                .key(user.as_str())
                .payload(json.as_str())
                .timestamp(ts),
        );
    }
    let achieved = events.len() as f64 / started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(60)).unwrap();
    (achieved, first_ms)
}

fn reader(brokers: &str, topic: &str, partitions: i32) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("load-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("session.timeout.ms", "10000")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

/// Counts a topic's records until there are `expected`; returns the wall clock (µs)
/// when the last one was seen, and the payloads of the first `keep_first` records of
/// every partition.
fn count_until(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: u64,
    keep_first: usize,
    timeout: Duration,
) -> (i64, Vec<Vec<u8>>) {
    let consumer = reader(brokers, topic, partitions);
    let deadline = Instant::now() + timeout;
    let (mut seen, mut kept) = (0u64, Vec::new());
    let mut per_partition: HashMap<i32, usize> = HashMap::new();
    while seen < expected {
        assert!(
            Instant::now() < deadline,
            "{topic}: {seen} of {expected} records after {timeout:?}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("reader");
            seen += 1;
            let n = per_partition.entry(m.partition()).or_default();
            if *n < keep_first {
                *n += 1;
                kept.push(m.payload().unwrap_or_default().to_vec());
            }
        }
    }
    (now_us(), kept)
}

/// Reads every record of a topic until there are `expected`; returns the payloads.
fn read_all(brokers: &str, topic: &str, partitions: i32, expected: u64) -> Vec<Vec<u8>> {
    let consumer = reader(brokers, topic, partitions);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut out = Vec::with_capacity(expected as usize);
    while (out.len() as u64) < expected {
        assert!(
            Instant::now() < deadline,
            "{topic}: {} of {expected}",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.expect("reader").payload().unwrap_or_default().to_vec());
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct PredictionTimes {
    input_ts: i64,
    received_us: i64,
    /// Absent from predictions of builds before `polled_us` (AUGUR_BENCH_BIN).
    #[serde(default)]
    polled_us: i64,
    produced_us: i64,
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Sum of a metric family's samples in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A running `augur run`; SIGTERM on drop.
struct Augur {
    child: Child,
    admin: String,
}

impl Augur {
    fn start(brokers: &str, work: &Path, name: &str, input: &str, output: &str) -> Augur {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let reference = std::fs::read_to_string(root.join("topologies/ctr.yaml")).unwrap();
        let mut topology = reference.clone();
        for (from, to) in [
            ("topic: user-events", format!("topic: {input}")),
            (
                "registry: ../models",
                format!("registry: {}", root.join("models").display()),
            ),
            (
                "predictions: { topic: predictions,",
                format!("predictions: {{ topic: {output},"),
            ),
            (
                "dead_letter: { topic: dead-letter }",
                format!("dead_letter: {{ topic: {input}-dead }}"),
            ),
        ] {
            assert!(
                topology.contains(from),
                "topologies/ctr.yaml has no {from:?}"
            );
            topology = topology.replace(from, &to);
        }
        assert!(topology.contains("fetch.wait.max.ms: 10"));
        assert!(topology.contains("log_features: false"));
        let path = work.join(format!("{name}.yaml"));
        std::fs::write(&path, topology).unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
        // Another build of augur (an earlier commit, say) for a before/after comparison.
        let bin = std::env::var_os("AUGUR_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_augur").into());
        let child = Command::new(bin)
            .arg("run")
            .arg("--topology")
            .arg(&path)
            .args(["--brokers", brokers, "--group", name, "--instance-id", name])
            .arg("--state-dir")
            .arg(work.join(format!("{name}-state")))
            .args(["--admin-listen", &admin, "--online-store", "memory://"])
            .env("AUGUR_LOG", "warn")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting augur");
        Augur { child, admin }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((200, _)) = http_get(&self.admin, "/readyz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("augur exited: {status}");
            }
            assert!(Instant::now() < deadline, "augur not ready within 90 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default()
    }
}

impl Drop for Augur {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the passthrough reports when stopped.
struct PassReport {
    first_consume_us: i64,
    /// (input record timestamp ms, wall clock µs just before the send), when asked.
    times: Vec<(i64, i64)>,
}

/// The baseline: consume → produce the same key and value, with augur's consumer and
/// producer settings (see `WorkerSettings::consumer_config` and `OutputProducer`).
fn start_passthrough(
    brokers: &str,
    name: &str,
    input: &str,
    output: &str,
    record_times: bool,
    assigned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<PassReport> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", name)
        .set("group.instance.id", name)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .set("max.poll.interval.ms", "30000")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000")
        .set("fetch.wait.max.ms", "10")
        // The engine's default (`pipeline`): librdkafka's 1 s made this loop's drain
        // time 2.4, 3.2 or 4.1 s, by whole stalls, instead of about 1.5 s.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "67108864")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    consumer.subscribe(&[input]).unwrap();
    let output = output.to_owned();
    std::thread::spawn(move || {
        let mut report = PassReport {
            first_consume_us: 0,
            times: Vec::new(),
        };
        while !stop.load(Ordering::Relaxed) {
            let Some(m) = consumer.poll(Duration::from_millis(50)) else {
                if !assigned.load(Ordering::Relaxed)
                    && consumer.assignment().is_ok_and(|a| a.count() > 0)
                {
                    assigned.store(true, Ordering::Relaxed);
                }
                continue;
            };
            let m = m.expect("passthrough consume");
            let now = now_us();
            if report.first_consume_us == 0 {
                report.first_consume_us = now;
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(&output);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(payload) = m.payload() {
                record = record.payload(payload);
            }
            if record_times {
                let input_ms = m.timestamp().to_millis().unwrap_or(0);
                report.times.push((input_ms, now_us()));
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    Err((e, _)) => panic!("passthrough produce: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        report
    })
}

/// CPU seconds (user + system) of a process's threads, summed by thread name with
/// digits dropped (`sled-io-3` → `sled-io-`), from /proc (clock ticks of 10 ms).
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name: String = stat[open + 1..close]
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += ticks / 100.0;
    }
    out
}

fn process_cpu(pid: u32) -> f64 {
    thread_cpu(pid).values().sum()
}

fn percentiles(mut latencies_us: Vec<i64>) -> serde_json::Value {
    latencies_us.sort_unstable();
    let n = latencies_us.len();
    let at = |q: f64| {
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        latencies_us[rank] as f64 / 1000.0
    };
    serde_json::json!({
        "samples": n,
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": latencies_us[n - 1] as f64 / 1000.0,
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The drain: the same backlog drained by augur, then by the passthrough, `rounds`
/// times (each round with its own consumer groups, output topics and state). The
/// passthrough's drain is short and moves a lot with the rest of the machine, so the
/// result is the ratio of the medians; every round is listed too.
fn drain(tansu: &Tansu, work: &Path, o: &Opts) -> serde_json::Value {
    let p = o.partitions;
    tansu.create_topics(&["events", "events-dead"], p);
    let (events, impressions) = generate(SEED, o.users, o.events);
    eprintln!(
        "load: producing {} events ({impressions} impressions) for {} users to 'events' ({p} partitions)",
        o.events, o.users
    );
    let produce_rate = produce_backlog(&tansu.brokers, "events", &events);
    drop(events);
    eprintln!("load: backlog produced at {produce_rate:.0} events/s");

    let mut rounds = Vec::new();
    let mut last_augur = serde_json::Value::Null;
    for nth in 1..=o.drain_rounds {
        let augur = drain_augur(tansu, work, o, impressions, nth);
        let pass = drain_passthrough(tansu, o, nth);
        let (a, b) = (
            augur["augur_events_per_s"].as_f64().unwrap(),
            pass["passthrough_events_per_s"].as_f64().unwrap(),
        );
        eprintln!("load: round {nth}: augur / passthrough = {:.3}", a / b);
        rounds.push(serde_json::json!({
            "augur_events_per_s": a,
            "passthrough_events_per_s": b,
            "augur_over_passthrough": round(a / b, 3),
            "augur_cpu_seconds": augur["cpu_seconds"]["augur_total"],
            "tansu_cpu_during_augur": augur["cpu_seconds"]["tansu_during_augur"],
            "tansu_cpu_during_passthrough": pass["tansu_during_passthrough"],
            "harness_cpu_during_passthrough": pass["harness_during_passthrough"],
        }));
        last_augur = augur;
    }
    let of = |key: &str| median(rounds.iter().map(|r| r[key].as_f64().unwrap()).collect());
    let (augur_rate, pass_rate) = (of("augur_events_per_s"), of("passthrough_events_per_s"));
    serde_json::json!({
        "events": o.events,
        "users": o.users,
        "partitions": p,
        "impressions": impressions,
        "backlog_produce_events_per_s": produce_rate.round(),
        "rounds": rounds,
        "augur_events_per_s": augur_rate.round(),
        "passthrough_events_per_s": pass_rate.round(),
        "augur_over_passthrough": round(augur_rate / pass_rate, 3),
        "augur_over_passthrough_definition": "median augur events/s over the median passthrough events/s of the rounds",
        "augur_cpu_seconds_median": of("augur_cpu_seconds"),
        "last_round_augur": last_augur,
    })
}

/// augur drains the backlog into `predictions-{nth}`.
fn drain_augur(
    tansu: &Tansu,
    work: &Path,
    o: &Opts,
    impressions: u64,
    nth: u32,
) -> serde_json::Value {
    let p = o.partitions;
    let output = format!("predictions-{nth}");
    tansu.create_topics(&[&output], p);
    let (tansu_cpu0, self_cpu0) = (
        process_cpu(tansu.child.id()),
        process_cpu(std::process::id()),
    );
    let name = format!("drain-augur-{nth}");
    let augur = Augur::start(&tansu.brokers, work, &name, "events", &output);
    let (done_us, firsts) = count_until(
        &tansu.brokers,
        &output,
        p,
        impressions,
        1000,
        Duration::from_secs(900),
    );
    let first_us = firsts
        .iter()
        .map(|b| {
            serde_json::from_slice::<PredictionTimes>(b)
                .unwrap()
                .received_us
        })
        .min()
        .unwrap();
    let augur_secs = (done_us - first_us) as f64 / 1e6;
    let augur_rate = o.events as f64 / augur_secs;
    eprintln!(
        "load: round {nth}: augur drained {} events in {augur_secs:.2} s: {augur_rate:.0} events/s",
        o.events
    );
    let augur_threads = thread_cpu(augur.child.id());
    let (tansu_cpu1, self_cpu1) = (
        process_cpu(tansu.child.id()),
        process_cpu(std::process::id()),
    );
    // Gauges are set at checkpoints (every 1 s): let two pass.
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = augur.metrics();
    let consumed = metric_sum(&metrics, "augur_source_events_total");
    let dead = metric_sum(&metrics, "augur_source_dead_letters_total");
    let hot_bytes = metric_sum(&metrics, "augur_state_hot_bytes");
    let hot_users = metric_sum(&metrics, "augur_state_hot_users");
    let predictions = metric_sum(&metrics, "augur_sink_predictions_total");
    let postponed = metric_sum(&metrics, "augur_state_checkpoints_postponed_total");
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", augur.child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    drop(augur);
    serde_json::json!({
        "augur_events_per_s": augur_rate.round(),
        "augur_seconds": round(augur_secs, 3),
        "cpu_seconds": {
            "note": "augur: its threads over its whole life (startup, drain, 2.5 s idle); tansu and harness (reader): during the drain",
            "augur_by_thread": augur_threads.iter().map(|(k, v)| (k.clone(), serde_json::json!(round(*v, 2)))).collect::<serde_json::Map<_, _>>(),
            "augur_total": round(augur_threads.values().sum::<f64>(), 2),
            "tansu_during_augur": round(tansu_cpu1 - tansu_cpu0, 2),
            "harness_during_augur": round(self_cpu1 - self_cpu0, 2),
        },
        "augur_metrics": {
            "source_events_total": consumed,
            "sink_predictions_total": predictions,
            "dead_letters_total": dead,
            "checkpoints_postponed_total": postponed,
            "state_hot_users": hot_users,
            "state_hot_bytes": hot_bytes,
            "state_bytes_per_user": round(hot_bytes / hot_users.max(1.0), 1),
            "process_rss_mib": round(rss_kib / 1024.0, 1),
        },
    })
}

/// The passthrough drains the backlog into `pass-out-{nth}`.
fn drain_passthrough(tansu: &Tansu, o: &Opts, nth: u32) -> serde_json::Value {
    let output = format!("pass-out-{nth}");
    tansu.create_topics(&[&output], o.partitions);
    let (tansu_cpu2, self_cpu2) = (
        process_cpu(tansu.child.id()),
        process_cpu(std::process::id()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pass = start_passthrough(
        &tansu.brokers,
        &format!("drain-pass-{nth}"),
        "events",
        &output,
        false,
        Arc::new(AtomicBool::new(false)),
        Arc::clone(&stop),
    );
    let (pass_done_us, _) = count_until(
        &tansu.brokers,
        &output,
        o.partitions,
        o.events,
        0,
        Duration::from_secs(900),
    );
    stop.store(true, Ordering::Relaxed);
    let (tansu_cpu3, self_cpu3) = (
        process_cpu(tansu.child.id()),
        process_cpu(std::process::id()),
    );
    let report = pass.join().unwrap();
    let pass_secs = (pass_done_us - report.first_consume_us) as f64 / 1e6;
    let pass_rate = o.events as f64 / pass_secs;
    eprintln!(
        "load: round {nth}: passthrough drained {} events in {pass_secs:.2} s: {pass_rate:.0} events/s",
        o.events
    );
    serde_json::json!({
        "passthrough_events_per_s": pass_rate.round(),
        "passthrough_seconds": round(pass_secs, 3),
        "tansu_during_passthrough": round(tansu_cpu3 - tansu_cpu2, 2),
        "harness_during_passthrough": round(self_cpu3 - self_cpu2, 2),
    })
}

fn latency(tansu: &Tansu, work: &Path, o: &Opts, rate: f64) -> serde_json::Value {
    let p = o.partitions;
    let count = (rate * (o.warmup_secs + o.latency_secs)) as u64;
    // Another seed than the drain's, the same shape.
    let (events, impressions) = generate(SEED + 1, o.users, count);
    let r = rate as u64;
    let mut result = serde_json::Map::new();
    let mut split = None;
    for system in ["augur", "passthrough"] {
        let (input, output) = (format!("lat-{system}-{r}"), format!("lat-{system}-{r}-out"));
        tansu.create_topics(&[&input, &output, &format!("{input}-dead")], p);
        let name = format!("lat-{system}-{r}");
        eprintln!(
            "load: {system} at {r} events/s: {count} events, {} s warm-up",
            o.warmup_secs
        );
        let (achieved, first_ms, latencies) = if system == "augur" {
            let mut augur = Augur::start(&tansu.brokers, work, &name, &input, &output);
            augur.wait_ready();
            std::thread::sleep(Duration::from_secs(1));
            let (achieved, first_ms) = produce_paced(&tansu.brokers, &input, &events, rate);
            let out = read_all(&tansu.brokers, &output, p, impressions);
            drop(augur);
            let cut = first_ms + (o.warmup_secs * 1000.0) as i64;
            let times: Vec<PredictionTimes> = out
                .iter()
                .map(|b| serde_json::from_slice::<PredictionTimes>(b).unwrap())
                .filter(|t| t.input_ts >= cut)
                .collect();
            // Where augur's latency is spent: before its source takes the record from
            // the consumer (broker, fetch, librdkafka's queue), between the source and
            // the partition task (the task's queue), and inside the task (state,
            // features, scoring, produce call).
            split = Some(serde_json::json!({
                "input_to_task": percentiles(
                    times.iter().map(|t| t.received_us - t.input_ts * 1000).collect()
                ),
                "input_to_poll": percentiles(
                    times.iter().map(|t| t.polled_us - t.input_ts * 1000).collect()
                ),
                "poll_to_task": percentiles(
                    times.iter().map(|t| t.received_us - t.polled_us).collect()
                ),
                "task_to_produce": percentiles(
                    times.iter().map(|t| t.produced_us - t.received_us).collect()
                ),
            }));
            let latencies = times
                .iter()
                .map(|t| t.produced_us - t.input_ts * 1000)
                .collect();
            (achieved, first_ms, latencies)
        } else {
            let (assigned, stop) = (
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(false)),
            );
            let pass = start_passthrough(
                &tansu.brokers,
                &name,
                &input,
                &output,
                true,
                Arc::clone(&assigned),
                Arc::clone(&stop),
            );
            let deadline = Instant::now() + Duration::from_secs(90);
            while !assigned.load(Ordering::Relaxed) {
                assert!(Instant::now() < deadline, "passthrough got no assignment");
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(1));
            let (achieved, first_ms) = produce_paced(&tansu.brokers, &input, &events, rate);
            count_until(
                &tansu.brokers,
                &output,
                p,
                count,
                0,
                Duration::from_secs(300),
            );
            stop.store(true, Ordering::Relaxed);
            let report = pass.join().unwrap();
            let cut = first_ms + (o.warmup_secs * 1000.0) as i64;
            let latencies: Vec<i64> = report
                .times
                .iter()
                .filter(|(input_ms, _)| *input_ms >= cut)
                .map(|(input_ms, sent_us)| sent_us - input_ms * 1000)
                .collect();
            (achieved, first_ms, latencies)
        };
        let _ = first_ms;
        let mut stats = percentiles(latencies);
        stats["offered_events_per_s"] = serde_json::json!(achieved.round());
        if let Some(split) = split.take() {
            stats["split"] = split;
        }
        eprintln!("load: {system} at {r}/s: {stats}");
        result.insert(system.to_owned(), stats);
    }
    let p99 = |s: &str| result[s]["p99_ms"].as_f64().unwrap();
    let delta = round(p99("augur") - p99("passthrough"), 3);
    result.insert(
        "p99_augur_minus_passthrough_ms".into(),
        serde_json::json!(delta),
    );
    serde_json::Value::Object(result)
}

fn main() {
    let Some(o) = parse_opts() else {
        eprintln!("load: skipped (filter does not mention load)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let tansu = Tansu::start();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mut out = serde_json::json!({
        "bench": "load",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "broker": "tansu (memory://) on loopback",
    });
    if o.drain {
        out["drain"] = drain(&tansu, work.path(), &o);
    }
    if o.latency {
        let mut by_rate = serde_json::Map::new();
        for &rate in &o.rates {
            by_rate.insert(
                format!("{}", rate as u64),
                latency(&tansu, work.path(), &o, rate),
            );
        }
        out["latency"] = serde_json::Value::Object(by_rate);
        out["latency_definition"] = serde_json::json!(
            "input record timestamp (ms, set at the paced producer's send) to augur's produced_us / the passthrough's clock before its send; warm-up dropped"
        );
    }
    println!("{out}");
}
