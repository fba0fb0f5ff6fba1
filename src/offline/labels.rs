//! The label of SCENARIO.md, joined in event time: an impression of item i at time t is
//! positive when the same user clicks i in `(t, t + 30 min]`. Plain per-user state, so
//! backfill memory follows users, not events.

use std::collections::VecDeque;

use crate::codec::{Event, EventType};

/// How long after an impression a click still counts.
pub const LABEL_WINDOW_MS: i64 = 30 * 60_000;

/// One impression waiting for its label, with the caller's payload (its output row).
#[derive(Debug)]
struct Pending<T> {
    item_id: String,
    ts: i64,
    positive: bool,
    payload: T,
}

/// Per-user label state: recent clicks and impressions still open.
#[derive(Debug)]
pub struct UserLabels<T> {
    clicks: VecDeque<(String, i64)>,
    pending: VecDeque<Pending<T>>,
}

impl<T> Default for UserLabels<T> {
    fn default() -> Self {
        Self {
            clicks: VecDeque::new(),
            pending: VecDeque::new(),
        }
    }
}

impl<T> UserLabels<T> {
    /// Records an applied event. An impression opens a pending label carrying
    /// `payload` (the caller passes `Some` for impressions it wants labelled); a click
    /// settles matching open impressions. Clicks that arrived before an impression
    /// (out of order, within the lateness) count too.
    pub fn observe(&mut self, event: &Event, payload: Option<T>) {
        match event.kind {
            EventType::Click => {
                for p in self.pending.iter_mut() {
                    if p.item_id == event.item_id
                        && event.ts > p.ts
                        && event.ts <= p.ts + LABEL_WINDOW_MS
                    {
                        p.positive = true;
                    }
                }
                self.clicks.push_back((event.item_id.clone(), event.ts));
            }
            EventType::Impression => {
                if let Some(payload) = payload {
                    let positive = self.clicks.iter().any(|(item, ts)| {
                        *item == event.item_id
                            && *ts > event.ts
                            && *ts <= event.ts + LABEL_WINDOW_MS
                    });
                    self.pending.push_back(Pending {
                        item_id: event.item_id.clone(),
                        ts: event.ts,
                        positive,
                        payload,
                    });
                }
            }
            _ => {}
        }
    }

    /// Hands over every impression whose label can no longer change: no event of this
    /// user older than `horizon` (its newest ts minus the lateness) will be applied, so
    /// an impression with `ts + 30 min < horizon` is settled.
    pub fn settle(&mut self, horizon: i64, mut out: impl FnMut(T, bool)) {
        while self
            .pending
            .front()
            .is_some_and(|p| p.ts + LABEL_WINDOW_MS < horizon)
        {
            let p = self.pending.pop_front().expect("checked");
            out(p.payload, p.positive);
        }
        // A future impression has ts >= horizon and needs clicks after it.
        while self.clicks.front().is_some_and(|(_, ts)| *ts <= horizon) {
            self.clicks.pop_front();
        }
    }

    /// Hands over every open impression (end of input).
    pub fn settle_all(&mut self, mut out: impl FnMut(T, bool)) {
        for p in self.pending.drain(..) {
            out(p.payload, p.positive);
        }
        self.clicks.clear();
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventType, item: &str, ts: i64) -> Event {
        Event {
            event_id: format!("{item}@{ts}"),
            user_id: "u".into(),
            ts,
            kind,
            item_id: item.into(),
            category: "c".into(),
            amount: 0.0,
        }
    }

    fn settled(labels: &mut UserLabels<&'static str>, horizon: i64) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        labels.settle(horizon, |p, l| out.push((p, l)));
        out
    }

    #[test]
    fn click_within_thirty_minutes_is_positive_and_boundaries_are_exact() {
        let mut l = UserLabels::default();
        l.observe(&ev(EventType::Impression, "a", 0), Some("imp-a"));
        l.observe(&ev(EventType::Impression, "b", 0), Some("imp-b"));
        l.observe(&ev(EventType::Click, "a", LABEL_WINDOW_MS), None); // exactly t+30m: in
        l.observe(&ev(EventType::Click, "b", 0), None); // at t itself: out (open interval)
        assert!(
            settled(&mut l, LABEL_WINDOW_MS).is_empty(),
            "not settled before the window closes"
        );
        let mut out = settled(&mut l, LABEL_WINDOW_MS + 1);
        out.sort();
        assert_eq!(out, vec![("imp-a", true), ("imp-b", false)]);
    }

    #[test]
    fn a_click_arriving_before_its_impression_counts() {
        let mut l = UserLabels::default();
        l.observe(&ev(EventType::Click, "a", 10_000), None);
        l.observe(&ev(EventType::Impression, "a", 5_000), Some("imp"));
        let mut out = Vec::new();
        l.settle_all(|p, label| out.push((p, label)));
        assert_eq!(out, vec![("imp", true)]);
    }
}
