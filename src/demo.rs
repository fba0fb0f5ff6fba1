//! `augur demo`: the whole engine in one process, with no services. An embedded broker
//! (librdkafka's mock cluster), a generator producing scenario events at a steady rate,
//! the shipped model, and a live status line.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::Topology;
use crate::gen::{event_json, Generator};
use crate::pipeline::{run_worker, WorkerSettings};
use crate::stats::Stats;

const TOPOLOGY: &str = include_str!("../topologies/ctr.yaml");
const MODEL_ONNX: &[u8] = include_bytes!("../models/ctr/1/model.onnx");
const MODEL_JSON: &[u8] = include_bytes!("../models/ctr/1/model.json");

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Events per second to generate.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Number of distinct users.
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// One in this many generated records is deliberately invalid (0: none).
    #[arg(long, default_value_t = 500)]
    bad_every: u64,
    /// Admin address for /metrics (falls back to a free port if taken).
    #[arg(long, default_value = "127.0.0.1:9898")]
    admin_listen: SocketAddr,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let model_dir = work.path().join("models/ctr/1");
    std::fs::create_dir_all(&model_dir)?;
    std::fs::write(model_dir.join("model.onnx"), MODEL_ONNX)?;
    std::fs::write(model_dir.join("model.json"), MODEL_JSON)?;

    let cluster = MockCluster::new(1).context("starting the embedded broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut topology =
        Topology::parse(TOPOLOGY).map_err(|(_, m)| anyhow::anyhow!("built-in topology: {m}"))?;
    topology.model.registry = "models".into();
    for (name, partitions) in [
        (topology.source.topic.clone(), args.partitions),
        (topology.sinks.predictions.topic.clone(), args.partitions),
        (topology.sinks.dead_letter.topic.clone(), 1),
        (topology.changelog_topic(), args.partitions),
        (topology.control_topic(), 1),
        (topology.alerts_topic(), 1),
    ] {
        cluster
            .create_topic(&name, partitions, 1)
            .with_context(|| format!("creating topic {name}"))?;
    }

    let mut settings = WorkerSettings::from_topology(topology, work.path().to_owned());
    settings.brokers = brokers.clone();
    settings.state_dir = work.path().join("state");
    settings.instance_id = "demo-0".into();

    let stats = Arc::new(Stats::default());
    let ready = Arc::new(AtomicBool::new(false));
    let handle = crate::metrics::install()?;
    // The online store is in-process here, behind the same interface as Redis.
    let store =
        crate::online_store::OnlineStore::open("memory://", settings.topology.online_layout())?;
    let reader = Arc::new(tokio::sync::Mutex::new(store.reopen()));
    let admin = match crate::admin::serve(
        args.admin_listen,
        handle.clone(),
        Arc::clone(&ready),
        Some(Arc::clone(&reader)),
        None,
    )
    .await
    {
        Ok(addr) => addr,
        Err(_) => {
            crate::admin::serve(
                "127.0.0.1:0".parse()?,
                handle,
                Arc::clone(&ready),
                Some(reader),
                None,
            )
            .await?
        }
    };

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .context("creating the generator's producer")?;
    let stop = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(generate(
        producer,
        settings.topology.source.topic.clone(),
        args.rate,
        args.users,
        args.bad_every,
        Arc::clone(&ready),
        Arc::clone(&stop),
    ));
    let status = tokio::spawn(status_line(
        Arc::clone(&stats),
        admin,
        Arc::clone(&ready),
        Arc::clone(&stop),
    ));

    println!(
        "augur demo: {} events/s for {} users into an embedded broker ({brokers}); model ctr v1; \
         metrics on http://{admin}/metrics; a user's online features on http://{admin}/v1/features/u-1",
        args.rate, args.users
    );
    let seconds = args.seconds;
    let shutdown = async move {
        match seconds {
            Some(s) => tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(s)) => {},
                _ = crate::cli::shutdown_signal() => {},
            },
            None => crate::cli::shutdown_signal().await,
        }
    };
    let result = run_worker(
        settings,
        Some(store),
        crate::pipeline::ModelChannel::new(),
        Arc::clone(&stats),
        ready,
        shutdown,
    )
    .await;
    stop.store(true, Relaxed);
    let _ = generator.await;
    let _ = status.await;
    println!(
        "\naugur demo: stopped after {} events, {} predictions, {} dead letters",
        stats.events.load(Relaxed),
        stats.predictions.load(Relaxed),
        stats.dead_letters.load(Relaxed)
    );
    drop(cluster);
    result.map_err(Into::into)
}

/// Produces scenario events at `rate` per second, event time = now, with an occasional
/// invalid record so that the dead-letter path shows. Starts once the worker holds its
/// partitions: events produced while it joins its group would only wait, and the first
/// seconds would show a backlog's latency instead of the engine's.
async fn generate(
    producer: FutureProducer,
    topic: String,
    rate: u32,
    users: u32,
    bad_every: u64,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !ready.load(Relaxed) {
        if stop.load(Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut generator = Generator::new(42, users);
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            sent += 1;
            let event = generator.next_event(crate::codec::now_ms());
            let payload = if bad_every > 0 && sent % bad_every == 0 {
                format!(
                    "{{\"event_id\":\"{}\",\"user_id\":\"{}\",\"ts\":\"yesterday\"}}",
                    event.event_id, event.user_id
                )
            } else {
                event_json(&event)
            };
            let record = FutureRecord::to(&topic)
                .key(&event.user_id)
                .payload(&payload);
            if let Err((e, _)) = producer.send_result(record) {
                tracing::warn!(error = %e, "demo generator could not queue an event");
            }
        }
    }
}

async fn status_line(
    stats: Arc<Stats>,
    admin: SocketAddr,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last_events = 0;
    let mut joined = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !stop.load(Relaxed) {
        tick.tick().await;
        joined |= ready.load(Relaxed);
        let line = if joined {
            let events = stats.events.load(Relaxed);
            let p99 = stats
                .e2e_latency
                .quantile_us(0.99)
                .map_or("-".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0));
            stats.e2e_latency.reset();
            let line = format!(
                "[{:>4}s] {:>6} events/s | {:>8} predictions | p99 latency {:>8} | {} dead letters | http://{admin}/metrics",
                started.elapsed().as_secs(),
                events - last_events,
                stats.predictions.load(Relaxed),
                p99,
                stats.dead_letters.load(Relaxed),
            );
            last_events = events;
            line
        } else {
            format!(
                "[{:>4}s] joining the consumer group (the broker waits 3 s for other members)",
                started.elapsed().as_secs()
            )
        };
        let mut out = std::io::stdout().lock();
        if tty {
            // Back to the line's start, and clear what a longer line left behind.
            let _ = write!(out, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    fn produced(consumer: &BaseConsumer, topic: &str) -> i64 {
        let (low, high) = consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(5))
            .expect("watermarks from the embedded broker");
        high - low
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_generator_waits_for_the_assignment() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let (ready, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let generator = tokio::spawn(generate(
            producer,
            "events".into(),
            2000,
            10,
            0,
            Arc::clone(&ready),
            Arc::clone(&stop),
        ));

        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            produced(&consumer, "events"),
            0,
            "events before the assignment"
        );

        ready.store(true, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while produced(&consumer, "events") == 0 {
            assert!(Instant::now() < deadline, "no events after the assignment");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Relaxed);
        generator.await.unwrap();
    }
}
