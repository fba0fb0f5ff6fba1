//! `delivery: exactly_once` on librdkafka's in-process mock cluster (the broker `augur
//! demo` embeds). What this can show is the *flow*: transactional producers per
//! partition, transactions begun, offsets sent to them and committed, aborts and fencing
//! on errors, and the restore decision. The mock cluster neither stores the offsets a
//! transaction commits nor writes transaction markers, so it hides no aborted record:
//! read_committed visibility is not tested here (and tansu 0.6 rejects EndTxn). The
//! worker runs in this process, so its metrics are read from the recorder installed
//! here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use augur::config::Topology;
use augur::gen::{event_json, Generator};
use augur::pipeline::{run_worker, ModelChannel, WorkerError, WorkerSettings};
use augur::stats::Stats;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 2;
const EVENTS: &str = "user-events";
const PREDICTIONS: &str = "predictions";
const SHADOWS: &str = "ctr-shadow-predictions";
const DEAD_LETTERS: &str = "dead-letter";
const CHANGELOG: &str = "ctr-changelog";
/// One record in this many is not JSON (a dead letter, in the transaction too).
const BAD_EVERY: usize = 97;

/// The process-wide metrics recorder (one per process), and one test at a time: the
/// counters are global, so each test reads differences.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| augur::metrics::install().expect("installing the recorder"))
}
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `augur_sink_transactions_total{outcome}` summed over partitions.
fn transactions(outcome: &str) -> f64 {
    let needle = format!("outcome=\"{outcome}\"");
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("augur_sink_transactions_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn restored_users() -> f64 {
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("augur_state_restored_users_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Cluster {
    mock: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
}

impl Cluster {
    fn start() -> Cluster {
        let mock = MockCluster::new(1).unwrap();
        let brokers = mock.bootstrap_servers();
        for (topic, partitions) in [
            (EVENTS, PARTITIONS),
            (PREDICTIONS, PARTITIONS),
            (SHADOWS, PARTITIONS),
            (DEAD_LETTERS, 1),
            (CHANGELOG, PARTITIONS),
            ("ctr-control", 1),
            ("ctr-alerts", 1),
        ] {
            mock.create_topic(topic, partitions, 1).unwrap();
        }
        Cluster { mock, brokers }
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    /// Every record of `topic` up to its current end.
    fn read(&self, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", "reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for p in 0..partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .unwrap();
            ends.insert(p, high);
            list.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut next: HashMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
        while next.iter().any(|(p, n)| *n < ends[p]) {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                next.insert(m.partition(), m.offset() + 1);
                out.push(m.detach());
            }
        }
        out
    }

    fn count(&self, topic: &str, partitions: i32) -> i64 {
        let consumer: BaseConsumer = self.client().create().unwrap();
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .unwrap()
                    .1
            })
            .sum()
    }

    /// Commits next offsets for `group` as a transaction's TxnOffsetCommit does on a
    /// real broker (the mock cluster does not store those); only for a group that has
    /// never had members here.
    fn commit_for_group(&self, group: &str, offsets: &HashMap<i32, i64>) {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for (p, o) in offsets {
            list.add_partition_offset(EVENTS, *p, Offset::Offset(*o))
                .unwrap();
        }
        consumer.commit(&list, CommitMode::Sync).unwrap();
    }

    /// The offsets `group` has committed for the input.
    fn committed(&self, group: &str) -> Vec<Offset> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            list.add_partition(EVENTS, p);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(5))
            .unwrap();
        committed
            .elements_for_topic(EVENTS)
            .iter()
            .map(|e| e.offset())
            .collect()
    }
}

/// Produces `n` events (one in `BAD_EVERY` not JSON); returns the impressions'
/// event ids and the number of bad records.
fn produce(
    cluster: &Cluster,
    generator: &mut Generator,
    ts: &mut i64,
    n: usize,
) -> (Vec<String>, usize) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        cluster.client().set("linger.ms", "5").create().unwrap();
    let mut impressions = Vec::new();
    let mut bad = 0;
    for i in 0..n {
        *ts += 250;
        let event = generator.next_event(*ts);
        let payload = if (i + 1) % BAD_EVERY == 0 {
            bad += 1;
            format!("{{\"event_id\":\"{}\",\"ts\":", event.event_id)
        } else {
            if event.kind == augur::codec::EventType::Impression {
                impressions.push(event.event_id.clone());
            }
            event_json(&event)
        };
        producer
            .send(BaseRecord::to(EVENTS).key(&event.user_id).payload(&payload))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    (impressions, bad)
}

/// A working directory with the shipped models (champion 1, version 2 as a shadow).
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ctr");
    for version in ["1", "2"] {
        let to = dir.path().join("models/ctr").join(version);
        std::fs::create_dir_all(&to).unwrap();
        for file in ["model.onnx", "model.json"] {
            std::fs::copy(root.join(version).join(file), to.join(file)).unwrap();
        }
    }
    std::fs::copy(
        root.join("aliases.json"),
        dir.path().join("models/ctr/aliases.json"),
    )
    .unwrap();
    dir
}

fn settings(cluster: &Cluster, work: &Path, state: &Path, group: &str) -> WorkerSettings {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/ctr.yaml"))
            .unwrap();
    let mut topology = Topology::parse(&text).unwrap();
    topology.delivery = "exactly_once".into();
    topology.model.registry = "models".into();
    topology.model.shadows = vec!["2".into()];
    topology.monitoring.enabled = false;
    topology.state.checkpoint_interval = "200ms".into();
    assert!(topology.validate().is_empty(), "{:?}", topology.validate());
    let mut settings = WorkerSettings::from_topology(topology, work.to_owned());
    settings.brokers = cluster.brokers.clone();
    settings.group = group.into();
    settings.state_dir = state.to_owned();
    settings.instance_id = format!("{group}-0");
    settings.session_timeout = Duration::from_secs(6);
    settings
}

/// A worker running in the background of this test's runtime.
struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), WorkerError>>,
    stats: Arc<Stats>,
    ready: Arc<AtomicBool>,
}

impl Worker {
    fn start(settings: WorkerSettings) -> Worker {
        metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stats = Arc::new(Stats::default());
        let ready = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(run_worker(
            settings,
            None,
            ModelChannel::new(),
            Arc::clone(&stats),
            Arc::clone(&ready),
            async move {
                let _ = stopped.await;
            },
        ));
        Worker {
            stop: Some(stop),
            handle,
            stats,
            ready,
        }
    }

    /// Waits until `done` holds (checked every 100 ms), panicking after `timeout` or if
    /// the worker stopped first.
    async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Worker) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                !self.handle.is_finished(),
                "the worker stopped before {what}"
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn shutdown(mut self) -> Result<(), WorkerError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the worker did not stop within 60 s")
            .expect("the worker task panicked")
    }

    /// The worker's own result once it stops by itself.
    async fn stopped(self, timeout: Duration) -> Result<(), WorkerError> {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("the worker did not stop by itself")
            .expect("the worker task panicked")
    }
}

fn event_ids(records: &[OwnedMessage], variant: &str) -> Vec<String> {
    records
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(v["variant"], variant, "{v}");
            v["event_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// The last marker offset per changelog partition.
fn changelog_markers(records: &[OwnedMessage]) -> HashMap<i32, i64> {
    let mut markers = HashMap::new();
    for m in records {
        if m.key().is_some_and(|k| !k.is_empty()) {
            continue;
        }
        let header = |key: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == key));
        // A restore appends a fence (empty key, no offset) to learn where the end is.
        let Some(header) = header("augur.offset") else {
            assert!(
                header("augur.fence").is_some(),
                "an empty-key changelog record is a marker or a fence"
            );
            continue;
        };
        let offset: i64 = std::str::from_utf8(header.value.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        markers.insert(m.partition(), offset);
    }
    markers
}

fn input_ends(cluster: &Cluster) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = cluster.client().create().unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(EVENTS, p, Duration::from_secs(5))
                .unwrap();
            (p, high)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_outputs_changelog_and_offsets_for_every_impression() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let work = workdir();
    let (committed0, aborted0, failed0) = (
        transactions("committed"),
        transactions("aborted"),
        transactions("failed"),
    );
    let mut generator = Generator::new(7, 200);
    let mut ts = 1_767_225_600_000;
    let (impressions, bad) = produce(&cluster, &mut generator, &mut ts, 3_000);
    assert!(impressions.len() > 2_000 && bad > 20);

    let worker = Worker::start(settings(
        &cluster,
        work.path(),
        &work.path().join("state"),
        "ctr",
    ));
    let want = impressions.len() as u64;
    worker
        .wait_for("every impression predicted", Duration::from_secs(60), |w| {
            w.stats.predictions.load(Ordering::SeqCst) >= want
                && w.stats.dead_letters.load(Ordering::SeqCst) >= bad as u64
        })
        .await;
    // Periodic checkpoints (not only the final ones of the drain) commit transactions,
    // and the consumer thread has had the time to commit anything it was asked to.
    worker
        .wait_for("periodic commits", Duration::from_secs(30), |_| {
            transactions("committed") - committed0 >= PARTITIONS as f64
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.shutdown().await.expect("a clean stop");

    // Transactions committed on both partitions, none aborted or failed.
    let committed = transactions("committed") - committed0;
    assert!(
        committed >= PARTITIONS as f64,
        "{committed} transactions committed"
    );
    assert_eq!(transactions("aborted") - aborted0, 0.0);
    assert_eq!(transactions("failed") - failed0, 0.0);

    // Every impression has exactly one prediction, and one shadow prediction (scored on
    // the partition's path, inside its transaction); every bad record a dead letter.
    let predicted = event_ids(&cluster.read(PREDICTIONS, PARTITIONS), "champion");
    assert_eq!(
        predicted.len(),
        impressions.len(),
        "no duplicate, none missing"
    );
    let predicted: HashSet<String> = predicted.into_iter().collect();
    assert_eq!(
        predicted,
        impressions.iter().cloned().collect::<HashSet<_>>()
    );
    let shadowed = event_ids(&cluster.read(SHADOWS, PARTITIONS), "shadow");
    assert_eq!(shadowed.len(), impressions.len());
    assert_eq!(shadowed.into_iter().collect::<HashSet<_>>(), predicted);
    assert_eq!(cluster.count(DEAD_LETTERS, 1), bad as i64);

    // Each partition's last changelog marker is its input's end: the final transaction
    // carried the state of the whole input.
    let markers = changelog_markers(&cluster.read(CHANGELOG, PARTITIONS));
    assert_eq!(markers, input_ends(&cluster));

    // The consumer committed no offsets itself: they went into the transactions (which
    // the mock cluster does not store). At least once would have committed them.
    assert!(
        cluster
            .committed("ctr")
            .iter()
            .all(|o| *o == Offset::Invalid),
        "{:?}",
        cluster.committed("ctr")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_aborts_its_transaction_stops_the_worker_and_a_restart_resumes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let work = workdir();
    let state = work.path().join("state");
    let mut generator = Generator::new(8, 200);
    let mut ts = 1_767_225_600_000;
    let (first, _) = produce(&cluster, &mut generator, &mut ts, 1_000);
    let (committed0, aborted0) = (transactions("committed"), transactions("aborted"));

    let worker = Worker::start(settings(&cluster, work.path(), &state, "ctr"));
    let want = first.len() as u64;
    worker
        .wait_for(
            "the first events predicted and committed",
            Duration::from_secs(60),
            |w| {
                w.stats.predictions.load(Ordering::SeqCst) >= want
                    && transactions("committed") - committed0 >= PARTITIONS as f64
            },
        )
        .await;
    // The next offsets a transaction sends are refused (as a broker does for a stale
    // generation): an abortable error.
    cluster.mock.request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
    );
    let (second, _) = produce(&cluster, &mut generator, &mut ts, 1_000);
    let error = worker
        .stopped(Duration::from_secs(60))
        .await
        .expect_err("the worker stops on the failed transaction")
        .to_string();
    assert!(
        error.contains("transactional id \"ctr-user-events-"),
        "{error}"
    );
    assert!(
        error.contains("send_offsets_to_transaction failed"),
        "{error}"
    );
    assert!(error.contains("the transaction was aborted"), "{error}");
    assert!(transactions("aborted") - aborted0 >= 1.0);

    // The restart resumes from the last committed checkpoint in sled and finishes.
    let worker = Worker::start(settings(&cluster, work.path(), &state, "ctr"));
    let all: HashSet<String> = first.iter().chain(&second).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let predicted: HashSet<String> =
            event_ids(&cluster.read(PREDICTIONS, PARTITIONS), "champion")
                .into_iter()
                .collect();
        if all.is_subset(&predicted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} impressions never predicted",
            all.difference(&predicted).count()
        );
        assert!(!worker.handle.is_finished(), "the restarted worker stopped");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    worker.shutdown().await.expect("a clean stop");
    let markers = changelog_markers(&cluster.read(CHANGELOG, PARTITIONS));
    assert_eq!(markers, input_ends(&cluster));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_stops_the_partition_naming_its_transactional_id() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let work = workdir();
    let mut generator = Generator::new(9, 100);
    let mut ts = 1_767_225_600_000;
    let failed0 = transactions("failed");
    let worker = Worker::start(settings(
        &cluster,
        work.path(),
        &work.path().join("state"),
        "ctr",
    ));
    worker
        .wait_for("the assignment", Duration::from_secs(30), |w| {
            w.ready.load(Ordering::SeqCst)
        })
        .await;
    // The coordinator answers the next commit as it does once a newer producer with the
    // same transactional id has started.
    cluster.mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    produce(&cluster, &mut generator, &mut ts, 300);
    let error = worker
        .stopped(Duration::from_secs(60))
        .await
        .expect_err("a fenced partition stops the worker")
        .to_string();
    assert!(
        error.contains("transactional id \"ctr-user-events-") && error.contains("was fenced"),
        "{error}"
    );
    assert!(transactions("failed") - failed0 >= 1.0);
}

/// Copies a (closed) sled directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_state_behind_the_committed_transaction_is_restored_from_the_changelog() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let work = workdir();
    let state = work.path().join("state");
    let mut generator = Generator::new(10, 200);
    let mut ts = 1_767_225_600_000;

    // Run 1 processes the first events; a copy of its sled state is kept.
    let (first, _) = produce(&cluster, &mut generator, &mut ts, 800);
    let worker = Worker::start(settings(&cluster, work.path(), &state, "ctr"));
    let want = first.len() as u64;
    worker
        .wait_for("the first events", Duration::from_secs(60), |w| {
            w.stats.predictions.load(Ordering::SeqCst) >= want
        })
        .await;
    worker.shutdown().await.unwrap();
    // Let the worker's background tasks drop their sled handles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let behind = work.path().join("state-behind");
    copy_dir(&state, &behind);

    // Run 2 processes the rest: the changelog's last checkpoint is the input's end.
    let (second, _) = produce(&cluster, &mut generator, &mut ts, 800);
    let worker = Worker::start(settings(&cluster, work.path(), &state, "ctr"));
    let want = (first.len() + second.len()) as u64;
    worker
        .wait_for("the second events", Duration::from_secs(60), |w| {
            w.stats.predictions.load(Ordering::SeqCst) + first.len() as u64 >= want
        })
        .await;
    worker.shutdown().await.unwrap();
    let ends = input_ends(&cluster);
    assert_eq!(
        changelog_markers(&cluster.read(CHANGELOG, PARTITIONS)),
        ends
    );
    let predictions = cluster.count(PREDICTIONS, PARTITIONS);
    assert_eq!(predictions, want as i64);

    // A worker whose sled state is run 1's, in a group whose committed offsets are the
    // input's end (what run 2's transactions committed on a real broker): sled is behind
    // the committed transaction. The read_committed changelog's last marker is that
    // committed offset, so it is ahead of sled and the partition comes from the
    // changelog (the rule every assignment follows, in both delivery modes): nothing of
    // run 2 is emitted again, and no input is processed.
    cluster.commit_for_group("ctr-behind", &ends);
    let restored0 = restored_users();
    let worker = Worker::start(settings(&cluster, work.path(), &behind, "ctr-behind"));
    worker
        .wait_for("the assignment", Duration::from_secs(30), |w| {
            w.ready.load(Ordering::SeqCst)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = Arc::clone(&worker.stats);
    worker.shutdown().await.unwrap();
    assert!(
        restored_users() - restored0 > 0.0,
        "no partition was restored"
    );
    assert_eq!(
        stats.events.load(Ordering::SeqCst),
        0,
        "input was processed again"
    );
    assert_eq!(cluster.count(PREDICTIONS, PARTITIONS), predictions);
}
