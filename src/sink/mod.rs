//! Output records: predictions (JSON or protobuf) and dead letters. Owns the output
//! contract; the producer itself lives in [`producer`].

pub mod producer;
pub mod transaction;

use crate::codec::{Codec, Event};

pub use producer::{dead_letter_headers, DeliveryError, OutputProducer, PendingDeliveries};
pub use transaction::{PartitionTransactions, TransactionError, TransactionSettings};

/// Header names on dead-letter records. The original headers are kept beside them.
pub mod headers {
    pub const REASON: &str = "augur.reason";
    pub const ERROR: &str = "augur.error";
    pub const SOURCE_TOPIC: &str = "augur.source.topic";
    pub const SOURCE_PARTITION: &str = "augur.source.partition";
    pub const SOURCE_OFFSET: &str = "augur.source.offset";
}

/// Everything a prediction record says.
pub struct Prediction<'a> {
    pub event: &'a Event,
    pub model: &'a str,
    pub version: u32,
    pub variant: &'a str,
    pub score: f64,
    /// Names and values, in topology order, when feature logging is on.
    pub features: Option<(&'a [String], &'a [f64])>,
    /// Kafka timestamp of the input record, ms.
    pub input_ts: i64,
    /// Wall clock (µs) when the source took the input record from the consumer, when
    /// the partition task took it, and when the prediction went to the producer.
    pub polled_us: i64,
    pub received_us: i64,
    pub produced_us: i64,
}

/// Appends the encoded prediction to `out`.
pub fn encode_prediction(codec: Codec, p: &Prediction<'_>, out: &mut Vec<u8>) {
    match codec {
        Codec::Json => write_prediction_json(p, out),
        Codec::Protobuf => {
            use prost::Message;
            let record = crate::proto::Prediction {
                event_id: p.event.event_id.clone(),
                user_id: p.event.user_id.clone(),
                ts: p.event.ts,
                model: p.model.to_owned(),
                version: p.version,
                variant: p.variant.to_owned(),
                score: p.score,
                features: p
                    .features
                    .map(|(names, values)| {
                        names
                            .iter()
                            .zip(values)
                            .map(|(name, value)| crate::proto::Feature {
                                name: name.clone(),
                                value: *value,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                input_ts: p.input_ts,
                polled_us: p.polled_us,
                received_us: p.received_us,
                produced_us: p.produced_us,
            };
            record.encode(out).expect("a Vec grows as needed");
        }
    }
}

/// The prediction as one JSON object, written field by field: byte for byte what
/// serde_json writes for the same fields (a property test holds the two equal), in a
/// little over half its time (`benches/codecs.rs`). serde_json's generic path was a
/// tenth of the partition tasks' CPU in a drain (BENCHMARKS.md).
fn write_prediction_json(p: &Prediction<'_>, out: &mut Vec<u8>) {
    let mut ints = itoa::Buffer::new();
    let mut floats = zmij::Buffer::new();
    out.reserve(256);
    out.extend_from_slice(b"{\"event_id\":");
    push_json_str(out, &p.event.event_id);
    out.extend_from_slice(b",\"user_id\":");
    push_json_str(out, &p.event.user_id);
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(ints.format(p.event.ts).as_bytes());
    out.extend_from_slice(b",\"model\":");
    push_json_str(out, p.model);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(ints.format(p.version).as_bytes());
    out.extend_from_slice(b",\"variant\":");
    push_json_str(out, p.variant);
    out.extend_from_slice(b",\"score\":");
    push_json_f64(out, &mut floats, p.score);
    if let Some((names, values)) = p.features {
        out.extend_from_slice(b",\"features\":{");
        for (i, (name, value)) in names.iter().zip(values).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_str(out, name);
            out.push(b':');
            push_json_f64(out, &mut floats, *value);
        }
        out.push(b'}');
    }
    for (field, value) in [
        (&b",\"input_ts\":"[..], p.input_ts),
        (b",\"polled_us\":", p.polled_us),
        (b",\"received_us\":", p.received_us),
        (b",\"produced_us\":", p.produced_us),
    ] {
        out.extend_from_slice(field);
        out.extend_from_slice(ints.format(value).as_bytes());
    }
    out.push(b'}');
}

/// A JSON number, or `null` for NaN and the infinities (as serde_json writes them).
fn push_json_f64(out: &mut Vec<u8>, buffer: &mut zmij::Buffer, value: f64) {
    if value.is_finite() {
        out.extend_from_slice(buffer.format_finite(value).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A JSON string: quotes, backslashes and control characters escaped, everything else
/// (non-ASCII included) as it is.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::EventType;
    use proptest::prelude::*;
    use serde::ser::{SerializeMap, Serializer};
    use serde::Serialize;

    /// The reference encoding: serde_json's, of the documented fields in order.
    #[derive(Serialize)]
    struct PredictionJson<'a> {
        event_id: &'a str,
        user_id: &'a str,
        ts: i64,
        model: &'a str,
        version: u32,
        variant: &'a str,
        score: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        features: Option<FeatureMap<'a>>,
        input_ts: i64,
        polled_us: i64,
        received_us: i64,
        produced_us: i64,
    }

    /// Serializes as a JSON object in feature order.
    struct FeatureMap<'a>(&'a [String], &'a [f64]);

    impl Serialize for FeatureMap<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (name, value) in self.0.iter().zip(self.1) {
                map.serialize_entry(name, value)?;
            }
            map.end()
        }
    }

    fn reference_json(p: &Prediction<'_>) -> Vec<u8> {
        serde_json::to_vec(&PredictionJson {
            event_id: &p.event.event_id,
            user_id: &p.event.user_id,
            ts: p.event.ts,
            model: p.model,
            version: p.version,
            variant: p.variant,
            score: p.score,
            features: p.features.map(|(names, values)| FeatureMap(names, values)),
            input_ts: p.input_ts,
            polled_us: p.polled_us,
            received_us: p.received_us,
            produced_us: p.produced_us,
        })
        .unwrap()
    }

    fn event() -> Event {
        Event {
            event_id: "e-1".into(),
            user_id: "ü-7-é".into(),
            ts: 1_767_225_703_544,
            kind: EventType::Impression,
            item_id: "i".into(),
            category: "c".into(),
            amount: 0.0,
        }
    }

    fn prediction<'a>(event: &'a Event, names: &'a [String], values: &'a [f64]) -> Prediction<'a> {
        Prediction {
            event,
            model: "ctr",
            version: 1,
            variant: "champion",
            score: 0.125,
            features: Some((names, values)),
            input_ts: 5,
            polled_us: 6_001,
            received_us: 6_002,
            produced_us: 7_003,
        }
    }

    /// The sample prediction with two features, encoded.
    fn encoded(codec: Codec) -> Vec<u8> {
        let event = event();
        let names = vec!["a".to_string(), "b".to_string()];
        let values = [1.0, 0.25];
        let mut out = Vec::new();
        encode_prediction(codec, &prediction(&event, &names, &values), &mut out);
        out
    }

    #[test]
    fn json_prediction_has_the_documented_shape() {
        let out = encoded(Codec::Json);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user_id"], "ü-7-é");
        assert_eq!(v["score"], 0.125);
        assert_eq!(v["features"]["b"], 0.25);
        assert_eq!(v["variant"], "champion");
        assert_eq!(v["input_ts"], 5);
        assert_eq!(v["polled_us"], 6_001);
        assert_eq!(v["received_us"], 6_002);
        assert_eq!(v["produced_us"], 7_003);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.find("\"a\"").unwrap() < text.find("\"b\"").unwrap(),
            "features keep their order"
        );
    }

    #[test]
    fn protobuf_prediction_carries_every_field() {
        use prost::Message;
        let out = encoded(Codec::Protobuf);
        let p = crate::proto::Prediction::decode(out.as_slice()).unwrap();
        assert_eq!(p.user_id, "ü-7-é");
        assert_eq!(p.event_id, "e-1");
        assert_eq!(p.score, 0.125);
        assert_eq!(p.variant, "champion");
        assert_eq!(p.features.len(), 2);
        assert_eq!(
            (p.features[1].name.as_str(), p.features[1].value),
            ("b", 0.25)
        );
        assert_eq!(
            (p.input_ts, p.polled_us, p.received_us, p.produced_us),
            (5, 6_001, 6_002, 7_003)
        );
    }

    /// Any text (control characters, quotes, backslashes, any Unicode), any number
    /// (NaN and the infinities too).
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[\\x00-\\x1f\"\\\\a-zé€😀]{0,12}",]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(-0.0),
            Just(1.0),
            Just(1e300),
            Just(5e-324),
            (0u32..1000).prop_map(|n| f64::from(n) / 8.0),
        ]
    }

    proptest! {
        #[test]
        fn json_prediction_is_what_serde_json_writes(
            ids in (text(), text(), text(), text()),
            times in any::<(i64, i64, i64, i64, i64)>(),
            version in any::<u32>(),
            score in number(),
            features in proptest::option::of(proptest::collection::vec((text(), number()), 0..5)),
        ) {
            let (event_id, user_id, model, variant) = ids;
            let (ts, input_ts, polled_us, received_us, produced_us) = times;
            let event = Event { event_id, user_id, ts, ..event() };
            let (names, values): (Vec<String>, Vec<f64>) =
                features.clone().unwrap_or_default().into_iter().unzip();
            let p = Prediction {
                event: &event,
                model: &model,
                version,
                variant: &variant,
                score,
                features: features.is_some().then_some((&names[..], &values[..])),
                input_ts,
                polled_us,
                received_us,
                produced_us,
            };
            let mut out = b"kept".to_vec();
            encode_prediction(Codec::Json, &p, &mut out);
            prop_assert_eq!(&out[..4], b"kept");
            let ours = String::from_utf8(out[4..].to_vec()).unwrap();
            let reference = String::from_utf8(reference_json(&p)).unwrap();
            prop_assert_eq!(ours, reference);
        }
    }
}
