//! The pure feature code (no broker) replays the golden events in arrival order and
//! equals the pandas golden file for every event; the same functions run in the
//! stream, so this is the fast form of the streaming golden test.

mod common;

use augur::codec::{decode_event, Codec};
use augur::config::Topology;
use augur::features::Scratch;
use common::*;

#[test]
fn every_event_matches_pandas() {
    let topology = Topology::load(&repo_root().join("topologies/ctr.yaml")).unwrap();
    let features = topology.feature_set();
    let (names, golden) = golden_features();
    assert_eq!(
        features.names(),
        names.as_slice(),
        "topology feature order equals the golden columns"
    );
    let mut states = std::collections::HashMap::new();
    let mut out = vec![0.0; features.len()];
    let mut scratch = Scratch::default();
    let events = golden_events();
    for (_, line) in &events {
        let event = decode_event(Codec::Json, line.as_bytes(), augur::codec::now_ms()).unwrap();
        let state = states
            .entry(event.user_id.clone())
            .or_insert_with(|| features.new_state());
        features
            .apply_event(state, &event, &mut out, &mut scratch)
            .unwrap();
        let want = &golden[&event.event_id];
        for ((name, got), want) in names.iter().zip(&out).zip(want) {
            assert_feature_eq(&event.event_id, name, *got, *want);
        }
    }
    assert_eq!(events.len(), golden.len());
}

#[test]
fn a_late_event_is_refused_and_leaves_state_unchanged() {
    let topology = Topology::load(&repo_root().join("topologies/ctr.yaml")).unwrap();
    let features = topology.feature_set();
    let mut state = features.new_state();
    let mut out = vec![0.0; features.len()];
    let mut scratch = Scratch::default();
    let ev = |id: &str, ts: i64| {
        let line = format!(
            r#"{{"event_id":"{id}","user_id":"u","ts":{ts},"type":"impression","item_id":"i","category":"c"}}"#
        );
        decode_event(Codec::Json, line.as_bytes(), augur::codec::now_ms()).unwrap()
    };
    let t = 1_767_225_703_544;
    features
        .apply_event(&mut state, &ev("a", t), &mut out, &mut scratch)
        .unwrap();
    let before = state.clone();
    let late = features
        .apply_event(&mut state, &ev("b", t - 3_600_001), &mut out, &mut scratch)
        .unwrap_err();
    assert_eq!(late.behind_ms, 3_600_001);
    assert_eq!(state, before);
    // Exactly at the lateness bound is still on time, and an earlier event inside the
    // window counts, but not the newer one in a later bucket.
    features
        .apply_event(&mut state, &ev("c", t - 3_600_000), &mut out, &mut scratch)
        .unwrap();
    assert_eq!(out[0], 1.0, "impressions_1h at t-1h sees only itself");
    assert_eq!(out[11], 2.0, "events_total counts both");
}
