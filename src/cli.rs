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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("augur: {e:#}");
            ExitCode::FAILURE
        }
    }
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

    let stats = Arc::new(Stats::default());
    let ready = Arc::new(AtomicBool::new(false));
    let handle = crate::metrics::install().context("installing the metrics recorder")?;
    if !listen.is_empty() {
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("admin address \"{listen}\""))?;
        let bound = crate::admin::serve(addr, handle, Arc::clone(&ready))
            .await
            .with_context(|| format!("binding the admin server on {addr}"))?;
        tracing::info!(%bound, "admin server: /metrics /healthz /readyz");
    }
    run_worker(settings, stats, ready, shutdown_signal()).await?;
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
