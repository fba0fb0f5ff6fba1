//! Bad input never stops a partition and is never dropped silently: each bad record
//! gives exactly one dead-letter record with its reason, the original key, bytes and
//! headers, and where it came from; the valid records around it are still scored.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use prost::Message as _;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::Message;

const TS: i64 = 1_767_225_703_544;

fn event(id: &str, user: &str, ts: i64, kind: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","user_id":"{user}","ts":{ts},"type":"{kind}","item_id":"i-1","category":"books"}}"#
    )
}

/// (key, payload, expected reason); `None` reason means a valid record.
fn json_cases() -> Vec<(Option<String>, Vec<u8>, Option<&'static str>)> {
    let big = format!(
        r#"{{"event_id":"big","user_id":"u-bad","ts":{TS},"type":"impression","item_id":"i","category":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let bad: Vec<(Option<&str>, String, &str)> = vec![
        (Some("u-bad"), "not json at all".into(), "invalid_json"),
        (Some("u-bad"), format!(r#"{{"event_id":"m","ts":{TS},"type":"click","item_id":"i","category":"c"}}"#), "missing_field"),
        (Some("u-bad"), r#"{"event_id":"s","user_id":"u-bad","ts":"abc","type":"click","item_id":"i","category":"c"}"#.into(), "wrong_type"),
        (Some("u-bad"), event("t", "u-bad", TS, "hover"), "unknown_type"),
        (Some("u-bad"), format!(r#"{{"event_id":"n","user_id":"u-bad","ts":{TS},"type":"purchase","item_id":"i","category":"c","amount":-3.5}}"#), "invalid_amount"),
        (Some("u-bad"), format!(r#"{{"event_id":"nan","user_id":"u-bad","ts":{TS},"type":"purchase","item_id":"i","category":"c","amount":NaN}}"#), "invalid_json"),
        (Some("u-bad"), big, "oversized"),
        (Some(""), event("k", "u-bad", TS, "impression"), "empty_key"),
        (None, event("k2", "u-bad", TS, "impression"), "empty_key"),
        (Some("u-other"), event("km", "u-bad", TS, "impression"), "key_mismatch"),
        (Some("u-bad"), event("old", "u-bad", 946_000_000_000, "impression"), "ts_out_of_range"),
    ];
    let mut cases = Vec::new();
    // The user whose late event is refused: first an event at TS, then one 2 h older.
    cases.push((
        Some("u-late".to_owned()),
        event("late-0", "u-late", TS, "click").into_bytes(),
        None,
    ));
    for (i, (key, payload, reason)) in bad.into_iter().enumerate() {
        cases.push((key.map(str::to_owned), payload.into_bytes(), Some(reason)));
        let ok = event(
            &format!("ok-{i}"),
            "u-ok",
            TS + i as i64 * 1000,
            "impression",
        );
        cases.push((Some("u-ok".into()), ok.into_bytes(), None));
    }
    cases.push((
        Some("u-late".into()),
        event("late-1", "u-late", TS - 2 * 3_600_000, "impression").into_bytes(),
        Some("late"),
    ));
    cases.push((
        Some("u-ok".into()),
        event("ok-last", "u-ok", TS + 60_000, "impression").into_bytes(),
        None,
    ));
    cases
}

fn proto_event(id: &str, amount: Option<f64>) -> Vec<u8> {
    augur::proto::UserEvent {
        event_id: id.into(),
        user_id: "u-p".into(),
        ts: TS,
        r#type: if amount.is_some() {
            "purchase".into()
        } else {
            "impression".into()
        },
        item_id: "i-1".into(),
        category: "books".into(),
        amount,
    }
    .encode_to_vec()
}

fn proto_cases() -> Vec<(Option<String>, Vec<u8>, Option<&'static str>)> {
    let whole = proto_event("trunc", None);
    let key = || Some("u-p".to_owned());
    vec![
        (key(), proto_event("p-0", None), None),
        (
            key(),
            whole[..whole.len() - 4].to_vec(),
            Some("invalid_protobuf"),
        ),
        (key(), proto_event("p-1", None), None),
        (
            key(),
            proto_event("nan", Some(f64::NAN)),
            Some("invalid_amount"),
        ),
        (
            key(),
            proto_event("neg", Some(-1.0)),
            Some("invalid_amount"),
        ),
        (
            key(),
            proto_event("inf", Some(f64::INFINITY)),
            Some("invalid_amount"),
        ),
        (
            key(),
            b"{\"json\": \"in a protobuf topic\"}".to_vec(),
            Some("invalid_protobuf"),
        ),
        (key(), proto_event("p-2", None), None),
    ]
}

fn run_case_set(codec: &str, cases: Vec<(Option<String>, Vec<u8>, Option<&'static str>)>) {
    let broker = Broker::start();
    let topics = Topics::create(&broker, 1);
    let dir = tempfile::tempdir().unwrap();
    let topology = write_topology(dir.path(), &topics, codec);
    let producer = broker.producer();
    for (i, (key, payload, _)) in cases.iter().enumerate() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some(format!("t-{i}").as_bytes()),
        });
        let mut record = BaseRecord::<str, [u8]>::to(&topics.events)
            .payload(payload.as_slice())
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key.as_str());
        }
        producer
            .send(record)
            .map_err(|(e, _)| e)
            .expect("queue record");
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let augur = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        &unique("i"),
        &dir.path().join("state"),
    );
    let expected_dead: Vec<(usize, &str)> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.2.map(|r| (i, r)))
        .collect();
    let dead = broker.read_topic(&topics.dead_letter, 1, Duration::from_secs(120), |m| {
        m.len() >= expected_dead.len()
    });
    // Everything valid after the bad records was scored: the partition kept flowing.
    let scored_ids: Vec<String> = cases
        .iter()
        .filter(|c| c.2.is_none())
        .filter_map(|c| {
            let text = String::from_utf8_lossy(&c.1).into_owned();
            match codec {
                "json" if text.contains("impression") => {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .map(|v| v["event_id"].as_str().unwrap().to_owned())
                }
                "protobuf" => augur::proto::UserEvent::decode(c.1.as_slice())
                    .ok()
                    .map(|e| e.event_id),
                _ => None,
            }
        })
        .collect();
    let predictions = broker.read_topic(&topics.predictions, 1, Duration::from_secs(60), |m| {
        predictions_by_event(m).len() >= scored_ids.len()
    });
    // Give a wrongly duplicated dead letter time to show up before counting.
    std::thread::sleep(Duration::from_secs(2));
    let dead_again = broker.read_topic(&topics.dead_letter, 1, Duration::from_secs(5), |_| false);
    assert!(augur.terminate(Duration::from_secs(30)));

    let predicted = predictions_by_event(&predictions);
    for id in &scored_ids {
        assert!(
            predicted.contains_key(id),
            "valid event {id} after bad input was not scored"
        );
    }
    assert_eq!(
        dead_again.len(),
        expected_dead.len(),
        "exactly one dead letter per bad record"
    );
    let mut by_offset: HashMap<i64, &rdkafka::message::OwnedMessage> = HashMap::new();
    for m in &dead {
        let headers = m.headers().expect("dead letters carry headers");
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("dead letter lacks header {name}"))
        };
        assert_eq!(get("augur.source.topic"), topics.events);
        assert_eq!(get("augur.source.partition"), "0");
        assert!(!get("augur.error").is_empty());
        by_offset.insert(get("augur.source.offset").parse().unwrap(), m);
    }
    for (offset, reason) in expected_dead {
        let m = by_offset
            .get(&(offset as i64))
            .unwrap_or_else(|| panic!("no dead letter for offset {offset} ({reason})"));
        let headers = m.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| v.to_vec())
        };
        assert_eq!(
            header("augur.reason").as_deref(),
            Some(reason.as_bytes()),
            "offset {offset}"
        );
        assert_eq!(
            m.payload().unwrap_or_default(),
            cases[offset].1.as_slice(),
            "offset {offset}: original bytes kept"
        );
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .filter(|k| !k.is_empty());
        assert_eq!(
            key,
            cases[offset].0.clone().filter(|k| !k.is_empty()),
            "offset {offset}: original key kept"
        );
        assert_eq!(
            header("trace-id"),
            Some(format!("t-{offset}").into_bytes()),
            "offset {offset}: original headers kept"
        );
    }
}

#[test]
fn json_bad_input_is_dead_lettered_and_the_partition_flows() {
    run_case_set("json", json_cases());
}

#[test]
fn protobuf_bad_input_is_dead_lettered_and_the_partition_flows() {
    run_case_set("protobuf", proto_cases());
}
