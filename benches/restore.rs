//! Changelog restore of 100,000 users from a real broker (tansu on loopback), the way a
//! worker takes over a partition it has no local state for: `changelog::restore` reads
//! the partition from the beginning (the last state per user wins; tansu does not
//! compact) and `PartitionStore::restore` writes the users and the offset to sled in
//! one batch. `cargo bench --bench restore`.
//!
//! The states are realistic: 1M generator events for 100k users applied through the
//! reference topology. The changelog holds `k` full checkpoints of every user (k = 1
//! and 3), to show how restore time grows with an uncompacted changelog. Each sample
//! first appends a fence to the partition and reads up to it, as the worker does
//! (`fence`); `quiet` instead reads past the high watermark until 500 ms pass without
//! news, the wait tansu's lagging high watermark forced before fences (and still the
//! worker's fallback when a fence cannot be written).

#[path = "support/states.rs"]
mod states;
#[path = "support/tansu.rs"]
mod tansu;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use augur::config::Topology;
use augur::sink::OutputProducer;
use augur::state::changelog::{self, ReadTo, OFFSET_HEADER};
use augur::state::encode_user_state;
use augur::state::store::StateStore;

// The worker's allocator, so that the restore is measured as the worker runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u32 = 100_000;
const EVENTS: i64 = 1_000_000;
const QUIET: Duration = Duration::from_millis(500);

/// Every user's encoded state after the generator's events.
fn user_states(topology: &Topology) -> Vec<(String, Vec<u8>)> {
    states::scenario_states(topology, 42, USERS, EVENTS)
        .into_iter()
        .map(|(user, state)| {
            let mut bytes = Vec::new();
            encode_user_state(&state, &mut bytes);
            (user, bytes)
        })
        .collect()
}

/// Writes `checkpoints` full checkpoints (every user, then a marker) to partition 0.
fn write_changelog(brokers: &str, topic: &str, users: &[(String, Vec<u8>)], checkpoints: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .unwrap();
    for round in 0..checkpoints {
        for (user, bytes) in users {
            let mut record = BaseRecord::to(topic).partition(0).key(user).payload(bytes);
            while let Err((_, back)) = producer.send(record) {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
        }
        let offset = ((round + 1) as i64 * EVENTS).to_string();
        let marker = OwnedHeaders::new().insert(Header {
            key: OFFSET_HEADER,
            value: Some(offset.as_str()),
        });
        let record = BaseRecord::<str, [u8]>::to(topic)
            .partition(0)
            .payload(&[][..])
            .headers(marker);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(120)).unwrap();
}

fn restore(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let topology = Topology::load(&root.join("topologies/ctr.yaml")).unwrap();
    let users = user_states(&topology);
    let bytes: usize = users.iter().map(|(u, s)| u.len() + s.len()).sum();
    eprintln!(
        "restore: {} users, {:.0} bytes per changelog record",
        users.len(),
        bytes as f64 / users.len() as f64
    );
    let broker = tansu::Tansu::start();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &broker.brokers)
        .set("group.id", "restore-bench")
        .set("fetch.wait.max.ms", "10");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let producer = OutputProducer::create({
        let mut producer = ClientConfig::new();
        producer.set("bootstrap.servers", &broker.brokers);
        producer
    })
    .unwrap();
    let mut group = c.benchmark_group("changelog_restore");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(users.len() as u64));
    for checkpoints in [1usize, 3] {
        let topic = format!("changelog-{checkpoints}");
        broker.create_topics(&[&topic], 1);
        let written = Instant::now();
        write_changelog(&broker.brokers, &topic, &users, checkpoints);
        eprintln!(
            "wrote {} records to {topic} in {:.1?}",
            checkpoints * (users.len() + 1),
            written.elapsed()
        );
        for end in ["fence", "quiet"] {
            let mut run = 0;
            group.bench_function(format!("100k_users_{checkpoints}_checkpoints_{end}"), |b| {
                // Each sample restores into a store of its own, as a worker without
                // local state does; opening and removing it is not timed.
                let fresh = || {
                    let dir = states::tempdir_under_target();
                    let store = StateStore::open(dir.path(), topology.state_hash()).unwrap();
                    (dir, store)
                };
                b.iter_batched(
                    fresh,
                    |(dir, store)| {
                        run += 1;
                        let read = Instant::now();
                        let read_to = match end {
                            "fence" => ReadTo::Fence(
                                runtime
                                    .block_on(producer.fence(&topic, 0, Duration::from_secs(10)))
                                    .unwrap(),
                            ),
                            _ => ReadTo::Quiet(QUIET),
                        };
                        let fenced = read.elapsed();
                        let restored =
                            changelog::restore(config.clone(), &topic, 0, read_to).unwrap();
                        let read = read.elapsed();
                        assert_eq!(restored.users.len(), users.len());
                        let next = restored.next_offset.expect("a complete checkpoint");
                        let mut partition = store.partition("events", 0).unwrap();
                        let write = Instant::now();
                        partition.restore(restored.users.into_iter(), next).unwrap();
                        if run <= 3 {
                            eprintln!(
                                "{topic} ({end}): {} records read in {read:.2?} (fence {fenced:.2?}), sled write {:.2?}",
                                restored.records,
                                write.elapsed()
                            );
                        }
                        (partition, store, dir)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, restore);
criterion_main!(benches);
