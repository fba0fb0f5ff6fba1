//! Property tests: arbitrary input to the JSON decoder, the protobuf decoder, the stored
//! state decoder and the topology parser gives a value or an error, never a panic; and
//! what the engine encodes, it decodes back unchanged.
//!
//! The suite runs a short version (`PROPTEST_CASES`, default 2,000 per property);
//! `tests/fuzz.sh` runs at least 10 million executions in release mode.

use augur::codec::{decode_event, encode_protobuf, Codec, Event, EventType};
use augur::config::Topology;
use augur::state::decode_user_state;
use proptest::prelude::*;

const NOW: i64 = 1_770_000_000_000;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn kind() -> impl Strategy<Value = EventType> {
    prop_oneof![
        Just(EventType::Impression),
        Just(EventType::Click),
        Just(EventType::AddToCart),
        Just(EventType::Purchase)
    ]
}

prop_compose! {
    fn valid_event()(
        event_id in "[a-z0-9-]{1,16}",
        user_id in "\\PC{1,12}",
        ts in 946_684_800_000i64..NOW,
        kind in kind(),
        item_id in "\\PC{1,12}",
        category in "\\PC{1,12}",
        cents in 0u32..1_000_000,
    ) -> Event {
        let amount = if kind == EventType::Purchase { f64::from(cents) / 100.0 } else { 0.0 };
        Event { event_id, user_id, ts, kind, item_id, category, amount }
    }
}

/// A JSON value of any shape, for fields of the wrong type.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn json_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_event(Codec::Json, &bytes, NOW);
    }

    #[test]
    fn json_decoder_never_panics_on_mistyped_fields(
        fields in prop::collection::btree_map(
            prop_oneof![Just("event_id"), Just("user_id"), Just("ts"), Just("type"), Just("item_id"), Just("category"), Just("amount"), Just("extra")],
            any_json(),
            0..8,
        )
    ) {
        let object: serde_json::Map<String, serde_json::Value> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let text = serde_json::Value::Object(object).to_string();
        let _ = decode_event(Codec::Json, text.as_bytes(), NOW);
    }

    #[test]
    fn json_round_trips_valid_events(event in valid_event()) {
        let text = augur::gen::event_json(&event);
        prop_assert_eq!(decode_event(Codec::Json, text.as_bytes(), NOW).unwrap(), event);
    }

    #[test]
    fn protobuf_decoder_never_panics_and_round_trips(event in valid_event(), noise in prop::collection::vec(any::<u8>(), 0..64), cut in 0usize..64) {
        let bytes = encode_protobuf(&event);
        prop_assert_eq!(decode_event(Codec::Protobuf, &bytes, NOW).unwrap(), event);
        let _ = decode_event(Codec::Protobuf, &noise, NOW);
        let _ = decode_event(Codec::Protobuf, &bytes[..cut.min(bytes.len())], NOW);
    }

    #[test]
    fn state_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode_user_state(&bytes);
    }

    #[test]
    fn topology_parser_never_panics_on_mutations(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..6)) {
        let mut text: Vec<char> = REFERENCE.with(|r| r.chars().collect());
        for (at, c) in edits {
            let i = at.index(text.len());
            text[i] = c;
        }
        let text: String = text.into_iter().collect();
        if let Ok(topology) = Topology::parse(&text) {
            let _ = topology.validate();
        }
    }
}

thread_local! {
    static REFERENCE: String =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/ctr.yaml")).unwrap();
}
