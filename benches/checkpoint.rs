//! One partition checkpoint of 1,000 dirty users: `PartitionStore::checkpoint` encodes
//! every user's state, writes them and the next offset in one sled batch and waits for
//! sled's flush (fsync), as the partition task does every `state.checkpoint_interval`.
//!
//! The states are realistic: 10,000 generator events (10 per user, the density of the
//! scenario's 1M events for 100k users) applied through the reference topology's
//! `FeatureSet`. The store lives under the cargo target directory (the real disk, not a
//! tmpfs). `encode_1k` is the encoding part alone, for the split.

#[path = "support/states.rs"]
mod states;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use augur::config::Topology;
use augur::state::store::StateStore;
use augur::state::{encode_user_state, UserState};

const USERS: u32 = 1_000;
const EVENTS: i64 = 10_000;

fn checkpoint(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let topology = Topology::load(&root.join("topologies/ctr.yaml")).unwrap();
    let states = states::scenario_states(&topology, 3, USERS, EVENTS);
    let mut dirty: Vec<(String, UserState)> = states.into_iter().collect();
    dirty.sort_by(|a, b| a.0.cmp(&b.0));
    let mut encoded_bytes = 0;
    let mut buffer = Vec::new();
    for (_, state) in &dirty {
        buffer.clear();
        encode_user_state(state, &mut buffer);
        encoded_bytes += buffer.len();
    }
    println!(
        "checkpoint: {} dirty users, {:.0} encoded bytes per user",
        dirty.len(),
        encoded_bytes as f64 / dirty.len() as f64
    );

    let dir = states::tempdir_under_target();
    let store = StateStore::open(dir.path(), topology.state_hash()).unwrap();
    let mut partition = store.partition("user-events", 0).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut offset = 0i64;

    let mut group = c.benchmark_group("checkpoint");
    group.throughput(Throughput::Elements(dirty.len() as u64));
    group.bench_function("sled_1k_dirty_users", |b| {
        b.iter(|| {
            offset += EVENTS;
            rt.block_on(partition.checkpoint(
                dirty.iter().map(|(user, state)| (user.as_str(), state)),
                None,
                offset,
            ))
            .unwrap();
        })
    });
    group.bench_function("encode_1k", |b| {
        b.iter_batched_ref(
            Vec::<u8>::new,
            |buffer| {
                for (_, state) in &dirty {
                    buffer.clear();
                    encode_user_state(state, buffer);
                    std::hint::black_box(&buffer);
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    assert_eq!(partition.next_offset().unwrap(), Some(offset));
    println!(
        "checkpoint: sled on disk after the run: {:?} bytes",
        store.size_on_disk()
    );
}

criterion_group!(benches, checkpoint);
criterion_main!(benches);
