//! The protobuf event codec (`proto/augur/v1/event.proto`).

use prost::Message;

use super::{Event, EventType, Reason, Rejection};
use crate::proto::UserEvent;

/// Decodes one protobuf `augur.v1.UserEvent`. Value range checks are left to the caller.
///
/// Proto3 cannot tell an empty string from a missing one, so empty required strings are
/// reported as missing.
pub fn decode_protobuf(payload: &[u8]) -> Result<Event, Rejection> {
    let raw = UserEvent::decode(payload).map_err(|e| {
        Rejection::new(
            Reason::InvalidProtobuf,
            format!("not an augur.v1.UserEvent: {e}"),
        )
    })?;
    let kind = EventType::parse(&raw.r#type).ok_or_else(|| {
        if raw.r#type.is_empty() {
            Rejection::new(Reason::MissingField, "field \"type\" is missing")
        } else {
            Rejection::new(
                Reason::UnknownType,
                format!("field \"type\": unknown event type \"{}\"", raw.r#type),
            )
        }
    })?;
    for (value, field) in [
        (&raw.event_id, "event_id"),
        (&raw.user_id, "user_id"),
        (&raw.item_id, "item_id"),
        (&raw.category, "category"),
    ] {
        if value.is_empty() {
            return Err(Rejection::new(
                Reason::MissingField,
                format!("field \"{field}\" is missing"),
            ));
        }
    }
    if raw.ts == 0 {
        return Err(Rejection::new(
            Reason::MissingField,
            "field \"ts\" is missing",
        ));
    }
    Ok(Event {
        event_id: raw.event_id,
        user_id: raw.user_id,
        ts: raw.ts,
        kind,
        item_id: raw.item_id,
        category: raw.category,
        amount: raw.amount.unwrap_or(0.0),
    })
}

/// Encodes an event as protobuf (the generator and tests produce this form).
pub fn encode_protobuf(event: &Event) -> Vec<u8> {
    UserEvent {
        event_id: event.event_id.clone(),
        user_id: event.user_id.clone(),
        ts: event.ts,
        r#type: event.kind.as_str().to_owned(),
        item_id: event.item_id.clone(),
        category: event.category.clone(),
        amount: (event.kind == EventType::Purchase || event.amount != 0.0).then_some(event.amount),
    }
    .encode_to_vec()
}
