//! The JSON event codec. Parses in one pass into loosely typed fields, then checks each
//! field's type so that the error names the field, what was expected and what came.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Event, EventType, Reason, Rejection};

/// A JSON value as far as the event contract cares. Strings without escapes borrow
/// from the payload, so a field that is only looked at (`type`) allocates nothing.
enum Scalar<'de> {
    Str(Cow<'de, str>),
    Int(i64),
    /// Integers beyond i64, and every number with a fraction or exponent.
    Float(f64),
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Scalar<'_> {
    fn describe(&self) -> String {
        match self {
            Scalar::Str(s) if s.len() > 40 => format!("string \"{}...\"", truncate(s, 40)),
            Scalar::Str(s) => format!("string \"{s}\""),
            Scalar::Int(i) => format!("integer {i}"),
            Scalar::Float(x) => format!("number {x}"),
            Scalar::Bool(b) => format!("boolean {b}"),
            Scalar::Null => "null".into(),
            Scalar::Array => "array".into(),
            Scalar::Object => "object".into(),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

/// The keys the contract knows; others are ignored, as producers may add fields.
#[derive(Clone, Copy)]
pub(super) enum Field {
    EventId,
    UserId,
    Ts,
    Type,
    ItemId,
    Category,
    Amount,
}

impl Field {
    pub(super) fn parse(key: &str) -> Option<Field> {
        Some(match key {
            "event_id" => Field::EventId,
            "user_id" => Field::UserId,
            "ts" => Field::Ts,
            "type" => Field::Type,
            "item_id" => Field::ItemId,
            "category" => Field::Category,
            "amount" => Field::Amount,
            _ => return None,
        })
    }
}

/// An object key: a contract field, or `None` for one to skip.
struct Key(Option<Field>);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(Field::parse(v)))
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The contract's fields as they came, before their types are checked: `V` is
/// [`Scalar`] here and the fast path's own value in `flat_json.rs`. A repeated key keeps
/// its last value.
pub(super) struct RawEvent<V> {
    pub event_id: Option<V>,
    pub user_id: Option<V>,
    pub ts: Option<V>,
    pub kind: Option<V>,
    pub item_id: Option<V>,
    pub category: Option<V>,
    pub amount: Option<V>,
}

impl<V> RawEvent<V> {
    /// Where a field's value goes.
    pub(super) fn slot(&mut self, field: Field) -> &mut Option<V> {
        match field {
            Field::EventId => &mut self.event_id,
            Field::UserId => &mut self.user_id,
            Field::Ts => &mut self.ts,
            Field::Type => &mut self.kind,
            Field::ItemId => &mut self.item_id,
            Field::Category => &mut self.category,
            Field::Amount => &mut self.amount,
        }
    }
}

impl<V> Default for RawEvent<V> {
    fn default() -> Self {
        RawEvent {
            event_id: None,
            user_id: None,
            ts: None,
            kind: None,
            item_id: None,
            category: None,
            amount: None,
        }
    }
}

struct RawEventVisitor;

impl<'de> Visitor<'de> for RawEventVisitor {
    type Value = RawEvent<Scalar<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEvent<Scalar<'de>>, A::Error> {
        let mut raw = RawEvent::default();
        while let Some(Key(field)) = map.next_key::<Key>()? {
            match field {
                Some(field) => *raw.slot(field) = Some(map.next_value::<Scalar>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }
}

/// Decodes one JSON event. Value range checks are left to the caller.
pub fn decode_json(payload: &[u8]) -> Result<Event, Rejection> {
    match super::flat_json::decode(payload) {
        Some(event) => Ok(event),
        None => decode_serde(payload),
    }
}

/// The general path: any JSON, and the error that names the field when it is bad.
pub(super) fn decode_serde(payload: &[u8]) -> Result<Event, Rejection> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let raw = deserializer
        .deserialize_map(RawEventVisitor)
        .and_then(|raw| deserializer.end().map(|()| raw))
        .map_err(|e| {
            Rejection::new(Reason::InvalidJson, format!("not a JSON event object: {e}"))
        })?;

    let kind_name = required_str(raw.kind, "type")?;
    let kind = EventType::parse(&kind_name).ok_or_else(|| {
        Rejection::new(
            Reason::UnknownType,
            format!(
                "field \"type\": unknown event type \"{}\"",
                truncate(&kind_name, 40)
            ),
        )
    })?;
    Ok(Event {
        event_id: required_string(raw.event_id, "event_id")?,
        user_id: required_string(raw.user_id, "user_id")?,
        ts: required_integer(raw.ts, "ts")?,
        kind,
        item_id: required_string(raw.item_id, "item_id")?,
        category: required_string(raw.category, "category")?,
        amount: optional_number(raw.amount, "amount")?,
    })
}

fn missing(field: &str) -> Rejection {
    Rejection::new(
        Reason::MissingField,
        format!("field \"{field}\" is missing"),
    )
}

fn mistyped(field: &str, expected: &str, got: &Scalar) -> Rejection {
    Rejection::new(
        Reason::WrongType,
        format!(
            "field \"{field}\": expected {expected}, got {}",
            got.describe()
        ),
    )
}

fn required_string(value: Option<Scalar>, field: &str) -> Result<String, Rejection> {
    required_str(value, field).map(Cow::into_owned)
}

fn required_str<'de>(value: Option<Scalar<'de>>, field: &str) -> Result<Cow<'de, str>, Rejection> {
    match value {
        None => Err(missing(field)),
        Some(Scalar::Str(s)) => Ok(s),
        Some(other) => Err(mistyped(field, "string", &other)),
    }
}

fn required_integer(value: Option<Scalar>, field: &str) -> Result<i64, Rejection> {
    match value {
        None => Err(missing(field)),
        Some(Scalar::Int(i)) => Ok(i),
        Some(other) => Err(mistyped(field, "integer", &other)),
    }
}

fn optional_number(value: Option<Scalar>, field: &str) -> Result<f64, Rejection> {
    match value {
        None | Some(Scalar::Null) => Ok(0.0),
        Some(Scalar::Int(i)) => Ok(i as f64),
        Some(Scalar::Float(x)) => Ok(x),
        Some(other) => Err(mistyped(field, "number", &other)),
    }
}
