//! The common shape of a JSON event, decoded without serde: one flat object whose
//! values are strings without escapes, or integers. Producers nearly always send
//! exactly that, and serde_json's generic string and map handling was most of the
//! decode's time (BENCHMARKS.md).
//!
//! This path only ever accepts: any input outside that shape (an escape, a nested
//! value, a literal, a fraction or an exponent, a syntax error, a missing or mistyped
//! field, an unknown event type) returns `None`, and the serde path in `json.rs`
//! decodes it and, when it is bad, explains why. So every error message comes from one
//! place, and what this path accepts, the serde path decodes to the same event (a
//! property test below holds the two equal).

use super::json::{Field, RawEvent};
use super::{Event, EventType};

/// Decodes `payload` when it has the common shape; `None` means "ask serde".
pub(super) fn decode(payload: &[u8]) -> Option<Event> {
    // Checked once for the whole payload: a string between two quotes (ASCII) is then
    // valid UTF-8 too.
    let text = std::str::from_utf8(payload).ok()?;
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut fields = RawEvent::default();
    s.skip_ws();
    s.expect(b'{')?;
    s.skip_ws();
    if !s.eat(b'}') {
        loop {
            let key = s.string()?;
            s.skip_ws();
            s.expect(b':')?;
            s.skip_ws();
            let value = s.value()?;
            // A repeated key keeps its last value, as in the serde path.
            if let Some(field) = Field::parse(key) {
                *fields.slot(field) = Some(value);
            }
            s.skip_ws();
            if s.eat(b'}') {
                break;
            }
            s.expect(b',')?;
            s.skip_ws();
        }
    }
    s.skip_ws();
    if s.at != s.bytes.len() {
        return None;
    }
    Some(Event {
        event_id: fields.event_id?.text()?.to_owned(),
        user_id: fields.user_id?.text()?.to_owned(),
        ts: fields.ts?.integer()?,
        kind: EventType::parse(fields.kind?.text()?)?,
        item_id: fields.item_id?.text()?.to_owned(),
        category: fields.category?.text()?.to_owned(),
        amount: match fields.amount {
            None => 0.0,
            Some(value) => value.integer()? as f64,
        },
    })
}

#[derive(Clone, Copy)]
enum Value<'a> {
    Text(&'a str),
    Integer(i64),
}

impl<'a> Value<'a> {
    fn text(self) -> Option<&'a str> {
        match self {
            Value::Text(s) => Some(s),
            Value::Integer(_) => None,
        }
    }

    fn integer(self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(i),
            Value::Text(_) => None,
        }
    }
}

struct Scanner<'a> {
    text: &'a str,
    /// `text`'s bytes.
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.bytes.get(self.at) == Some(&byte);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    fn value(&mut self) -> Option<Value<'a>> {
        match self.bytes.get(self.at)? {
            b'"' => self.string().map(Value::Text),
            b'-' | b'0'..=b'9' => self.integer().map(Value::Integer),
            _ => None,
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let len = self.bytes[start..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.bytes[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        Some(&self.text[start..start + len])
    }

    /// An integer as JSON writes it (no leading zeros, no fraction, no exponent) that
    /// fits in an i64 and that serde_json reads as an integer too (not `-0`).
    fn integer(&mut self) -> Option<i64> {
        let negative = self.eat(b'-');
        let start = self.at;
        let mut magnitude: i64 = 0;
        while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
            // Accumulated as a negative number, so that i64::MIN fits.
            magnitude = magnitude
                .checked_mul(10)?
                .checked_sub(i64::from(digit - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && self.bytes[start] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        if negative {
            // serde_json reads `-0` as the float -0.0, not as an integer.
            (magnitude != 0).then_some(magnitude)
        } else {
            magnitude.checked_neg()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_path(payload: &[u8]) -> Result<Event, super::super::Rejection> {
        super::super::json::decode_serde(payload)
    }

    #[test]
    fn takes_the_common_shape() {
        let line = r#"{"event_id": "e-1", "user_id": "u-ü-7", "ts": 1767225703544, "type": "purchase", "item_id": "i-4", "category": "music", "amount": 12, "extra": "x"}"#.as_bytes();
        let event = decode(line).expect("the common shape");
        assert_eq!(event.user_id, "u-ü-7");
        assert_eq!(
            (event.ts, event.kind, event.amount),
            (1767225703544, EventType::Purchase, 12.0)
        );
        assert_eq!(Ok(event), serde_path(line));
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        for line in [
            &br#"{"event_id":"e","user_id":"u\u00fc","ts":1,"type":"click","item_id":"i","category":"c"}"#[..],
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"click","item_id":"i","category":"c","amount":1.5}"#,
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"click","item_id":"i","category":"c","amount":null}"#,
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"click","item_id":"i","category":"c","x":[1]}"#,
            br#"{"event_id":"e","user_id":"u","ts":01,"type":"click","item_id":"i","category":"c"}"#,
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"click","item_id":"i","category":"c",}"#,
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"click","item_id":"i","category":"c"} x"#,
            br#"{"event_id":"e","user_id":"u","ts":1,"type":"tap","item_id":"i","category":"c"}"#,
            br#"{"event_id":"e","user_id":"u","ts":"1","type":"click","item_id":"i","category":"c"}"#,
            br#"{"event_id":"e","user_id":"u","ts":99999999999999999999,"type":"click","item_id":"i","category":"c"}"#,
            br#"{"event_id":"e","user_id":"u","type":"click","item_id":"i","category":"c"}"#,
            b"{\"event_id\":\"e\",\"user_id\":\"u\xff\",\"ts\":1,\"type\":\"click\",\"item_id\":\"i\",\"category\":\"c\"}",
            b"{\"event_id\":\"e\",\"user_id\":\"u\t\",\"ts\":1,\"type\":\"click\",\"item_id\":\"i\",\"category\":\"c\"}",
        ] {
            assert!(decode(line).is_none(), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn integers_at_the_edges() {
        let at = |n: &str| {
            let line = format!(
                r#"{{"event_id":"e","user_id":"u","ts":{n},"type":"click","item_id":"i","category":"c"}}"#
            );
            decode(line.as_bytes()).map(|e| e.ts)
        };
        assert_eq!(at("0"), Some(0));
        assert_eq!(at("-0"), None);
        assert_eq!(at("9223372036854775807"), Some(i64::MAX));
        assert_eq!(at("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(at("9223372036854775808"), None);
        assert_eq!(at("-"), None);
        assert_eq!(at("1e3"), None);
    }

    /// JSON text built from pieces that are mostly the common shape and sometimes not.
    fn piece() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("event_id"),
            Just("user_id"),
            Just("ts"),
            Just("type"),
            Just("item_id"),
            Just("category"),
            Just("amount"),
            Just("other"),
        ];
        let value = prop_oneof![
            "[a-z0-9-]{0,6}".prop_map(|s| format!("\"{s}\"")),
            prop_oneof![
                Just("impression"),
                Just("click"),
                Just("purchase"),
                Just("add_to_cart")
            ]
            .prop_map(|s| format!("\"{s}\"")),
            any::<i64>().prop_map(|i| i.to_string()),
            (1_700_000_000_000i64..1_800_000_000_000).prop_map(|i| i.to_string()),
            "-?[0-9]{1,21}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
            "\"(\\PC|\\\\[\"\\\\/bfnrtu]|\\\\u[0-9a-f]{4}|[\\x00-\\x1f]){0,6}\"",
            Just("-0".to_string()),
            Just("null".to_string()),
            Just("[1, \"x\"]".to_string()),
            Just("{\"a\": 1}".to_string()),
        ];
        let ws = "[ \t\r\n]{0,2}";
        (ws, key, ws, ws, value, ws)
            .prop_map(|(a, k, b, c, v, d)| format!("{a}\"{k}\"{b}:{c}{v}{d}"))
    }

    /// A valid event's six fields in any order, with random pieces among them (which
    /// may repeat a key with another value or type), and sometimes a bad ending.
    fn document() -> impl Strategy<Value = Vec<u8>> {
        let base = Just(vec![
            "\"event_id\":\"e-1\"".to_string(),
            "\"user_id\":\"u-\u{fc}\"".to_string(),
            "\"ts\":1767225703544".to_string(),
            "\"type\":\"click\"".to_string(),
            "\"item_id\":\"i-4\"".to_string(),
            "\"category\":\"music\"".to_string(),
        ])
        .prop_shuffle();
        (
            base,
            prop::collection::vec((piece(), 0..7usize), 0..4),
            prop_oneof![4 => Just(""), 1 => Just(","), 1 => Just(" x"), 1 => Just("}")],
            "[ \n]{0,2}",
        )
            .prop_map(|(mut fields, extra, tail, ws)| {
                for (piece, at) in extra {
                    fields.insert(at.min(fields.len()), piece);
                }
                format!("{ws}{{{}}}{tail}{ws}", fields.join(",")).into_bytes()
            })
    }

    /// Every key and value of an object in order, repeated keys included.
    struct Pairs(Vec<(String, serde_json::Value)>);

    impl<'de> serde::Deserialize<'de> for Pairs {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Pairs;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Pairs, A::Error> {
                    let mut pairs = Vec::new();
                    while let Some(pair) = map.next_entry()? {
                        pairs.push(pair);
                    }
                    Ok(Pairs(pairs))
                }
            }
            d.deserialize_map(V)
        }
    }

    /// Whether serde_json sees one flat object of strings without escapes and of
    /// integers it reads as i64, where `amount`, if present, is an integer.
    fn is_common_shape(doc: &[u8]) -> bool {
        let Ok(Pairs(pairs)) = serde_json::from_slice::<Pairs>(doc) else {
            return false;
        };
        !doc.contains(&b'\\')
            && pairs.iter().all(|(key, value)| match value {
                serde_json::Value::String(_) => key != "amount",
                serde_json::Value::Number(n) => n.is_i64(),
                _ => false,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        /// What this path accepts, the serde path decodes to the same event.
        #[test]
        fn agrees_with_serde_on_what_it_accepts(doc in document()) {
            match decode(&doc) {
                Some(event) => prop_assert_eq!(Ok(event), serde_path(&doc)),
                // Nothing is refused here that serde would take as the common shape.
                None => prop_assert!(
                    serde_path(&doc).is_err() || !is_common_shape(&doc),
                    "{}", String::from_utf8_lossy(&doc)
                ),
            }
        }

        /// And the common shape, in any field order and spacing, is accepted.
        #[test]
        fn accepts_every_plain_event(
            mut order in Just((0..7).collect::<Vec<usize>>()).prop_shuffle(),
            ws in "[ \t\n]{0,2}",
            user in "[a-zA-Z0-9 ü-]{1,8}",
            ts in 946_684_800_000i64..1_800_000_000_000,
            amount in prop::option::of(0i64..1_000_000),
        ) {
            let mut fields = vec![
                format!("\"event_id\":{ws}\"e-1\""),
                format!("\"user_id\":{ws}\"{user}\""),
                format!("\"ts\":{ws}{ts}"),
                "\"type\":\"purchase\"".to_string(),
                "\"item_id\":\"i-9\"".to_string(),
                "\"category\":\"music\"".to_string(),
                "\"note\":\"x\"".to_string(),
            ];
            if let Some(amount) = amount {
                fields.push(format!("\"amount\":{amount}"));
                order.push(7);
            }
            let doc = format!("{{{}}}", order.iter().map(|&i| fields[i].as_str()).collect::<Vec<_>>().join(&format!(",{ws}")));
            let event = decode(doc.as_bytes());
            prop_assert!(event.is_some(), "{}", doc);
            prop_assert_eq!(Ok(event.unwrap()), serde_path(doc.as_bytes()));
        }
    }
}
