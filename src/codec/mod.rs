//! Decoding and validating input events (JSON and protobuf), and the reasons a record is
//! refused. Owns the event contract of SCENARIO.md; never touches state or Kafka.
//!
//! Errors here are plain values without backtraces: they are built for every bad record
//! on the hot path and end up as a dead-letter reason, never as a panic.

mod flat_json;
mod json;
mod protobuf;

use std::fmt;

pub use json::decode_json;
pub use protobuf::{decode_protobuf, encode_protobuf};

/// Earliest accepted event time: 2000-01-01T00:00:00Z.
pub const MIN_TS_MS: i64 = 946_684_800_000;
/// Latest accepted event time, relative to the wall clock.
pub const MAX_FUTURE_MS: i64 = 86_400_000;

/// Wire format of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Protobuf,
}

impl Codec {
    pub fn parse(name: &str) -> Option<Codec> {
        match name {
            "json" => Some(Codec::Json),
            "protobuf" | "proto" => Some(Codec::Protobuf),
            _ => None,
        }
    }
}

/// The event types of the scenario. Anything else is invalid input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventType {
    Impression = 0,
    Click = 1,
    AddToCart = 2,
    Purchase = 3,
}

impl EventType {
    pub const NAMES: [&'static str; 4] = ["impression", "click", "add_to_cart", "purchase"];

    pub fn parse(name: &str) -> Option<EventType> {
        match name {
            "impression" => Some(EventType::Impression),
            "click" => Some(EventType::Click),
            "add_to_cart" => Some(EventType::AddToCart),
            "purchase" => Some(EventType::Purchase),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A set of event types, one bit per [`EventType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TypeMask(u8);

impl TypeMask {
    pub const ALL: TypeMask = TypeMask(0b1111);

    pub fn contains(self, t: EventType) -> bool {
        self.0 & (1 << t as u8) != 0
    }

    pub fn insert(&mut self, t: EventType) {
        self.0 |= 1 << t as u8;
    }
}

impl FromIterator<EventType> for TypeMask {
    fn from_iter<I: IntoIterator<Item = EventType>>(iter: I) -> Self {
        let mut mask = TypeMask(0);
        for t in iter {
            mask.insert(t);
        }
        mask
    }
}

/// A decoded, validated event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub user_id: String,
    pub ts: i64,
    pub kind: EventType,
    pub item_id: String,
    pub category: String,
    /// 0.0 when absent.
    pub amount: f64,
}

/// Why a record went to the dead-letter topic. The `as_str` names are the values of the
/// `augur.reason` header and of the `reason` metric label: keep them stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    InvalidProtobuf,
    MissingField,
    WrongType,
    UnknownType,
    InvalidAmount,
    TsOutOfRange,
    Oversized,
    EmptyKey,
    KeyMismatch,
    Late,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::InvalidJson,
        Reason::InvalidProtobuf,
        Reason::MissingField,
        Reason::WrongType,
        Reason::UnknownType,
        Reason::InvalidAmount,
        Reason::TsOutOfRange,
        Reason::Oversized,
        Reason::EmptyKey,
        Reason::KeyMismatch,
        Reason::Late,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::InvalidProtobuf => "invalid_protobuf",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::UnknownType => "unknown_type",
            Reason::InvalidAmount => "invalid_amount",
            Reason::TsOutOfRange => "ts_out_of_range",
            Reason::Oversized => "oversized",
            Reason::EmptyKey => "empty_key",
            Reason::KeyMismatch => "key_mismatch",
            Reason::Late => "late",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused record: the reason (a stable name) and a human explanation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Decodes and validates one record.
///
/// `now_ms` is the wall clock, for the "not more than a day in the future" rule.
pub fn decode_event(codec: Codec, payload: &[u8], now_ms: i64) -> Result<Event, Rejection> {
    let event = match codec {
        Codec::Json => decode_json(payload)?,
        Codec::Protobuf => decode_protobuf(payload)?,
    };
    validate_event(&event, now_ms)?;
    Ok(event)
}

/// Applies the value checks to an event decoded elsewhere (Parquet input).
pub fn validate(event: Event, now_ms: i64) -> Result<Event, Rejection> {
    validate_event(&event, now_ms)?;
    Ok(event)
}

/// The value checks shared by every codec.
fn validate_event(event: &Event, now_ms: i64) -> Result<(), Rejection> {
    if event.user_id.is_empty() {
        return Err(Rejection::new(
            Reason::MissingField,
            "field \"user_id\" is empty",
        ));
    }
    if event.event_id.is_empty() {
        return Err(Rejection::new(
            Reason::MissingField,
            "field \"event_id\" is empty",
        ));
    }
    if event.ts < MIN_TS_MS || event.ts > now_ms.saturating_add(MAX_FUTURE_MS) {
        return Err(Rejection::new(
            Reason::TsOutOfRange,
            format!(
                "field \"ts\": {} is outside 2000-01-01 .. now + 1 day",
                event.ts
            ),
        ));
    }
    if !event.amount.is_finite() || event.amount < 0.0 {
        return Err(Rejection::new(
            Reason::InvalidAmount,
            format!(
                "field \"amount\": expected a finite non-negative number, got {}",
                event.amount
            ),
        ));
    }
    Ok(())
}

/// Wall clock in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_770_000_000_000;

    fn json(text: &str) -> Result<Event, Rejection> {
        decode_event(Codec::Json, text.as_bytes(), NOW)
    }

    #[test]
    fn decodes_a_purchase() {
        let e = json(r#"{"event_id":"e1","user_id":"ü-7-é","ts":1767225703544,"type":"purchase","item_id":"i-1","category":"toys","amount":12.5}"#)
            .unwrap();
        assert_eq!(e.user_id, "ü-7-é");
        assert_eq!(e.kind, EventType::Purchase);
        assert_eq!(e.amount, 12.5);
    }

    #[test]
    fn missing_amount_means_zero() {
        let e = json(r#"{"event_id":"e1","user_id":"u","ts":1767225703544,"type":"purchase","item_id":"i","category":"c"}"#).unwrap();
        assert_eq!(e.amount, 0.0);
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        let cases = [
            ("not json", Reason::InvalidJson),
            (
                r#"{"event_id":"e","ts":1767225703544,"type":"click","item_id":"i","category":"c"}"#,
                Reason::MissingField,
            ),
            (
                r#"{"event_id":"e","user_id":"u","ts":"abc","type":"click","item_id":"i","category":"c"}"#,
                Reason::WrongType,
            ),
            (
                r#"{"event_id":"e","user_id":"u","ts":1767225703544,"type":"hover","item_id":"i","category":"c"}"#,
                Reason::UnknownType,
            ),
            (
                r#"{"event_id":"e","user_id":"u","ts":1767225703544,"type":"purchase","item_id":"i","category":"c","amount":-1}"#,
                Reason::InvalidAmount,
            ),
            (
                r#"{"event_id":"e","user_id":"u","ts":5,"type":"click","item_id":"i","category":"c"}"#,
                Reason::TsOutOfRange,
            ),
            (
                r#"{"event_id":"e","user_id":"u","ts":1867225703544,"type":"click","item_id":"i","category":"c"}"#,
                Reason::TsOutOfRange,
            ),
            (r#"[1,2]"#, Reason::InvalidJson),
        ];
        for (input, reason) in cases {
            let err = json(input).expect_err(input);
            assert_eq!(err.reason, reason, "{input}: {err}");
        }
    }

    #[test]
    fn wrong_type_names_the_field_and_what_came() {
        let err = json(r#"{"event_id":"e","user_id":"u","ts":"abc","type":"click","item_id":"i","category":"c"}"#).unwrap_err();
        assert_eq!(
            err.detail,
            "field \"ts\": expected integer, got string \"abc\""
        );
    }

    #[test]
    fn protobuf_round_trips_and_refuses_nan() {
        let mut event = json(r#"{"event_id":"e1","user_id":"u","ts":1767225703544,"type":"purchase","item_id":"i","category":"c","amount":3.5}"#).unwrap();
        let bytes = encode_protobuf(&event);
        assert_eq!(decode_event(Codec::Protobuf, &bytes, NOW).unwrap(), event);
        event.amount = f64::NAN;
        let err = decode_event(Codec::Protobuf, &encode_protobuf(&event), NOW).unwrap_err();
        assert_eq!(err.reason, Reason::InvalidAmount);
        let truncated = &bytes[..bytes.len() - 3];
        assert_eq!(
            decode_event(Codec::Protobuf, truncated, NOW)
                .unwrap_err()
                .reason,
            Reason::InvalidProtobuf
        );
    }
}
