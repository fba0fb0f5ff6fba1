//! The `augur` command line. Every `run` flag can also be set by an `AUGUR_*`
//! environment variable (for containers); flags win over variables, which win over
//! the topology file.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Topology;
use crate::model::ModelRegistry;
use crate::pipeline::{run_worker, WorkerSettings};
use crate::stats::Stats;

#[derive(Parser, Debug)]
#[command(
    name = "augur",
    version,
    about = "Streaming prediction engine on Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a worker: consume events, keep state, score, produce predictions.
    Run(RunArgs),
    /// Check a topology file; lists every problem with its path.
    Validate {
        /// The topology file.
        file: PathBuf,
    },
    /// Everything in one process on an embedded broker: no services needed.
    Demo(crate::demo::DemoArgs),
    /// Replay recorded events through the stream's feature code into training data.
    Backfill(BackfillArgs),
    /// Compare logged online features with the same features recomputed offline.
    SkewReport(SkewArgs),
    /// Batch prediction: score recorded events with the registry's model.
    Score(ScoreArgs),
    /// The model registry.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Write scenario-shaped events to a JSON-lines file.
    Gen(GenArgs),
    /// Read the online store.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Events to a registered model in one command: backfill, then training/train.py
    /// (validate, split by time, train, evaluate, export, register, promote if better).
    Train(TrainArgs),
}

#[derive(Subcommand, Debug)]
enum FeaturesCommand {
    /// Print a user's latest features from the online store, as JSON.
    Get {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        /// Online store URL (default: the topology's online_store.url).
        #[arg(long, env = "AUGUR_ONLINE_STORE")]
        online_store: Option<String>,
        user_id: String,
    },
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    #[arg(long, env = "AUGUR_TOPOLOGY")]
    topology: PathBuf,
    #[command(flatten)]
    input: OfflineInput,
    /// Where train.py writes the candidate before it is registered.
    #[arg(long)]
    out: PathBuf,
    /// The training script.
    #[arg(long, env = "AUGUR_TRAIN_SCRIPT", default_value = "training/train.py")]
    script: PathBuf,
    /// Python with the training requirements (default: .venv/bin/python, else python3).
    #[arg(long, env = "AUGUR_PYTHON")]
    python: Option<PathBuf>,
    /// Further arguments for train.py (after `--`), e.g. `-- --C 0.5`.
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Versions and aliases of a model.
    List {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        /// Model name (default: the topology's).
        name: Option<String>,
    },
    /// Check a model directory against the topology and add it as the next version.
    Register {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        /// Directory with model.onnx and model.json.
        dir: PathBuf,
        /// Model name (default: the topology's).
        #[arg(long)]
        name: Option<String>,
    },
    /// Point an alias at a version (default `champion`; the old champion becomes
    /// `previous`). Running workers switch within 2 s.
    Promote {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        name: String,
        version: u32,
        /// The alias to move.
        #[arg(long, default_value = "champion")]
        alias: String,
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Swap `champion` and `previous`: running workers switch back within 2 s.
    Rollback {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        name: String,
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Mark a version archived (refused while an alias points at it).
    Archive {
        #[arg(long, env = "AUGUR_TOPOLOGY")]
        topology: PathBuf,
        name: String,
        version: u32,
    },
}

/// Where alias changes are announced (the `<app>-control` topic).
#[derive(clap::Args, Debug)]
struct NotifyArgs {
    /// Kafka bootstrap servers (default: the topology's).
    #[arg(long, env = "AUGUR_BROKERS")]
    brokers: Option<String>,
    /// Only change the registry; workers then notice by polling it.
    #[arg(long)]
    no_notify: bool,
}

#[derive(clap::Args, Debug)]
struct GenArgs {
    /// Length of the stream: events 0..N (with --from F, F..N are emitted).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Number of distinct users.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Event time of the first event (ms since epoch; default 2026-01-01).
    #[arg(long, default_value_t = 1_767_225_600_000)]
    start_ts: i64,
    /// Event-time step between events, in ms.
    #[arg(long, default_value_t = 50)]
    step_ms: i64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output file (JSON lines).
    #[arg(
        long,
        required_unless_present = "to_topic",
        conflicts_with = "to_topic"
    )]
    out: Option<PathBuf>,
    /// Produce to this Kafka topic instead (keyed by user_id), as fast as it takes them.
    #[arg(long, requires = "brokers")]
    to_topic: Option<String>,
    /// Kafka bootstrap servers for --to-topic.
    #[arg(long, env = "AUGUR_BROKERS")]
    brokers: Option<String>,
    /// Events per second of wall-clock time (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Mean events per user before it churns and a new user takes its place (0: never).
    #[arg(long, default_value_t = 0)]
    lifetime: u32,
    /// Give users a click affinity, so past click rates predict clicks.
    #[arg(long)]
    affinity: bool,
    /// Inject drift: `clicks=F` (click propensity ×F), `categories` (the category mix
    /// narrows to a quarter), or `amounts=F` (purchase amounts ×F).
    #[arg(long, requires = "drift_at")]
    drift: Option<crate::gen::Drift>,
    /// Index of the first drifted event (its event time is start_ts + index × step_ms).
    #[arg(long, requires = "drift")]
    drift_at: Option<u64>,
    /// Emit from this event index on (the stream before it is generated and dropped),
    /// to continue a stream written by an earlier run.
    #[arg(long, default_value_t = 0)]
    from: u64,
}

/// Where offline events come from.
#[derive(clap::Args, Debug)]
struct OfflineInput {
    /// Events file: JSON lines, or `.parquet` with the event columns.
    #[arg(
        long,
        required_unless_present = "from_topic",
        conflicts_with = "from_topic"
    )]
    input: Option<PathBuf>,
    /// Read the events from this Kafka topic (beginning to current end) instead.
    #[arg(long, requires = "brokers")]
    from_topic: Option<String>,
    /// Kafka bootstrap servers for --from-topic.
    #[arg(long, env = "AUGUR_BROKERS")]
    brokers: Option<String>,
    /// Write every refused input record here as a JSON line (they are always counted).
    #[arg(long)]
    rejects: Option<PathBuf>,
}

impl OfflineInput {
    fn events(&self, topology: &Topology) -> crate::offline::EventInput {
        match (&self.input, &self.from_topic) {
            (Some(path), _) => crate::offline::EventInput::File(path.clone()),
            (None, Some(topic)) => crate::offline::EventInput::Topic {
                brokers: self.brokers.clone().unwrap_or_default(),
                topic: topic.clone(),
                codec: topology.source_codec(),
            },
            (None, None) => unreachable!("clap requires one"),
        }
    }

    fn rejections(&self) -> anyhow::Result<crate::offline::Rejections> {
        match &self.rejects {
            Some(path) => crate::offline::Rejections::with_file(path)
                .with_context(|| format!("creating {}", path.display())),
            None => Ok(Default::default()),
        }
    }
}

#[derive(clap::Args, Debug)]
struct BackfillArgs {
    /// Topology file: its features are the ones computed.
    #[arg(long, env = "AUGUR_TOPOLOGY")]
    topology: PathBuf,
    #[command(flatten)]
    input: OfflineInput,
    /// Output: `.parquet` or `.csv`.
    #[arg(long)]
    out: PathBuf,
    /// A row for every event, not only scored ones (their label is empty).
    #[arg(long)]
    all_events: bool,
}

#[derive(clap::Args, Debug)]
struct SkewArgs {
    #[arg(long, env = "AUGUR_TOPOLOGY")]
    topology: PathBuf,
    /// Logged predictions with features: a `.jsonl` file or a topic name.
    #[arg(long)]
    logged: String,
    /// The events behind them: a file or a topic name.
    #[arg(long)]
    events: String,
    /// Kafka bootstrap servers, when either is a topic.
    #[arg(long, env = "AUGUR_BROKERS")]
    brokers: Option<String>,
    /// Largest accepted relative difference.
    #[arg(long, default_value_t = 1e-9)]
    tolerance: f64,
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    #[arg(long, env = "AUGUR_TOPOLOGY")]
    topology: PathBuf,
    #[command(flatten)]
    input: OfflineInput,
    /// Output: `.jsonl` or `.parquet`.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Topology file.
    #[arg(long, env = "AUGUR_TOPOLOGY")]
    topology: PathBuf,
    /// Kafka bootstrap servers (overrides kafka.brokers).
    #[arg(long, env = "AUGUR_BROKERS")]
    brokers: Option<String>,
    /// Consumer group (overrides kafka.group; default: the app name).
    #[arg(long, env = "AUGUR_GROUP")]
    group: Option<String>,
    /// Static group membership id (default: the host name, i.e. the pod name).
    #[arg(long, env = "AUGUR_INSTANCE_ID")]
    instance_id: Option<String>,
    /// State directory (overrides state.dir).
    #[arg(long, env = "AUGUR_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Include the feature vector in every prediction (overrides sinks.log_features).
    #[arg(long, env = "AUGUR_LOG_FEATURES")]
    log_features: bool,
    /// Consumer session timeout, e.g. 10s (overrides kafka.session_timeout).
    #[arg(long, env = "AUGUR_SESSION_TIMEOUT")]
    session_timeout: Option<String>,
    /// Admin address for /metrics, /healthz, /readyz (overrides admin.listen; "" disables).
    #[arg(long, env = "AUGUR_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Online store URL (overrides online_store.url; "" disables).
    #[arg(long, env = "AUGUR_ONLINE_STORE")]
    online_store: Option<String>,
    /// Bearer token for the admin API's model endpoints (promote, rollback); without
    /// it they are disabled.
    #[arg(long, env = "AUGUR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_tracing(default_level);
    let result = match cli.command {
        Command::Validate { file } => return validate(&file),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run(args))),
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(crate::demo::run(args))),
        Command::Backfill(args) => backfill(args),
        Command::SkewReport(args) => return skew_report(args),
        Command::Score(args) => score(args),
        Command::Models(command) => models(command),
        Command::Gen(args) => gen(args),
        Command::Train(args) => train(args),
        Command::Features(command) => runtime().and_then(|rt| rt.block_on(features(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("augur: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message
/// already includes (our error types name their cause in their own message).
fn render_error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// JSON logs when not on a terminal (containers), human ones otherwise.
fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUGUR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

fn validate(file: &Path) -> ExitCode {
    match Topology::load(file) {
        Ok(topology) => {
            println!(
                "{}: ok ({} features, app {})",
                file.display(),
                topology.features.len(),
                topology.app
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    let dir = args
        .topology
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut settings = WorkerSettings::from_topology(topology, dir);
    if let Some(brokers) = args.brokers {
        settings.brokers = brokers;
    }
    if let Some(group) = args.group {
        settings.group = group;
    }
    if let Some(id) = args.instance_id {
        settings.instance_id = id;
    }
    if let Some(dir) = args.state_dir {
        settings.state_dir = dir;
    }
    if let Some(timeout) = args.session_timeout {
        settings.session_timeout = crate::config::parse_duration(&timeout)
            .map_err(|e| anyhow::anyhow!("--session-timeout / AUGUR_SESSION_TIMEOUT: {e}"))?;
    }
    settings.log_features |= args.log_features;
    let listen = args
        .admin_listen
        .unwrap_or_else(|| settings.topology.admin.listen.clone());

    let url = args
        .online_store
        .unwrap_or_else(|| settings.topology.online_store.url.clone());
    let store = if url.is_empty() {
        None
    } else {
        Some(crate::online_store::OnlineStore::open(
            &url,
            settings.topology.online_layout(),
        )?)
    };
    let reader = store
        .as_ref()
        .map(|s| Arc::new(tokio::sync::Mutex::new(s.reopen())));

    let stats = Arc::new(Stats::default());
    let ready = Arc::new(AtomicBool::new(false));
    let model_channel = crate::pipeline::ModelChannel::new();
    let handle = crate::metrics::install().context("installing the metrics recorder")?;
    if !listen.is_empty() {
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("admin address \"{listen}\""))?;
        let mut control = rdkafka::ClientConfig::new();
        control.set("bootstrap.servers", &settings.brokers);
        for (key, value) in &settings.topology.kafka.producer {
            control.set(key, value.to_string());
        }
        let models = Arc::new(crate::admin::ModelAdmin {
            registry: Arc::new(registry_of(&args.topology, &settings.topology)),
            name: settings.topology.model.name.clone(),
            token: args.admin_token.filter(|t| !t.is_empty()),
            commands: model_channel.sender.clone(),
            control: (control, settings.topology.control_topic()),
        });
        let bound = crate::admin::serve(addr, handle, Arc::clone(&ready), reader, Some(models))
            .await
            .with_context(|| format!("binding the admin server on {addr}"))?;
        tracing::info!(%bound, "admin server: /metrics /healthz /readyz /v1/features/{{user_id}}");
    }
    run_worker(
        settings,
        store,
        model_channel,
        stats,
        ready,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
    // Give log lines a moment to flush in containers that kill quickly.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn backfill(args: BackfillArgs) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    let events = args.input.events(&topology);
    let summary = crate::offline::backfill(
        &topology.feature_set(),
        topology.scored_types(),
        &events,
        &args.out,
        args.all_events,
        args.input.rejections()?,
    )?;
    println!(
        "backfill: {} events from {} -> {} rows in {} ({} users), {:.0} events/s",
        summary.events,
        events.describe(),
        summary.rows,
        args.out.display(),
        summary.users,
        summary.events_per_second
    );
    println!("{}", summary.rejections.report());
    Ok(())
}

/// A file when it exists, else a topic (which needs brokers).
fn file_or_topic(
    value: &str,
    brokers: &Option<String>,
    what: &str,
) -> anyhow::Result<(Option<PathBuf>, Option<String>)> {
    let path = PathBuf::from(value);
    if path.is_file() {
        return Ok((Some(path), None));
    }
    match brokers {
        Some(_) => Ok((None, Some(value.to_owned()))),
        None => anyhow::bail!(
            "{what} {value:?} is not a file, and no --brokers were given to read it as a topic"
        ),
    }
}

fn skew_report(args: SkewArgs) -> ExitCode {
    let run = || -> anyhow::Result<bool> {
        let topology = Topology::load(&args.topology)?;
        let brokers = args.brokers.clone().unwrap_or_default();
        let logged = file_or_topic(&args.logged, &args.brokers, "--logged")?;
        let logged = match &logged {
            (Some(path), _) => crate::offline::LoggedSource::File(path),
            (None, Some(topic)) => crate::offline::LoggedSource::Topic {
                brokers: &brokers,
                topic,
            },
            _ => unreachable!(),
        };
        let events = match file_or_topic(&args.events, &args.brokers, "--events")? {
            (Some(path), _) => crate::offline::EventInput::File(path),
            (None, Some(topic)) => crate::offline::EventInput::Topic {
                brokers: brokers.clone(),
                topic,
                codec: topology.source_codec(),
            },
            _ => unreachable!(),
        };
        let report = crate::offline::skew_report(
            &topology.feature_set(),
            topology.scored_types(),
            &logged,
            &events,
            args.tolerance,
        )?;
        print!("{}", report.render());
        println!("{}", report.rejections.report());
        Ok(report.is_clean())
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("augur: skew found (or nothing compared)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("augur: {}", render_error(&e));
            ExitCode::from(2)
        }
    }
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    let features = topology.feature_set();
    let registry = registry_of(&args.topology, &topology);
    let (_, model_dir) = registry.resolve(&topology.model.name, &topology.model.version)?;
    let model = crate::model::Model::load(&model_dir, features.names())?;
    let events = args.input.events(&topology);
    let summary = crate::offline::score(
        &features,
        topology.scored_types(),
        &model,
        &events,
        &args.out,
        args.input.rejections()?,
    )?;
    println!(
        "score: {} events from {} -> {} predictions by {} v{} in {}, {:.0} events/s",
        summary.events,
        events.describe(),
        summary.predictions,
        model.meta.name,
        model.meta.version,
        args.out.display(),
        summary.events_per_second
    );
    println!("{}", summary.rejections.report());
    Ok(())
}

fn registry_of(topology_path: &Path, topology: &Topology) -> crate::model::DirRegistry {
    let dir = topology_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    crate::model::DirRegistry::open(dir.join(&topology.model.registry))
}

fn models(command: ModelsCommand) -> anyhow::Result<()> {
    use crate::serving::AliasOp;
    let (path, name, op, notify) = match command {
        ModelsCommand::List {
            topology: path,
            name,
        } => {
            let topology = Topology::load(&path)?;
            let registry = registry_of(&path, &topology);
            let name = name.unwrap_or_else(|| topology.model.name.clone());
            println!("{:<10} {:<8} {:<11} aliases", "model", "version", "stage");
            for (version, stage, aliases) in registry.stages(&name)? {
                println!(
                    "{name:<10} {:<8} {stage:<11} {}",
                    format!("v{version}"),
                    aliases.join(",")
                );
            }
            return Ok(());
        }
        ModelsCommand::Register {
            topology: path,
            dir,
            name,
        } => {
            let topology = Topology::load(&path)?;
            let registry = registry_of(&path, &topology);
            let name = name.unwrap_or_else(|| topology.model.name.clone());
            let version = registry.register(&name, &dir, topology.feature_set().names())?;
            println!(
                "registered {name} v{version} from {} in {}",
                dir.display(),
                registry.root().display()
            );
            return Ok(());
        }
        ModelsCommand::Archive {
            topology: path,
            name,
            version,
        } => {
            let topology = Topology::load(&path)?;
            registry_of(&path, &topology).archive(&name, version)?;
            println!("{name}: v{version} archived");
            return Ok(());
        }
        ModelsCommand::Promote {
            topology,
            name,
            version,
            alias,
            notify,
        } => (topology, name, AliasOp::Promote { alias, version }, notify),
        ModelsCommand::Rollback {
            topology,
            name,
            notify,
        } => (topology, name, AliasOp::Rollback, notify),
    };
    let topology = Topology::load(&path)?;
    let registry = registry_of(&path, &topology);
    let (summary, aliases) = crate::serving::change_aliases(&registry, &name, &op)?;
    println!("{summary}");
    if notify.no_notify {
        return Ok(());
    }
    let mut config = rdkafka::ClientConfig::new();
    config.set(
        "bootstrap.servers",
        notify.brokers.as_deref().unwrap_or(&topology.kafka.brokers),
    );
    for (key, value) in &topology.kafka.producer {
        config.set(key, value.to_string());
    }
    let change = crate::serving::control::AliasChange {
        model: name,
        aliases,
        by: format!(
            "augur models {}",
            if matches!(op, AliasOp::Rollback) {
                "rollback"
            } else {
                "promote"
            }
        ),
        at_ms: crate::codec::now_ms(),
    };
    let topic = topology.control_topic();
    match runtime()?.block_on(crate::serving::control::publish(config, &topic, &change)) {
        Ok(()) => println!("announced on {topic}"),
        Err(e) => eprintln!(
            "augur: warning: could not announce the change on {topic} ({e}); running workers \
             will still see it when they next poll the registry ({})",
            topology.model.poll_interval
        ),
    }
    Ok(())
}

fn gen(args: GenArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let options = crate::gen::GenOptions {
        lifetime: args.lifetime,
        affinity: args.affinity,
        drift: args
            .drift
            .zip(args.drift_at)
            .map(|(d, at)| (args.start_ts + at as i64 * args.step_ms, d)),
    };
    let mut generator = crate::gen::Generator::with_options(args.seed, args.users, options);
    for i in 0..args.from {
        generator.next_event(args.start_ts + i as i64 * args.step_ms);
    }
    let started = std::time::Instant::now();
    let first = args.from;
    let mut next = |i: u64| {
        if let Some(rate) = args.rate.filter(|r| *r > 0.0) {
            let due = std::time::Duration::from_secs_f64((i - first) as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        generator.next_event(args.start_ts + i as i64 * args.step_ms)
    };
    let progress_every = (args.events / 20).max(1);
    if let (Some(topic), Some(brokers)) = (&args.to_topic, &args.brokers) {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("creating the producer")?;
        for i in args.from..args.events {
            let event = next(i);
            if i > 0 && i % progress_every == 0 && std::io::stderr().is_terminal() {
                eprint!("\rgen: {i} / {} events", args.events);
            }
            let payload = crate::gen::event_json(&event);
            let mut record = BaseRecord::to(topic).key(&event.user_id).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        record = back;
                        producer.poll(std::time::Duration::from_millis(5));
                    }
                    Err((e, _)) => anyhow::bail!("producing to {topic}: {e}"),
                }
            }
        }
        producer
            .flush(std::time::Duration::from_secs(60))
            .context("flushing the producer")?;
        println!(
            "gen: {} events for {} users -> topic {topic}",
            args.events, args.users
        );
        return Ok(());
    }
    let out_path = args.out.expect("clap requires --out or --to-topic");
    let file = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    for i in args.from..args.events {
        writeln!(out, "{}", crate::gen::event_json(&next(i)))
            .with_context(|| format!("writing {}", out_path.display()))?;
    }
    out.flush()?;
    println!(
        "gen: {} events for {} users -> {}",
        args.events,
        args.users,
        out_path.display()
    );
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    if !args.script.is_file() {
        anyhow::bail!(
            "training script {} not found (set --script or AUGUR_TRAIN_SCRIPT)",
            args.script.display()
        );
    }
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/python");
        if venv.is_file() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let data = work.path().join("train.parquet");
    let events = args.input.events(&topology);
    let summary = crate::offline::backfill(
        &topology.feature_set(),
        topology.scored_types(),
        &events,
        &data,
        false,
        args.input.rejections()?,
    )?;
    println!(
        "train: backfill of {} events -> {} labelled rows",
        summary.events, summary.rows
    );
    println!("{}", summary.rejections.report());
    let me = std::env::current_exe().context("locating the augur binary")?;
    let status = std::process::Command::new(&python)
        .arg(&args.script)
        .arg("--features")
        .arg(&data)
        .arg("--out")
        .arg(&args.out)
        .arg("--register")
        .arg("--topology")
        .arg(&args.topology)
        .arg("--augur")
        .arg(&me)
        .args(&args.extra)
        .status()
        .with_context(|| format!("running {} {}", python.display(), args.script.display()))?;
    if !status.success() {
        anyhow::bail!("{} failed with {status}", args.script.display());
    }
    Ok(())
}

async fn features(command: FeaturesCommand) -> anyhow::Result<()> {
    let FeaturesCommand::Get {
        topology: path,
        online_store,
        user_id,
    } = command;
    let topology = Topology::load(&path)?;
    let url = online_store.unwrap_or_else(|| topology.online_store.url.clone());
    if url.is_empty() {
        anyhow::bail!(
            "no online store: set online_store.url in {} or pass --online-store",
            path.display()
        );
    }
    let mut store = crate::online_store::OnlineStore::open(&url, topology.online_layout())?;
    match store.read(&user_id).await? {
        Some(fields) => {
            println!(
                "{}",
                serde_json::json!({ "user_id": user_id, "features": fields })
            );
            Ok(())
        }
        None => anyhow::bail!("user {user_id:?} has no features in the online store"),
    }
}
