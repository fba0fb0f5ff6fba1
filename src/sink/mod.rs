//! Output records: predictions (JSON or protobuf) and dead letters. Owns the output
//! contract; the producer itself lives in [`producer`].

pub mod producer;
pub mod transaction;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

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

/// Appends the encoded prediction to `out`.
pub fn encode_prediction(codec: Codec, p: &Prediction<'_>, out: &mut Vec<u8>) {
    match codec {
        Codec::Json => {
            let record = PredictionJson {
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
            };
            serde_json::to_writer(out, &record).expect("writing JSON to a Vec cannot fail");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::EventType;

    #[test]
    fn json_prediction_has_the_documented_shape() {
        let event = Event {
            event_id: "e-1".into(),
            user_id: "ü-7-é".into(),
            ts: 1_767_225_703_544,
            kind: EventType::Impression,
            item_id: "i".into(),
            category: "c".into(),
            amount: 0.0,
        };
        let names = vec!["a".to_string(), "b".to_string()];
        let values = [1.0, 0.25];
        let p = Prediction {
            event: &event,
            model: "ctr",
            version: 1,
            variant: "champion",
            score: 0.125,
            features: Some((&names, &values)),
            input_ts: 5,
            polled_us: 5,
            received_us: 6,
            produced_us: 7,
        };
        let mut out = Vec::new();
        encode_prediction(Codec::Json, &p, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user_id"], "ü-7-é");
        assert_eq!(v["score"], 0.125);
        assert_eq!(v["features"]["b"], 0.25);
        assert_eq!(v["variant"], "champion");
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.find("\"a\"").unwrap() < text.find("\"b\"").unwrap(),
            "features keep their order"
        );
    }
}
