//! A deterministic generator of scenario-shaped events (SCENARIO.md): users with
//! impressions, clicks on recently impressed items, add-to-carts and purchases.
//! Used by the demo, tests and benchmarks.
//!
//! Options make the stream more realistic: per-user click affinity (so past click
//! rates predict clicks), user churn (so lifetime counts reach a steady state), and
//! drift injected at an event time (click propensity, category mix, amount scale).

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

/// A change of the stream from an event time on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Drift {
    /// Click propensity times this factor.
    Clicks(f64),
    /// Impressions concentrate on a quarter of the items, hence of the categories.
    Categories,
    /// Purchase amounts times this factor.
    Amounts(f64),
}

impl std::str::FromStr for Drift {
    type Err = String;

    /// `clicks=3`, `categories`, `amounts=10`.
    fn from_str(text: &str) -> Result<Drift, String> {
        let (kind, value) = text.split_once('=').unwrap_or((text, ""));
        let factor = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| format!("drift \"{text}\": expected a positive factor after '='"))
        };
        match kind {
            "clicks" => Ok(Drift::Clicks(factor()?)),
            "categories" => Ok(Drift::Categories),
            "amounts" => Ok(Drift::Amounts(factor()?)),
            _ => Err(format!(
                "unknown drift \"{text}\" (expected clicks=F, categories or amounts=F)"
            )),
        }
    }
}

/// Generator options beyond the seed and the user count.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenOptions {
    /// Mean events per user before it leaves and a new user takes its place (0: never).
    pub lifetime: u32,
    /// Give each user a click affinity (0.3×, 1× or 2.5× the base rate).
    pub affinity: bool,
    /// Drift from this event time on.
    pub drift: Option<(i64, Drift)>,
}

/// Generates events for `users` users; each call advances event time by the caller's ts.
pub struct Generator {
    rng: Rng,
    users: u32,
    /// Per user: the last impressed item and when, for clicks that follow impressions.
    last_impression: Vec<Option<(u64, i64)>>,
    /// Per user slot: events so far, generation (churned users get a new id), affinity.
    slots: Vec<(u32, u32, f64)>,
    options: GenOptions,
    seq: u64,
    /// Probability that a user with a recent impression clicks it.
    pub click_rate: f64,
}

impl Generator {
    pub fn new(seed: u64, users: u32) -> Generator {
        Self::with_options(seed, users, GenOptions::default())
    }

    pub fn with_options(seed: u64, users: u32, options: GenOptions) -> Generator {
        let users = users.max(1);
        let mut rng = Rng::new(seed);
        let slots = (0..users)
            .map(|_| (0, 0, Self::draw_affinity(&mut rng, options.affinity)))
            .collect();
        Generator {
            rng,
            users,
            last_impression: vec![None; users as usize],
            slots,
            options,
            seq: 0,
            click_rate: 0.1,
        }
    }

    fn draw_affinity(rng: &mut Rng, on: bool) -> f64 {
        if !on {
            return 1.0;
        }
        match rng.next_f64() {
            r if r < 0.5 => 0.3,
            r if r < 0.8 => 1.0,
            _ => 2.5,
        }
    }

    /// The next event, at event time `ts`.
    pub fn next_event(&mut self, ts: i64) -> Event {
        let user = self.rng.below(u64::from(self.users)) as usize;
        let drift = self
            .options
            .drift
            .filter(|(at, _)| ts >= *at)
            .map(|(_, d)| d);
        let roll = self.rng.next_f64();
        let recent = self.last_impression[user].filter(|(_, at)| ts - at <= 30 * 60_000);
        let mut click_rate = self.click_rate * self.slots[user].2;
        if let Some(Drift::Clicks(f)) = drift {
            click_rate *= f;
        }
        let click_rate = click_rate.min(0.9);
        let (kind, item) = match recent {
            Some((item, _)) if roll < click_rate => (EventType::Click, item),
            _ => {
                let item = if drift == Some(Drift::Categories) {
                    // Items ≡ 0..2 (mod 12): a quarter of the categories.
                    let k = self.rng.below(ITEMS / 4);
                    (k / 3) * 12 + k % 3
                } else {
                    self.rng.below(ITEMS)
                };
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
            let scale = match drift {
                Some(Drift::Amounts(f)) => f,
                _ => 1.0,
            };
            (5.0 * 40f64.powf(self.rng.next_f64()) * scale * 100.0).round() / 100.0
        } else {
            0.0
        };
        self.seq += 1;
        let (_, generation, _) = self.slots[user];
        let user_id = if self.options.lifetime == 0 {
            format!("u-{user}")
        } else {
            format!("u-{user}.{generation}")
        };
        self.slots[user].0 += 1;
        // Churn is memoryless (each event ends the user with probability 1/lifetime),
        // so the population's age mix is stationary instead of moving in waves.
        if self.options.lifetime > 0 && self.rng.next_f64() * f64::from(self.options.lifetime) < 1.0
        {
            // The user leaves; a new one takes the slot.
            let affinity = Self::draw_affinity(&mut self.rng, self.options.affinity);
            self.slots[user] = (0, generation + 1, affinity);
            self.last_impression[user] = None;
        }
        Event {
            event_id: format!("g-{:012}", self.seq),
            user_id,
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

    #[test]
    fn drift_changes_the_stream_from_its_time_on() {
        let start = 1_767_225_600_000;
        let at = start + 50_000 * 1000;
        let rate = |drift: Drift| {
            let options = GenOptions {
                drift: Some((at, drift)),
                ..GenOptions::default()
            };
            let mut g = Generator::with_options(3, 200, options);
            let (mut before, mut after) = (Vec::new(), Vec::new());
            for i in 0..100_000 {
                let e = g.next_event(start + i * 1000);
                if i < 50_000 {
                    before.push(e)
                } else {
                    after.push(e)
                }
            }
            (before, after)
        };
        let clicks = |events: &[Event]| {
            events.iter().filter(|e| e.kind == EventType::Click).count() as f64
                / events.len() as f64
        };
        let (before, after) = rate(Drift::Clicks(3.0));
        assert!(clicks(&after) > 2.0 * clicks(&before));
        let (before, after) = rate(Drift::Categories);
        // Clicks follow earlier impressions, so only new items show the narrowed mix.
        let categories = |events: &[Event]| {
            events
                .iter()
                .filter(|e| e.kind != EventType::Click)
                .map(|e| e.category.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!((categories(&before), categories(&after)), (12, 3));
        let (before, after) = rate(Drift::Amounts(10.0));
        let max_amount = |events: &[Event]| events.iter().map(|e| e.amount).fold(0.0, f64::max);
        assert!(max_amount(&before) <= 200.0 && max_amount(&after) > 200.0);
        assert!("clicks=0".parse::<Drift>().is_err());
        assert_eq!("amounts=2".parse::<Drift>(), Ok(Drift::Amounts(2.0)));
    }

    #[test]
    fn churned_users_get_new_ids() {
        let options = GenOptions {
            lifetime: 5,
            ..GenOptions::default()
        };
        let mut g = Generator::with_options(1, 10, options);
        let mut per_user = std::collections::HashMap::new();
        for i in 0..10_000 {
            *per_user.entry(g.next_event(i).user_id).or_insert(0) += 1;
        }
        let mean = 10_000.0 / per_user.len() as f64;
        assert!((mean - 5.0).abs() < 0.5, "mean lifetime {mean}");
    }
}
