//! The worker: wires the source, the partition tasks and the outputs together, and
//! runs until shutdown or until a partition hits an error that forbids going on.

mod partition;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use tokio::sync::mpsc;

pub use partition::{Control, PartitionTask};

use crate::alerts::Alerts;
use crate::codec::{Codec, TypeMask};
use crate::config::{Delivery, Topology};
use crate::features::FeatureSet;
use crate::model::{DirRegistry, ModelError, ModelRegistry};
use crate::serving::experiment::Split;
use crate::serving::shadow::ShadowOutput;
use crate::serving::{ModelCommand, ModelManager, ModelSet};
use crate::sink::{DeliveryError, OutputProducer, TransactionError, TransactionSettings};
use crate::state::store::{StateStore, StoreError};
use crate::stats::Stats;

/// An error that stops a partition; the worker then stops so that a restart resumes
/// from the last consistent checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Transaction(#[from] Box<TransactionError>),
    #[error("partition {partition}: stored state of user {user:?} does not match the topology's features")]
    StateShape { partition: i32, user: String },
    #[error("restoring partition {partition} from {topic}: {source}")]
    Restore {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
    /// The task writing a checkpoint ended without an outcome (it panicked).
    #[error("partition {partition}: writing a checkpoint: {message}")]
    Checkpoint { partition: i32, message: String },
    /// `delivery: exactly_once` cannot start a partition safely.
    #[error("partition {partition}: {message}")]
    ExactlyOnce { partition: i32, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("partition failed: {0}")]
    Partition(#[from] PartitionError),
    #[error("{0}")]
    Other(String),
}

/// Everything a worker needs, after the topology and the command line are merged.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub topology: Topology,
    /// Relative registry paths are resolved against this directory.
    pub topology_dir: PathBuf,
    pub brokers: String,
    pub group: String,
    pub instance_id: String,
    pub state_dir: PathBuf,
    pub log_features: bool,
    pub session_timeout: Duration,
}

impl WorkerSettings {
    /// Settings taken from the topology alone.
    pub fn from_topology(topology: Topology, topology_dir: PathBuf) -> Self {
        WorkerSettings {
            brokers: topology.kafka.brokers.clone(),
            group: topology.group(),
            instance_id: default_instance_id(),
            state_dir: PathBuf::from(&topology.state.dir),
            log_features: topology.sinks.log_features,
            session_timeout: topology.session_timeout(),
            topology,
            topology_dir,
        }
    }

    fn client_config(
        &self,
        overrides: &std::collections::BTreeMap<String, crate::config::ConfigValue>,
    ) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in overrides {
            config.set(key, value.to_string());
        }
        config
    }

    pub fn producer_config(&self) -> ClientConfig {
        self.client_config(&self.topology.kafka.producer)
    }

    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("group.instance.id", &self.instance_id)
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout.as_millis() / 3)
                    .clamp(100, 3000)
                    .to_string(),
            )
            .set(
                "max.poll.interval.ms",
                self.topology
                    .max_poll_interval()
                    .max(self.session_timeout)
                    .as_millis()
                    .to_string(),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "5000")
            // Backpressure leaves a partition's prefetch queue full (module `source`);
            // librdkafka then postpones that partition's next fetch by this long, 1 s
            // by default, and the partition sits idle once its task has caught up. A
            // plain consumer → producer loop lost 0.9-1.8 s of a 1M-event drain to it.
            .set("fetch.queue.backoff.ms", "10");
        for (key, value) in &self.topology.kafka.consumer {
            config.set(key, value.to_string());
        }
        if self.topology.delivery() == Delivery::ExactlyOnce {
            // librdkafka's default too; set so that nothing can change it (validation
            // refuses another value in kafka.consumer).
            config.set("isolation.level", "read_committed");
        }
        config
    }

    /// With `delivery: exactly_once`, what the partitions' transactional producers need.
    pub fn transaction_settings(&self) -> Option<TransactionSettings> {
        if self.topology.delivery() != Delivery::ExactlyOnce {
            return None;
        }
        let mut producer = self.producer_config();
        if producer.get("transaction.timeout.ms").is_none() {
            // A transaction spans one checkpoint interval (and the batch in flight);
            // librdkafka's default of 60 s unless the interval needs more.
            let timeout = (self.topology.checkpoint_interval() * 3).max(Duration::from_secs(60));
            producer.set("transaction.timeout.ms", timeout.as_millis().to_string());
        }
        Some(TransactionSettings {
            producer,
            group: self.group.clone(),
            timeout: TRANSACTION_CALL_TIMEOUT,
        })
    }
}

/// How long one transaction call (init, send offsets, commit, abort) may take; below the
/// time a revoked partition has to checkpoint.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The changelog topic if it exists; otherwise says what that means, once.
async fn find_changelog(
    settings: &WorkerSettings,
    producer: &OutputProducer,
) -> Option<(String, ClientConfig)> {
    let topic = settings.topology.changelog_topic();
    let found = {
        let (producer, topic) = (producer.clone(), topic.clone());
        tokio::task::spawn_blocking(move || producer.has_topic(&topic, Duration::from_secs(5)))
            .await
            .unwrap_or(false)
    };
    if !found {
        tracing::warn!(topic, "no changelog topic: state is not written to one, and a partition without local state is rebuilt by replaying its input from the beginning");
        return None;
    }
    tracing::info!(topic, "writing state changes to the changelog");
    let mut config = settings.client_config(&settings.topology.kafka.consumer);
    config.set("group.id", format!("{}-restore", settings.group));
    if settings.topology.delivery() == Delivery::ExactlyOnce {
        // Only committed checkpoints: the records of an aborted transaction (or of one
        // still open) are never restored.
        config.set("isolation.level", "read_committed");
    }
    Some((topic, config))
}

/// The host name: on a Kubernetes StatefulSet, the pod name, which makes a stable
/// `group.instance.id`.
pub fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "augur".into())
}

/// What every partition task of one worker shares (read-only, except the channels).
pub struct Shared {
    pub topic: String,
    pub features: FeatureSet,
    pub scored_types: TypeMask,
    /// The models serving now; each batch takes one snapshot.
    pub models: tokio::sync::watch::Receiver<Arc<ModelSet>>,
    pub experiment: Option<Experiment>,
    /// Where scored batches go for the shadow models, when the topology names any.
    pub shadow: Option<ShadowOutput>,
    /// Where scored rows and settled labels go for drift and quality monitoring.
    pub monitor: Option<crate::monitor::MonitorHandle>,
    /// The changelog topic, when it exists, and the client settings to restore from it.
    pub changelog: Option<(String, ClientConfig)>,
    pub codec: Codec,
    pub predictions_topic: String,
    pub predictions_codec: Codec,
    pub dead_letter_topic: String,
    pub log_features: bool,
    pub max_message_bytes: usize,
    pub max_batch: usize,
    pub checkpoint_interval: Duration,
    /// The interval between checkpoints while a partition has a backlog.
    pub backlog_checkpoint_interval: Duration,
    pub idle_after: Duration,
    /// The worker's hot-state budget, shared equally by its partitions.
    pub max_hot_bytes: usize,
    /// Partitions this worker owns now (for the budget's share).
    pub assigned: std::sync::atomic::AtomicUsize,
    pub producer: OutputProducer,
    pub stats: Arc<Stats>,
    /// The online-store mirror, when one is configured.
    pub mirror: Option<Arc<crate::online_store::Mirror>>,
    /// `delivery: exactly_once`: each partition's outputs, changelog records and input
    /// offset go through its own transactional producer, and the consumer never
    /// commits offsets itself. None: at least once.
    pub transactions: Option<TransactionSettings>,
    commits: std::sync::mpsc::Sender<(i32, i64)>,
    /// State store failures, for the source to pause and recover from.
    store_faults: std::sync::mpsc::Sender<StoreFault>,
    fatal: mpsc::UnboundedSender<PartitionError>,
}

/// A partition's state store failed (disk full, I/O error): the source pauses every
/// partition, reopens the store with backoff, and resumes from the last checkpoints.
#[derive(Debug)]
pub struct StoreFault {
    pub partition: i32,
    pub error: StoreError,
}

/// The topology's experiment, ready to assign arms.
pub struct Experiment {
    pub name: String,
    pub arms: Vec<String>,
    pub mode: ExperimentMode,
}

pub enum ExperimentMode {
    Split(Split),
    Bandit { seed: u64, max_pending: usize },
}

impl Experiment {
    fn from_topology(topology: &Topology) -> Option<Experiment> {
        let e = topology.experiment.as_ref()?;
        let mode = if e.mode == "bandit" {
            ExperimentMode::Bandit {
                seed: e.seed,
                max_pending: e.max_pending_rewards,
            }
        } else {
            let fractions: Vec<f64> = e.arms.iter().map(|a| a.fraction.unwrap_or(0.0)).collect();
            ExperimentMode::Split(Split::new(&fractions))
        };
        Some(Experiment {
            name: e.name.clone(),
            arms: e.arms.iter().map(|a| a.name.clone()).collect(),
            mode,
        })
    }
}

/// A worker's model-command channel: the admin API and the control-topic reader send,
/// the worker's model manager receives.
pub struct ModelChannel {
    pub sender: mpsc::Sender<ModelCommand>,
    pub receiver: mpsc::Receiver<ModelCommand>,
}

impl ModelChannel {
    pub fn new() -> ModelChannel {
        let (sender, receiver) = mpsc::channel(16);
        ModelChannel { sender, receiver }
    }
}

impl Default for ModelChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    /// Asks the consumer thread to commit `next_offset` for a partition.
    fn request_commit(&self, partition: i32, next_offset: i64) {
        let _ = self.commits.send((partition, next_offset));
    }

    pub(crate) fn report_store_fault(&self, partition: i32, error: StoreError) {
        tracing::error!(partition, error = %error, "state store failed; the worker's partitions pause until it works again");
        let _ = self.store_faults.send(StoreFault { partition, error });
    }

    pub(crate) fn report_fatal(&self, error: PartitionError) {
        tracing::error!(error = %error, "partition stopped");
        let _ = self.fatal.send(error);
    }
}

/// Loads the models, opens the state, joins the consumer group and processes until
/// `shutdown` resolves or a partition fails.
pub async fn run_worker(
    settings: WorkerSettings,
    online_store: Option<crate::online_store::OnlineStore>,
    model_channel: ModelChannel,
    stats: Arc<Stats>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    let topology = &settings.topology;
    let features = topology.feature_set();
    let registry: Arc<dyn ModelRegistry> = Arc::new(DirRegistry::open(
        settings.topology_dir.join(&topology.model.registry),
    ));
    let producer = OutputProducer::create(settings.producer_config())?;
    let store = StateStore::open_with_cache(
        &settings.state_dir,
        topology.state_hash(),
        topology.store_cache_bytes(),
    )?;
    // Sampled again every 10 s by the source.
    if let Some(bytes) = store.size_on_disk() {
        metrics::gauge!(crate::metrics::STATE_DISK_BYTES).set(bytes as f64);
    }
    let transactions = settings.transaction_settings();
    let changelog = find_changelog(&settings, &producer).await;
    if transactions.is_some() && changelog.is_none() {
        return Err(WorkerError::Other(format!(
            "delivery: exactly_once needs the changelog topic {} (partitioned like the input): \
             it is how a partition's state is restored to its last committed transaction",
            topology.changelog_topic()
        )));
    }
    let alerts = Alerts::new(
        &topology.app,
        topology.alerts_topic(),
        Some(producer.clone()),
    );
    let (manager, models) = ModelManager::start(topology, registry, alerts.clone()).await?;
    let manager_stop = Arc::new(tokio::sync::Notify::new());
    let manager_task = {
        let stop = Arc::clone(&manager_stop);
        let poll = topology.model_poll_interval();
        tokio::spawn(manager.run(poll, model_channel.receiver, async move {
            stop.notified().await
        }))
    };
    let mut control_config = ClientConfig::new();
    control_config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", format!("{}-control", settings.group));
    for (key, value) in &topology.kafka.consumer {
        control_config.set(key, value.to_string());
    }
    tokio::spawn(crate::serving::control::follow(
        control_config,
        topology.control_topic(),
        topology.model.name.clone(),
        model_channel.sender,
    ));
    let (shadow, shadow_thread) = if topology.model.shadows.is_empty() {
        (None, None)
    } else if transactions.is_some() {
        let (topic, codec) = topology.shadow_topic();
        (Some(ShadowOutput::Inline { topic, codec }), None)
    } else {
        let (topic, codec) = topology.shadow_topic();
        let (queue, thread) = crate::serving::shadow::start(
            producer.clone(),
            topic,
            codec,
            tokio::runtime::Handle::current(),
        );
        (Some(ShadowOutput::Queue(queue)), Some(thread))
    };

    let (monitor, monitor_task) = if topology.monitoring.enabled {
        let variants = match &topology.experiment {
            Some(e) => e.arms.iter().map(|a| a.name.clone()).collect(),
            None => vec!["champion".to_owned()],
        };
        let (handle, task) = crate::monitor::start(
            topology.monitoring.clone(),
            features.names().to_vec(),
            variants,
            models.clone(),
            alerts.clone(),
        );
        (Some(handle), Some(task))
    } else {
        (None, None)
    };
    let (commit_tx, commit_rx) = std::sync::mpsc::channel();
    let (fault_tx, fault_rx) = std::sync::mpsc::channel();
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let mirror_stop = Arc::new(AtomicBool::new(false));
    let (mirror, mirror_task) = match online_store {
        Some(store) => {
            let config = &topology.online_store;
            let mirror = Arc::new(crate::online_store::Mirror::new(
                config.max_pending_users,
                config.batch,
            ));
            let task = tokio::spawn(Arc::clone(&mirror).run(
                store,
                Arc::clone(&mirror_stop),
                Duration::from_secs(5),
            ));
            (Some(mirror), Some(task))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        topic: topology.source.topic.clone(),
        scored_types: topology.scored_types(),
        features,
        models,
        experiment: Experiment::from_topology(topology),
        shadow,
        monitor,
        changelog,
        codec: topology.source_codec(),
        predictions_topic: topology.sinks.predictions.topic.clone(),
        predictions_codec: topology.predictions_codec(),
        dead_letter_topic: topology.sinks.dead_letter.topic.clone(),
        log_features: settings.log_features,
        max_message_bytes: topology.max_message_bytes(),
        max_batch: topology.scoring.max_batch,
        checkpoint_interval: topology.checkpoint_interval(),
        backlog_checkpoint_interval: topology.backlog_checkpoint_interval(),
        idle_after: topology.idle_after(),
        max_hot_bytes: topology.max_hot_bytes(),
        assigned: std::sync::atomic::AtomicUsize::new(0),
        producer: producer.clone(),
        stats,
        mirror,
        transactions,
        commits: commit_tx,
        store_faults: fault_tx,
        fatal: fatal_tx,
    });

    let stop = Arc::new(AtomicBool::new(false));
    let source = crate::source::Source::start(
        settings.consumer_config(),
        Arc::clone(&shared),
        crate::source::StoreSlot::new(
            store,
            settings.state_dir.clone(),
            topology.state_hash(),
            topology.store_cache_bytes(),
        ),
        alerts.clone(),
        crate::source::Feedback {
            commits: commit_rx,
            store_faults: fault_rx,
        },
        Arc::clone(&stop),
        Arc::clone(&ready),
        tokio::runtime::Handle::current(),
    )?;
    tracing::info!(topic = %shared.topic, group = %settings.group, instance = %settings.instance_id,
        delivery = %topology.delivery, "worker started");

    let failure = tokio::select! {
        () = shutdown => None,
        error = fatal_rx.recv() => error,
    };
    ready.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    // The drain: the consumer stops fetching; each partition finishes the records it
    // was handed, waits until its outputs are acknowledged, checkpoints to sled and has
    // its offset committed; then the consumer unsubscribes and closes.
    let grace = topology.shutdown_grace();
    let started = std::time::Instant::now();
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "stopping: draining partitions"
    );
    let drained = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || source.join()));
    match drained.await {
        Ok(joined) => {
            joined.map_err(|e| WorkerError::Other(format!("consumer thread failed: {e}")))?
        }
        Err(_) => {
            return Err(WorkerError::Other(format!(
                "the drain did not finish within state.shutdown_grace ({grace:?}); partitions \
                 that did not checkpoint resume from their last checkpoint"
            )))
        }
    }
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "partitions drained"
    );
    drop(shared);
    if let Some(thread) = monitor_task {
        // Ends once the partitions' handles are gone.
        let joined = tokio::task::spawn_blocking(move || thread.join());
        let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
    }
    manager_stop.notify_one();
    let _ = manager_task.await;
    if let Some(thread) = shadow_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    // Every prediction and dead letter was acknowledged by the partitions' final
    // checkpoints; what may remain are best-effort records (alerts, shadow predictions).
    if let Err(e) = producer.flush(Duration::from_secs(2)) {
        tracing::warn!(error = %e, "best-effort records (alerts, shadow predictions) not delivered at shutdown");
    }
    mirror_stop.store(true, Ordering::SeqCst);
    if let Some(task) = mirror_task {
        let _ = task.await;
    }
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigValue;

    fn reference_settings() -> WorkerSettings {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topologies");
        let topology = Topology::load(&dir.join("ctr.yaml")).unwrap();
        WorkerSettings::from_topology(topology, dir)
    }

    #[test]
    fn the_consumer_retries_a_full_partition_queue_soon_unless_the_topology_says_otherwise() {
        let settings = reference_settings();
        let config = settings.consumer_config();
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(
            config.get("fetch.wait.max.ms"),
            Some("10"),
            "from the topology"
        );

        let mut settings = reference_settings();
        settings
            .topology
            .kafka
            .consumer
            .insert("fetch.queue.backoff.ms".into(), ConfigValue::Integer(250));
        assert_eq!(
            settings.consumer_config().get("fetch.queue.backoff.ms"),
            Some("250")
        );
    }
}
