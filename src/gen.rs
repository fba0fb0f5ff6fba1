//! A deterministic generator of scenario-shaped events (SCENARIO.md): users with
//! impressions, clicks on recently impressed items, add-to-carts and purchases.
//! Used by the demo, tests and benchmarks.

use crate::codec::{Event, EventType};

const CATEGORIES: [&str; 12] = [
    "books",
    "music",
    "toys",
    "tools",
    "garden",
    "sports",
    "fashion",
    "beauty",
    "grocery",
    "electronics",
    "home",
    "games",
];
const ITEMS: u64 = 500;

/// SplitMix64: small, fast, and good enough for synthetic data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Generates events for `users` users; each call advances event time by the caller's ts.
pub struct Generator {
    rng: Rng,
    users: u32,
    /// Per user: the last impressed item and when, for clicks that follow impressions.
    last_impression: Vec<Option<(u64, i64)>>,
    seq: u64,
    /// Probability that a user with a recent impression clicks it.
    pub click_rate: f64,
}

impl Generator {
    pub fn new(seed: u64, users: u32) -> Generator {
        Generator {
            rng: Rng::new(seed),
            users: users.max(1),
            last_impression: vec![None; users.max(1) as usize],
            seq: 0,
            click_rate: 0.1,
        }
    }

    /// The next event, at event time `ts`.
    pub fn next_event(&mut self, ts: i64) -> Event {
        let user = self.rng.below(u64::from(self.users)) as usize;
        let roll = self.rng.next_f64();
        let recent = self.last_impression[user].filter(|(_, at)| ts - at <= 30 * 60_000);
        let (kind, item) = match recent {
            Some((item, _)) if roll < self.click_rate => (EventType::Click, item),
            _ => {
                let item = self.rng.below(ITEMS);
                let roll = self.rng.next_f64();
                let kind = if roll < 0.93 {
                    EventType::Impression
                } else if roll < 0.97 {
                    EventType::AddToCart
                } else {
                    EventType::Purchase
                };
                (kind, item)
            }
        };
        if kind == EventType::Impression {
            self.last_impression[user] = Some((item, ts));
        }
        let amount = if kind == EventType::Purchase {
            // Roughly log-uniform between 5 and 200, rounded to cents.
            (5.0 * 40f64.powf(self.rng.next_f64()) * 100.0).round() / 100.0
        } else {
            0.0
        };
        self.seq += 1;
        Event {
            event_id: format!("g-{:012}", self.seq),
            user_id: format!("u-{user}"),
            ts,
            kind,
            item_id: format!("i-{item}"),
            category: CATEGORIES[(item % CATEGORIES.len() as u64) as usize].to_owned(),
            amount,
        }
    }
}

/// The JSON form of an event, as producers write it.
pub fn event_json(event: &Event) -> String {
    let mut v = serde_json::json!({
        "event_id": event.event_id,
        "user_id": event.user_id,
        "ts": event.ts,
        "type": event.kind.as_str(),
        "item_id": event.item_id,
        "category": event.category,
    });
    if event.kind == EventType::Purchase {
        v["amount"] = serde_json::json!(event.amount);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_valid() {
        let mut a = Generator::new(7, 100);
        let mut b = Generator::new(7, 100);
        for i in 0..1000 {
            let ts = 1_767_225_600_000 + i * 1000;
            let e = a.next_event(ts);
            assert_eq!(e, b.next_event(ts));
            let decoded = crate::codec::decode_event(
                crate::codec::Codec::Json,
                event_json(&e).as_bytes(),
                ts,
            )
            .unwrap();
            assert_eq!(decoded, e);
        }
    }
}
