//! The per-event core path (decode → apply to state → 12 features) and tract scoring
//! at batch 1, 64 and 1024, on scenario-shaped events from the generator.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use augur::codec::{decode_event, Codec};
use augur::config::Topology;
use augur::features::Scratch;
use augur::gen::{event_json, Generator};
use augur::model::Model;

fn topology() -> Topology {
    Topology::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/ctr.yaml"))
        .unwrap()
}

fn event_path(c: &mut Criterion) {
    let features = topology().feature_set();
    let mut generator = Generator::new(1, 100_000);
    let t0 = 1_767_225_600_000;
    let lines: Vec<String> = (0..100_000)
        .map(|i| event_json(&generator.next_event(t0 + i * 50)))
        .collect();
    let now = t0 + 100_000 * 50;

    let mut group = c.benchmark_group("event_path");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("json_decode", |b| {
        b.iter(|| {
            for line in &lines {
                std::hint::black_box(decode_event(Codec::Json, line.as_bytes(), now).unwrap());
            }
        })
    });
    group.bench_function("decode_apply_features", |b| {
        b.iter_batched(
            || HashMap::<String, augur::state::UserState>::with_capacity(100_000),
            |mut states| {
                let mut out = vec![0.0; features.len()];
                let mut scratch = Scratch::default();
                for line in &lines {
                    let event = decode_event(Codec::Json, line.as_bytes(), now).unwrap();
                    let state = match states.get_mut(&event.user_id) {
                        Some(s) => s,
                        None => states
                            .entry(event.user_id.clone())
                            .or_insert_with(|| features.new_state()),
                    };
                    features
                        .apply_event(state, &event, &mut out, &mut scratch)
                        .unwrap();
                }
                states
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn scoring(c: &mut Criterion) {
    let features = topology().feature_set();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ctr/1");
    let model = Model::load(&dir, features.names()).unwrap();
    let stride = features.len();
    let mut group = c.benchmark_group("score_linear");
    for batch in [1usize, 64, 1024] {
        let rows: Vec<f64> = (0..batch * stride).map(|i| (i % 7) as f64).collect();
        group.throughput(Throughput::Elements(batch as u64));
        let (mut input, mut scores) = (Vec::new(), Vec::new());
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| {
                scores.clear();
                model.score(&rows, stride, &mut input, &mut scores).unwrap();
                std::hint::black_box(&scores);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, event_path, scoring);
criterion_main!(benches);
