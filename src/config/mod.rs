//! The topology file: what to read, which features to compute, which model to score and
//! where to write. Owns parsing and validation; never touches Kafka, sled or models.
//!
//! Loading happens in two steps. Serde checks the *shape* (unknown keys, wrong YAML
//! types) and reports the first such error with its path. [`Topology::validate`] then
//! checks the *meaning* of every section and returns every problem at once, each with
//! its path (`features[3].window: ...`), so one edit-run cycle fixes a whole file.

mod duration;
pub mod env;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::{parse_bytes, parse_duration};

use crate::codec::{Codec, EventType};
use crate::features::FeatureSet;

/// One problem in a topology file, with the path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read topology {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {location}{message}")]
    Syntax {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("{path} is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// The whole topology file, as written. Durations and enums stay strings here so that
/// validation can report every bad value rather than stopping at the first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Application name: prefixes the changelog/control topics and the consumer group.
    pub app: String,
    #[serde(default)]
    pub kafka: KafkaConfig,
    pub source: SourceConfig,
    pub features: Vec<FeatureConfig>,
    pub scoring: ScoringConfig,
    pub model: ModelConfig,
    pub sinks: SinksConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub online_store: OnlineStoreConfig,
    /// An experiment between models: a fixed split or a Thompson-sampling bandit.
    #[serde(default)]
    pub experiment: Option<ExperimentConfig>,
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    /// `at_least_once` (default: outputs acknowledged before the checkpoint, re-emitted
    /// identically after a crash) or `exactly_once` (Kafka transactions per input
    /// partition; see README "Delivery guarantees").
    #[serde(default = "default_delivery")]
    pub delivery: String,
}

/// How outputs reach Kafka relative to the input offsets (`delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Outputs acknowledged, then state and offset checkpointed; re-emitted identically
    /// after a crash.
    AtLeastOnce,
    /// Outputs, changelog records and input offsets committed in one Kafka transaction
    /// per partition and checkpoint.
    ExactlyOnce,
}

impl Delivery {
    pub const NAMES: [&'static str; 2] = ["at_least_once", "exactly_once"];

    pub fn parse(name: &str) -> Option<Delivery> {
        match name {
            "at_least_once" => Some(Delivery::AtLeastOnce),
            "exactly_once" => Some(Delivery::ExactlyOnce),
            _ => None,
        }
    }
}

/// Live drift and quality monitoring, with alert thresholds. An alert fires when its
/// condition holds on `raise_after` consecutive checks, resolves after `clear_after`
/// clean ones, and cannot fire again for `cooldown` after resolving.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    pub enabled: bool,
    /// Features watched for drift; empty: every feature the champion's reference covers.
    pub features: Vec<String>,
    /// Recent values kept per feature (and of the score); at most 10000.
    pub window: usize,
    /// Scored rows between two checks.
    pub check_every: usize,
    /// Fewest values in a window before it is tested.
    pub min_samples: usize,
    /// Feature and score drift: the KS p-value must be below this...
    pub ks_p_value: f64,
    /// ...and the PSI above this (significance and size, against alert fatigue).
    pub psi: f64,
    /// Mean score outside reference positive rate × (1 ± this).
    pub positive_rate_tolerance: f64,
    /// Rolling AUC below this fires `model_quality`.
    pub auc_floor: f64,
    /// Labelled predictions kept per model version and variant.
    pub label_window: usize,
    /// Fewest labels before quality is judged.
    pub min_labels: usize,
    pub raise_after: u32,
    pub clear_after: u32,
    pub cooldown: String,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            features: Vec::new(),
            window: 2_000,
            check_every: 2_000,
            min_samples: 1_000,
            ks_p_value: 0.01,
            psi: 0.2,
            positive_rate_tolerance: 0.5,
            auc_floor: 0.55,
            label_window: 10_000,
            min_labels: 1_000,
            raise_after: 2,
            clear_after: 3,
            cooldown: "10m".into(),
        }
    }
}

/// How impressions are shared between model variants. Each prediction carries its arm's
/// name as `variant`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Names the experiment; salts the split's user hash, so two experiments split
    /// users independently.
    pub name: String,
    /// `split` (sticky per user, by hash) or `bandit` (Thompson sampling).
    pub mode: String,
    pub arms: Vec<ArmConfig>,
    /// `bandit`: seed of the sampling (decisions are a function of the seed, the
    /// partition, the offset and the posteriors, so a replay decides the same).
    #[serde(default)]
    pub seed: u64,
    /// `bandit`: most impressions per partition waiting for their reward; beyond it new
    /// impressions are scored but not tracked (counted in a metric).
    #[serde(default = "default_max_pending_rewards")]
    pub max_pending_rewards: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    /// A version number or alias of `model.name`.
    pub model: String,
    /// `split`: the share of users; the fractions must add up to 1.
    #[serde(default)]
    pub fraction: Option<f64>,
}

fn default_max_pending_rewards() -> usize {
    1_000_000
}

/// The online store mirror (absent or empty `url`: off).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineStoreConfig {
    /// `redis://[:password@]host:port[/db]`, `rediss://…` (TLS) or `memory://`.
    #[serde(default)]
    pub url: String,
    /// Key prefix; the key is the prefix followed by the user id. Default `augur:<app>:user:`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Feature freshness limit: every key expires this long after its last write.
    #[serde(default = "default_online_ttl")]
    pub ttl: String,
    /// Users per pipelined write.
    #[serde(default = "default_online_batch")]
    pub batch: usize,
    /// Most users waiting in the mirror's queue; beyond it, partitions keep and re-offer.
    #[serde(default = "default_online_pending")]
    pub max_pending_users: usize,
}

impl Default for OnlineStoreConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: None,
            ttl: default_online_ttl(),
            batch: default_online_batch(),
            max_pending_users: default_online_pending(),
        }
    }
}

fn default_online_ttl() -> String {
    "7d".into()
}
fn default_online_batch() -> usize {
    500
}
fn default_online_pending() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group; defaults to the app name.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default = "default_session_timeout")]
    pub session_timeout: String,
    /// Longest pause between polls before the member is considered gone; also how long
    /// a broker waits for a vanished member during a rebalance (tansu waits this long
    /// before a restarted member gets its partitions back).
    #[serde(default = "default_max_poll_interval")]
    pub max_poll_interval: String,
    /// Raw librdkafka consumer settings, passed through unchanged.
    #[serde(default)]
    pub consumer: BTreeMap<String, ConfigValue>,
    /// Raw librdkafka producer settings, passed through unchanged.
    #[serde(default)]
    pub producer: BTreeMap<String, ConfigValue>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            group: None,
            session_timeout: default_session_timeout(),
            max_poll_interval: default_max_poll_interval(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// A librdkafka setting value; YAML numbers and booleans are accepted and passed as text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Text(s) => f.write_str(s),
            ConfigValue::Integer(i) => write!(f, "{i}"),
            ConfigValue::Float(x) => write!(f, "{x}"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub topic: String,
    #[serde(default = "default_codec")]
    pub codec: String,
    /// How far behind a user's newest event an event may be and still be applied.
    #[serde(default = "default_lateness")]
    pub lateness: String,
    /// Larger records are dead-lettered with reason `oversized`.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: String,
}

/// One feature, as declared. Which keys apply depends on `kind`; see `features`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub filter: Option<FilterConfig>,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub default: Option<f64>,
    /// `since_last`: the unit the elapsed time is expressed in (`1s`, `1d`, ...).
    #[serde(default)]
    pub unit: Option<String>,
    /// `ratio`: names of earlier features.
    #[serde(default)]
    pub numerator: Option<String>,
    #[serde(default)]
    pub denominator: Option<String>,
    /// `ratio`: the denominator is `max(denominator, min_denominator)`; default 1.
    #[serde(default)]
    pub min_denominator: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    #[serde(rename = "type")]
    pub event_type: OneOrMany,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    /// Event types that get a prediction.
    pub event_types: Vec<String>,
    /// Largest number of rows scored in one model call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Registry directory (`<registry>/<name>/<version>/model.onnx`); relative paths are
    /// resolved against the topology file's directory.
    pub registry: String,
    pub name: String,
    /// A version number or an alias (`champion`); default `champion`.
    #[serde(default = "default_model_version")]
    pub version: String,
    /// Versions or aliases scored beside the champion on the same features; their
    /// outputs go to the shadow-predictions topic only.
    #[serde(default)]
    pub shadows: Vec<String>,
    /// How often workers re-read the registry's aliases (changes also arrive at once on
    /// the `<app>-control` topic).
    #[serde(default = "default_model_poll")]
    pub poll_interval: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    pub predictions: TopicSink,
    pub dead_letter: TopicSink,
    /// Shadow models' predictions; default topic `<app>-shadow-predictions`.
    #[serde(default)]
    pub shadow_predictions: Option<TopicSink>,
    /// Alert records (a model that fails to load, ...); default topic `<app>-alerts`.
    #[serde(default)]
    pub alerts: Option<TopicSink>,
    /// Include the feature vector in every prediction.
    #[serde(default)]
    pub log_features: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSink {
    pub topic: String,
    #[serde(default = "default_codec")]
    pub codec: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "default_state_dir")]
    pub dir: String,
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: String,
    /// The checkpoint interval while a partition has a backlog (more records already
    /// queued for it when its checkpoint is due); unset: five times
    /// `checkpoint_interval`. A drain then writes each busy user once per this interval
    /// instead of once per `checkpoint_interval`.
    #[serde(default)]
    pub backlog_checkpoint_interval: Option<String>,
    /// Users not touched for this long (processing time) leave the hot map for sled.
    #[serde(default = "default_idle_after")]
    pub idle_after: String,
    /// On SIGTERM, how long the drain (finish the batch in flight, flush, checkpoint,
    /// commit, leave) may take; fits Kubernetes' default 30 s termination grace.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
    /// Byte budget of the worker's hot state (shared equally by its partitions); over
    /// it, the least recently touched users leave memory after a checkpoint.
    #[serde(default = "default_max_hot_bytes")]
    pub max_hot_bytes: String,
    /// Memory for sled's page cache (users out of the hot map are read through it).
    #[serde(default = "default_store_cache_bytes")]
    pub store_cache_bytes: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
            checkpoint_interval: default_checkpoint_interval(),
            backlog_checkpoint_interval: None,
            idle_after: default_idle_after(),
            shutdown_grace: default_shutdown_grace(),
            max_hot_bytes: default_max_hot_bytes(),
            store_cache_bytes: default_store_cache_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` for /metrics, /healthz, /readyz; empty disables the admin server.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_session_timeout() -> String {
    "10s".into()
}
fn default_max_poll_interval() -> String {
    "30s".into()
}
fn default_codec() -> String {
    "json".into()
}
fn default_lateness() -> String {
    "1h".into()
}
fn default_max_message() -> String {
    "1MiB".into()
}
fn default_max_batch() -> usize {
    256
}
fn default_model_version() -> String {
    "champion".into()
}
fn default_model_poll() -> String {
    "500ms".into()
}
fn default_state_dir() -> String {
    "/var/lib/augur".into()
}
fn default_checkpoint_interval() -> String {
    "1s".into()
}
fn default_idle_after() -> String {
    "10m".into()
}
fn default_shutdown_grace() -> String {
    "25s".into()
}
fn default_max_hot_bytes() -> String {
    "1GiB".into()
}
fn default_store_cache_bytes() -> String {
    "128MiB".into()
}
fn default_delivery() -> String {
    "at_least_once".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9898".into()
}

impl Topology {
    /// Reads, parses and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // `AUGUR_<SECTION>__<KEY>` variables override the file (env.rs).
        let (text, applied) =
            env::apply_to_text(&text, env::from_process()).map_err(|problems| {
                ConfigError::Invalid {
                    path: path.to_owned(),
                    problems,
                }
            })?;
        let topology = Self::parse(&text).map_err(|(location, message)| {
            let (location, message) = applied.explain(location, message);
            ConfigError::Syntax {
                path: path.to_owned(),
                location,
                message,
            }
        })?;
        let mut problems = topology.validate();
        problems.extend(env::librdkafka_problems(&topology));
        let problems: Vec<Problem> = problems.into_iter().map(|p| applied.annotate(p)).collect();
        if problems.is_empty() {
            Ok(topology)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Parses the YAML shape only. On error returns (location prefix, message), where
    /// the message starts with the path of the offending key.
    pub fn parse(text: &str) -> Result<Topology, (String, String)> {
        let deserializer = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            // serde_norway appends its own location to the message; keep only the cause.
            let text = inner.to_string();
            let cause = text.split(" at line ").next().unwrap_or(&text).to_owned();
            let message = if path == "." {
                cause
            } else {
                format!("{path}: {cause}")
            };
            (location, message)
        })
    }

    /// Checks the meaning of every section; returns every problem found.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.app.trim().is_empty() {
            problems.push(Problem::new("app", "must not be empty"));
        }
        if self.kafka.brokers.trim().is_empty() {
            problems.push(Problem::new("kafka.brokers", "must not be empty"));
        }
        check_duration(
            &mut problems,
            "kafka.session_timeout",
            &self.kafka.session_timeout,
        );
        check_duration(
            &mut problems,
            "kafka.max_poll_interval",
            &self.kafka.max_poll_interval,
        );
        if let (Ok(session), Ok(poll)) = (
            parse_duration(&self.kafka.session_timeout),
            parse_duration(&self.kafka.max_poll_interval),
        ) {
            if poll < session {
                problems.push(Problem::new(
                    "kafka.max_poll_interval",
                    format!(
                        "{} is shorter than kafka.session_timeout ({}); Kafka requires it to be at least as long",
                        self.kafka.max_poll_interval, self.kafka.session_timeout
                    ),
                ));
            }
        }

        check_topic(&mut problems, "source.topic", &self.source.topic);
        check_codec(&mut problems, "source.codec", &self.source.codec);
        check_duration(&mut problems, "source.lateness", &self.source.lateness);
        match parse_bytes(&self.source.max_message_bytes) {
            Ok(0) => problems.push(Problem::new("source.max_message_bytes", "must be positive")),
            Ok(_) => {}
            Err(e) => problems.push(Problem::new("source.max_message_bytes", e)),
        }

        if let Err(feature_problems) = FeatureSet::compile(&self.features, 3_600_000) {
            problems.extend(feature_problems);
        }

        if self.scoring.event_types.is_empty() {
            problems.push(Problem::new(
                "scoring.event_types",
                "must name at least one event type",
            ));
        }
        for (i, name) in self.scoring.event_types.iter().enumerate() {
            if EventType::parse(name).is_none() {
                problems.push(Problem::new(
                    format!("scoring.event_types[{i}]"),
                    format!(
                        "unknown event type \"{name}\" (expected {})",
                        EventType::NAMES.join(", ")
                    ),
                ));
            }
        }
        if !(1..=65_536).contains(&self.scoring.max_batch) {
            problems.push(Problem::new(
                "scoring.max_batch",
                "must be between 1 and 65536",
            ));
        }

        if self.model.registry.trim().is_empty() {
            problems.push(Problem::new("model.registry", "must not be empty"));
        }
        if self.model.name.trim().is_empty() || self.model.name.contains('/') {
            problems.push(Problem::new(
                "model.name",
                "must be a non-empty name without '/'",
            ));
        }

        for (i, shadow) in self.model.shadows.iter().enumerate() {
            if shadow.trim().is_empty() {
                problems.push(Problem::new(
                    format!("model.shadows[{i}]"),
                    "must not be empty",
                ));
            }
        }
        check_duration(
            &mut problems,
            "model.poll_interval",
            &self.model.poll_interval,
        );
        if let Some(experiment) = &self.experiment {
            experiment.validate(&mut problems);
        }
        self.monitoring.validate(&mut problems);
        if let Some(sink) = &self.sinks.shadow_predictions {
            check_topic(&mut problems, "sinks.shadow_predictions.topic", &sink.topic);
            check_codec(&mut problems, "sinks.shadow_predictions.codec", &sink.codec);
        }
        if let Some(sink) = &self.sinks.alerts {
            check_topic(&mut problems, "sinks.alerts.topic", &sink.topic);
            if sink.codec != "json" {
                problems.push(Problem::new("sinks.alerts.codec", "alerts are JSON"));
            }
        }

        check_topic(
            &mut problems,
            "sinks.predictions.topic",
            &self.sinks.predictions.topic,
        );
        check_codec(
            &mut problems,
            "sinks.predictions.codec",
            &self.sinks.predictions.codec,
        );
        check_topic(
            &mut problems,
            "sinks.dead_letter.topic",
            &self.sinks.dead_letter.topic,
        );
        if self.sinks.dead_letter.codec != "json" {
            problems.push(Problem::new(
                "sinks.dead_letter.codec",
                "dead letters keep the original bytes; only the default \"json\" is accepted",
            ));
        }
        if self.sinks.dead_letter.topic == self.source.topic {
            problems.push(Problem::new(
                "sinks.dead_letter.topic",
                "must differ from source.topic",
            ));
        }
        if self.sinks.predictions.topic == self.source.topic {
            problems.push(Problem::new(
                "sinks.predictions.topic",
                "must differ from source.topic",
            ));
        }

        if self.state.dir.trim().is_empty() {
            problems.push(Problem::new("state.dir", "must not be empty"));
        }
        check_duration(
            &mut problems,
            "state.checkpoint_interval",
            &self.state.checkpoint_interval,
        );
        if let Some(backlog) = &self.state.backlog_checkpoint_interval {
            let path = "state.backlog_checkpoint_interval";
            match (
                parse_duration(backlog),
                parse_duration(&self.state.checkpoint_interval),
            ) {
                (Ok(b), Ok(c)) if b < c => problems.push(Problem::new(
                    path,
                    format!(
                        "must not be shorter than state.checkpoint_interval ({})",
                        self.state.checkpoint_interval
                    ),
                )),
                (Ok(_), _) => {}
                (Err(e), _) => problems.push(Problem::new(path, e)),
            }
        }
        check_duration(&mut problems, "state.idle_after", &self.state.idle_after);
        check_duration(
            &mut problems,
            "state.shutdown_grace",
            &self.state.shutdown_grace,
        );
        match parse_bytes(&self.state.max_hot_bytes) {
            Ok(0) => problems.push(Problem::new("state.max_hot_bytes", "must be positive")),
            Ok(_) => {}
            Err(e) => problems.push(Problem::new("state.max_hot_bytes", e)),
        }
        if let Err(e) = parse_bytes(&self.state.store_cache_bytes) {
            problems.push(Problem::new("state.store_cache_bytes", e));
        }
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(Problem::new(
                "admin.listen",
                format!(
                    "expected host:port such as 127.0.0.1:9898, got \"{}\"",
                    self.admin.listen
                ),
            ));
        }
        let store = &self.online_store;
        if !store.url.is_empty()
            && !["redis://", "rediss://", "memory://"]
                .iter()
                .any(|s| store.url.starts_with(s))
        {
            problems.push(Problem::new(
                "online_store.url",
                format!(
                    "expected redis://, rediss:// or memory://, got \"{}\"",
                    crate::online_store::redact(&store.url)
                ),
            ));
        }
        check_duration(&mut problems, "online_store.ttl", &store.ttl);
        if !(1..=100_000).contains(&store.batch) {
            problems.push(Problem::new(
                "online_store.batch",
                "must be between 1 and 100000",
            ));
        }
        if store.max_pending_users == 0 {
            problems.push(Problem::new(
                "online_store.max_pending_users",
                "must be positive",
            ));
        }
        self.validate_delivery(&mut problems);
        problems
    }

    /// `delivery`, and the librdkafka settings that would break it.
    fn validate_delivery(&self, problems: &mut Vec<Problem>) {
        let Some(delivery) = Delivery::parse(&self.delivery) else {
            problems.push(Problem::new(
                "delivery",
                format!(
                    "unknown delivery \"{}\" (expected {})",
                    self.delivery,
                    Delivery::NAMES.join(" or ")
                ),
            ));
            return;
        };
        let setting = |map: &BTreeMap<String, ConfigValue>, key: &str| {
            map.get(key)
                .map(|v| v.to_string().trim().to_ascii_lowercase())
        };
        let producer = &self.kafka.producer;
        let consumer = &self.kafka.consumer;
        if setting(producer, "transactional.id").is_some() {
            let message = match delivery {
                Delivery::ExactlyOnce => {
                    "augur sets the transactional id itself with delivery: exactly_once \
                     (one per input partition, <group>-<topic>-<partition>, so that a \
                     restarted or new owner fences the old one); remove it"
                }
                Delivery::AtLeastOnce => {
                    "a transactional producer needs delivery: exactly_once (augur then sets \
                     one transactional id per input partition); remove it"
                }
            };
            problems.push(Problem::new("kafka.producer.transactional.id", message));
        }
        if delivery != Delivery::ExactlyOnce {
            return;
        }
        if let Some(value) = setting(producer, "enable.idempotence") {
            if !matches!(value.as_str(), "true" | "t" | "1") {
                problems.push(Problem::new(
                    "kafka.producer.enable.idempotence",
                    "delivery: exactly_once needs the idempotent producer (transactions \
                     imply it); remove the setting",
                ));
            }
        }
        if let Some(value) = setting(producer, "acks") {
            if !matches!(value.as_str(), "all" | "-1") {
                problems.push(Problem::new(
                    "kafka.producer.acks",
                    "delivery: exactly_once needs acks=all (the idempotent, transactional \
                     producer); remove the setting",
                ));
            }
        }
        if setting(consumer, "isolation.level").is_some_and(|v| v != "read_committed") {
            problems.push(Problem::new(
                "kafka.consumer.isolation.level",
                "delivery: exactly_once reads the changelog and the input with \
                 read_committed (records of aborted transactions must not be read); remove \
                 the setting",
            ));
        }
        if setting(consumer, "enable.auto.commit")
            .is_some_and(|v| !matches!(v.as_str(), "false" | "f" | "0"))
        {
            problems.push(Problem::new(
                "kafka.consumer.enable.auto.commit",
                "delivery: exactly_once commits the input offsets inside each transaction; \
                 an automatic commit outside it would break that; remove the setting",
            ));
        }
    }

    /// The delivery mode; the topology must have been validated.
    pub fn delivery(&self) -> Delivery {
        Delivery::parse(&self.delivery).expect("validated")
    }

    /// The online store's key layout for these features.
    pub fn online_layout(&self) -> crate::online_store::Layout {
        crate::online_store::Layout {
            prefix: self
                .online_store
                .prefix
                .clone()
                .unwrap_or_else(|| format!("augur:{}:user:", self.app)),
            names: self.feature_set().names().to_vec(),
            ttl: parse_duration(&self.online_store.ttl).expect("validated"),
        }
    }

    /// Where shadow models' predictions go.
    pub fn shadow_topic(&self) -> (String, Codec) {
        match &self.sinks.shadow_predictions {
            Some(sink) => (
                sink.topic.clone(),
                Codec::parse(&sink.codec).expect("validated"),
            ),
            None => (
                format!("{}-shadow-predictions", self.app),
                self.predictions_codec(),
            ),
        }
    }

    /// Where alert records go.
    pub fn alerts_topic(&self) -> String {
        match &self.sinks.alerts {
            Some(sink) => sink.topic.clone(),
            None => format!("{}-alerts", self.app),
        }
    }

    /// The changelog topic, partitioned like the input (see `state::changelog`).
    pub fn changelog_topic(&self) -> String {
        format!("{}-changelog", self.app)
    }

    /// The control topic every worker reads (model alias changes).
    pub fn control_topic(&self) -> String {
        format!("{}-control", self.app)
    }

    pub fn model_poll_interval(&self) -> Duration {
        parse_duration(&self.model.poll_interval).expect("validated")
    }

    /// The consumer group: `kafka.group`, else the app name.
    pub fn group(&self) -> String {
        self.kafka.group.clone().unwrap_or_else(|| self.app.clone())
    }

    pub fn lateness(&self) -> Duration {
        parse_duration(&self.source.lateness).expect("validated")
    }

    pub fn session_timeout(&self) -> Duration {
        parse_duration(&self.kafka.session_timeout).expect("validated")
    }

    pub fn max_poll_interval(&self) -> Duration {
        parse_duration(&self.kafka.max_poll_interval).expect("validated")
    }

    pub fn checkpoint_interval(&self) -> Duration {
        parse_duration(&self.state.checkpoint_interval).expect("validated")
    }

    /// `state.backlog_checkpoint_interval`, or five times the checkpoint interval.
    pub fn backlog_checkpoint_interval(&self) -> Duration {
        match &self.state.backlog_checkpoint_interval {
            Some(text) => parse_duration(text).expect("validated"),
            None => self.checkpoint_interval() * 5,
        }
    }

    pub fn store_cache_bytes(&self) -> u64 {
        parse_bytes(&self.state.store_cache_bytes).expect("validated")
    }

    pub fn max_hot_bytes(&self) -> usize {
        parse_bytes(&self.state.max_hot_bytes).expect("validated") as usize
    }

    pub fn shutdown_grace(&self) -> Duration {
        parse_duration(&self.state.shutdown_grace).expect("validated")
    }

    pub fn idle_after(&self) -> Duration {
        parse_duration(&self.state.idle_after).expect("validated")
    }

    pub fn max_message_bytes(&self) -> usize {
        parse_bytes(&self.source.max_message_bytes).expect("validated") as usize
    }

    pub fn source_codec(&self) -> Codec {
        Codec::parse(&self.source.codec).expect("validated")
    }

    pub fn predictions_codec(&self) -> Codec {
        Codec::parse(&self.sinks.predictions.codec).expect("validated")
    }

    /// The compiled features; the topology must have been validated.
    pub fn feature_set(&self) -> FeatureSet {
        FeatureSet::compile(&self.features, self.lateness().as_millis() as i64).expect("validated")
    }

    /// Event types that are scored, as a bit mask over [`EventType`].
    pub fn scored_types(&self) -> crate::codec::TypeMask {
        self.scoring
            .event_types
            .iter()
            .filter_map(|name| EventType::parse(name))
            .collect()
    }

    /// A stable hash of the parts of the topology that shape the state (the features and
    /// the lateness): state written under one hash is not read under another.
    pub fn state_hash(&self) -> u64 {
        let mut text = format!("lateness={};", self.source.lateness);
        for f in &self.features {
            text.push_str(&format!("{f:?};"));
        }
        crate::util::fnv1a64(text.as_bytes())
    }
}

impl MonitoringConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                problems.push(Problem::new(format!("monitoring.{key}"), message));
            }
        };
        check(
            (2..=crate::monitor::stats::MAX_EXACT).contains(&self.window),
            "window",
            "must be between 2 and 10000",
        );
        check(self.check_every > 0, "check_every", "must be positive");
        check(
            (2..=self.window.max(2)).contains(&self.min_samples),
            "min_samples",
            "must be between 2 and monitoring.window",
        );
        check(
            self.ks_p_value > 0.0 && self.ks_p_value < 1.0,
            "ks_p_value",
            "must be between 0 and 1",
        );
        check(self.psi >= 0.0, "psi", "must not be negative");
        check(
            self.positive_rate_tolerance > 0.0,
            "positive_rate_tolerance",
            "must be positive",
        );
        check(
            (0.0..=1.0).contains(&self.auc_floor),
            "auc_floor",
            "must be between 0 and 1",
        );
        check(self.label_window > 0, "label_window", "must be positive");
        check(self.raise_after > 0, "raise_after", "must be at least 1");
        check(self.clear_after > 0, "clear_after", "must be at least 1");
        if let Err(e) = parse_duration(&self.cooldown) {
            problems.push(Problem::new("monitoring.cooldown", e));
        }
    }
}

impl ExperimentConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        if self.name.trim().is_empty() {
            problems.push(Problem::new("experiment.name", "must not be empty"));
        }
        let split = match self.mode.as_str() {
            "split" => true,
            "bandit" => false,
            other => {
                problems.push(Problem::new(
                    "experiment.mode",
                    format!("unknown mode \"{other}\" (expected split or bandit)"),
                ));
                return;
            }
        };
        if !(2..=16).contains(&self.arms.len()) {
            problems.push(Problem::new(
                "experiment.arms",
                format!("needs 2 to 16 arms, has {}", self.arms.len()),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0.0;
        for (i, arm) in self.arms.iter().enumerate() {
            let path = format!("experiment.arms[{i}]");
            if arm.name.trim().is_empty() || !seen.insert(arm.name.as_str()) {
                problems.push(Problem::new(
                    format!("{path}.name"),
                    format!("arm names must be non-empty and unique (\"{}\")", arm.name),
                ));
            }
            if arm.model.trim().is_empty() {
                problems.push(Problem::new(format!("{path}.model"), "must not be empty"));
            }
            match (split, arm.fraction) {
                (true, Some(f)) if (0.0..=1.0).contains(&f) => total += f,
                (true, Some(f)) => problems.push(Problem::new(
                    format!("{path}.fraction"),
                    format!("{f} is not between 0 and 1"),
                )),
                (true, None) => problems.push(Problem::new(
                    format!("{path}.fraction"),
                    "a split needs a fraction for every arm",
                )),
                (false, Some(_)) => problems.push(Problem::new(
                    format!("{path}.fraction"),
                    "a bandit chooses arms itself; remove the fraction",
                )),
                (false, None) => {}
            }
        }
        if split && !self.arms.is_empty() && (total - 1.0).abs() > 1e-9 {
            problems.push(Problem::new(
                "experiment.arms",
                format!("the fractions add up to {total}, not 1"),
            ));
        }
        if self.max_pending_rewards == 0 {
            problems.push(Problem::new(
                "experiment.max_pending_rewards",
                "must be positive",
            ));
        }
    }
}

fn check_duration(problems: &mut Vec<Problem>, path: &str, value: &str) {
    match parse_duration(value) {
        Ok(d) if d.is_zero() => problems.push(Problem::new(path, "must be greater than zero")),
        Ok(_) => {}
        Err(e) => problems.push(Problem::new(path, e)),
    }
}

fn check_codec(problems: &mut Vec<Problem>, path: &str, value: &str) {
    if Codec::parse(value).is_none() {
        problems.push(Problem::new(
            path,
            format!("unknown codec \"{value}\" (expected json or protobuf)"),
        ));
    }
}

/// Kafka's own rule: 1-249 characters of `[a-zA-Z0-9._-]`.
fn check_topic(problems: &mut Vec<Problem>, path: &str, topic: &str) {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty()
        || topic.len() > 249
        || !topic.chars().all(legal)
        || topic == "."
        || topic == ".."
    {
        problems.push(Problem::new(
            path,
            format!("\"{topic}\" is not a legal Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Topology {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/ctr.yaml"))
                .unwrap();
        Topology::parse(&text).unwrap()
    }

    fn problems(t: &Topology) -> Vec<String> {
        t.validate().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn delivery_defaults_to_at_least_once_and_accepts_exactly_once() {
        let mut t = reference();
        assert_eq!(t.delivery, "at_least_once");
        assert_eq!(t.delivery(), Delivery::AtLeastOnce);
        t.delivery = "exactly_once".into();
        assert!(problems(&t).is_empty(), "{:?}", problems(&t));
        assert_eq!(t.delivery(), Delivery::ExactlyOnce);
        // Settings that agree with transactions are fine.
        for (key, value) in [("enable.idempotence", "true"), ("acks", "all")] {
            t.kafka
                .producer
                .insert(key.into(), ConfigValue::Text(value.into()));
        }
        t.kafka.consumer.insert(
            "isolation.level".into(),
            ConfigValue::Text("read_committed".into()),
        );
        assert!(problems(&t).is_empty(), "{:?}", problems(&t));
    }

    #[test]
    fn exactly_once_refuses_settings_that_break_it_naming_each_path() {
        let mut t = reference();
        t.delivery = "exactly_once".into();
        let producer = &mut t.kafka.producer;
        producer.insert("transactional.id".into(), ConfigValue::Text("mine".into()));
        producer.insert("enable.idempotence".into(), ConfigValue::Bool(false));
        producer.insert("acks".into(), ConfigValue::Integer(1));
        let consumer = &mut t.kafka.consumer;
        consumer.insert(
            "isolation.level".into(),
            ConfigValue::Text("read_uncommitted".into()),
        );
        consumer.insert("enable.auto.commit".into(), ConfigValue::Bool(true));
        let got = problems(&t);
        assert_eq!(got.len(), 5, "{got:?}");
        for prefix in [
            "kafka.producer.transactional.id: augur sets the transactional id itself",
            "kafka.producer.enable.idempotence: delivery: exactly_once needs the idempotent producer",
            "kafka.producer.acks: delivery: exactly_once needs acks=all",
            "kafka.consumer.isolation.level: delivery: exactly_once reads",
            "kafka.consumer.enable.auto.commit: delivery: exactly_once commits",
        ] {
            assert!(got.iter().any(|p| p.starts_with(prefix)), "{prefix}: {got:?}");
        }
    }

    #[test]
    fn at_least_once_refuses_a_transactional_id_and_unknown_modes_are_named() {
        let mut t = reference();
        t.kafka
            .producer
            .insert("transactional.id".into(), ConfigValue::Text("mine".into()));
        // At least once only cares about the transactional id.
        t.kafka
            .consumer
            .insert("enable.auto.commit".into(), ConfigValue::Bool(false));
        let got = problems(&t);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with(
                "kafka.producer.transactional.id: a transactional producer needs delivery: exactly_once"
            ),
            "{got:?}"
        );
        let mut t = reference();
        t.delivery = "exactly-once".into();
        assert_eq!(
            problems(&t),
            ["delivery: unknown delivery \"exactly-once\" (expected at_least_once or exactly_once)"]
        );
    }
}
