//! Encode and decode rates of the wire formats, on 10k scenario-shaped events from the
//! generator: events in JSON and protobuf (decode = `decode_event`, i.e. parse and
//! validate, as the source does), and predictions in JSON and protobuf, with and without
//! the feature vector (`encode_prediction`, as the sink does; decoding is what a
//! downstream consumer pays: serde into a typed struct, prost into `augur::proto`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use serde::Deserialize;

use augur::codec::{decode_event, encode_protobuf, Codec, Event};
use augur::config::Topology;
use augur::gen::{event_json, Generator};
use augur::sink::{encode_prediction, Prediction};

const N: usize = 10_000;
const T0: i64 = 1_767_225_600_000;

fn events() -> Vec<Event> {
    let mut generator = Generator::new(7, 100_000);
    (0..N as i64)
        .map(|i| generator.next_event(T0 + i * 50))
        .collect()
}

fn feature_names() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/ctr.yaml");
    Topology::load(&path)
        .unwrap()
        .feature_set()
        .names()
        .to_vec()
}

/// What a downstream JSON consumer of predictions typically reads.
#[derive(Deserialize)]
#[allow(dead_code)]
struct PredictionRecord {
    event_id: String,
    user_id: String,
    ts: i64,
    model: String,
    version: u32,
    variant: String,
    score: f64,
    #[serde(default)]
    features: Option<std::collections::BTreeMap<String, f64>>,
    input_ts: i64,
    polled_us: i64,
    received_us: i64,
    produced_us: i64,
}

fn prediction<'a>(event: &'a Event, features: Option<(&'a [String], &'a [f64])>) -> Prediction<'a> {
    Prediction {
        event,
        model: "ctr",
        version: 1,
        variant: "champion",
        score: 0.083_251_7,
        features,
        input_ts: event.ts,
        polled_us: event.ts * 1000 + 6_940,
        received_us: event.ts * 1000 + 7_021,
        produced_us: event.ts * 1000 + 7_102,
    }
}

fn event_codecs(c: &mut Criterion) {
    let events = events();
    let now = T0 + N as i64 * 50;
    let json: Vec<String> = events.iter().map(event_json).collect();
    let proto: Vec<Vec<u8>> = events.iter().map(encode_protobuf).collect();
    let json_bytes: usize = json.iter().map(String::len).sum();
    let proto_bytes: usize = proto.iter().map(Vec::len).sum();
    println!(
        "event sizes: JSON {:.1} B, protobuf {:.1} B on average",
        json_bytes as f64 / N as f64,
        proto_bytes as f64 / N as f64
    );

    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("json_decode", |b| {
        b.iter(|| {
            for line in &json {
                std::hint::black_box(decode_event(Codec::Json, line.as_bytes(), now).unwrap());
            }
        })
    });
    group.bench_function("protobuf_decode", |b| {
        b.iter(|| {
            for bytes in &proto {
                std::hint::black_box(decode_event(Codec::Protobuf, bytes, now).unwrap());
            }
        })
    });
    group.bench_function("json_encode", |b| {
        b.iter(|| {
            for event in &events {
                std::hint::black_box(event_json(event));
            }
        })
    });
    group.bench_function("protobuf_encode", |b| {
        b.iter(|| {
            for event in &events {
                std::hint::black_box(encode_protobuf(event));
            }
        })
    });
    group.finish();
}

fn prediction_codecs(c: &mut Criterion) {
    let events = events();
    let names = feature_names();
    let values: Vec<f64> = (0..names.len()).map(|i| i as f64 * 1.25).collect();
    let mut group = c.benchmark_group("prediction");
    group.throughput(Throughput::Elements(N as u64));
    for (codec, codec_name) in [(Codec::Json, "json"), (Codec::Protobuf, "protobuf")] {
        for with_features in [false, true] {
            let suffix = if with_features { "_features" } else { "" };
            let features = with_features.then_some((names.as_slice(), values.as_slice()));
            let make = |event| prediction(event, features);
            let encoded: Vec<Vec<u8>> = events
                .iter()
                .map(|event| {
                    let mut out = Vec::new();
                    encode_prediction(codec, &make(event), &mut out);
                    out
                })
                .collect();
            println!(
                "prediction size, {codec_name}{suffix}: {:.1} B on average",
                encoded.iter().map(Vec::len).sum::<usize>() as f64 / N as f64
            );
            let mut buffer = Vec::new();
            group.bench_function(format!("{codec_name}{suffix}_encode"), |b| {
                b.iter(|| {
                    for event in &events {
                        buffer.clear();
                        encode_prediction(codec, &make(event), &mut buffer);
                        std::hint::black_box(&buffer);
                    }
                })
            });
            group.bench_function(format!("{codec_name}{suffix}_decode"), |b| {
                b.iter(|| {
                    for bytes in &encoded {
                        match codec {
                            Codec::Json => {
                                let record: PredictionRecord =
                                    serde_json::from_slice(bytes).unwrap();
                                std::hint::black_box(record);
                            }
                            Codec::Protobuf => {
                                std::hint::black_box(
                                    augur::proto::Prediction::decode(bytes.as_slice()).unwrap(),
                                );
                            }
                        }
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, event_codecs, prediction_codecs);
criterion_main!(benches);
