//! Experiments between model variants: a fixed split, sticky per user, and a
//! Thompson-sampling bandit whose rewards come from the in-stream click join of
//! SCENARIO.md. Everything here is a pure function of its inputs, so a partition that
//! replays from its checkpoint decides exactly as it did the first time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::Arc;

use crate::gen::Rng;
use crate::util::fnv1a64;

/// A click on the impressed item within this long (event time) is the reward 1.
pub const REWARD_WINDOW_MS: i64 = 30 * 60 * 1000;

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The user's position in [0, 1) for an experiment: stable across processes, versions
/// and restarts (FNV-1a of `experiment \0 user`, mixed).
pub fn user_position(experiment: &str, user: &str) -> f64 {
    let mut bytes = Vec::with_capacity(experiment.len() + user.len() + 1);
    bytes.extend_from_slice(experiment.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(user.as_bytes());
    (mix(fnv1a64(&bytes)) >> 11) as f64 / (1u64 << 53) as f64
}

/// A fixed split: arm i takes the users whose position falls in its share.
#[derive(Debug, Clone)]
pub struct Split {
    /// Upper bound of each arm's share; the last is 1.
    bounds: Vec<f64>,
}

impl Split {
    pub fn new(fractions: &[f64]) -> Split {
        let mut total = 0.0;
        let mut bounds: Vec<f64> = fractions
            .iter()
            .map(|f| {
                total += f;
                total
            })
            .collect();
        if let Some(last) = bounds.last_mut() {
            *last = 1.0;
        }
        Split { bounds }
    }

    pub fn arm(&self, experiment: &str, user: &str) -> usize {
        let x = user_position(experiment, user);
        self.bounds
            .iter()
            .position(|b| x < *b)
            .unwrap_or(self.bounds.len() - 1)
    }
}

/// Beta(1 + successes, 1 + failures) posteriors, one per arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posteriors {
    pub successes: Vec<u64>,
    pub failures: Vec<u64>,
}

impl Posteriors {
    pub fn new(arms: usize) -> Posteriors {
        Posteriors {
            successes: vec![0; arms],
            failures: vec![0; arms],
        }
    }

    pub fn arms(&self) -> usize {
        self.successes.len()
    }

    pub fn reward(&mut self, arm: usize, clicked: bool) {
        if clicked {
            self.successes[arm] += 1;
        } else {
            self.failures[arm] += 1;
        }
    }

    /// The posterior mean of arm's reward rate.
    pub fn mean(&self, arm: usize) -> f64 {
        (1 + self.successes[arm]) as f64 / (2 + self.successes[arm] + self.failures[arm]) as f64
    }

    /// Thompson sampling: one draw from each arm's posterior; the largest wins. The
    /// draw is seeded by the caller (experiment seed, partition, offset), so it is
    /// reproducible.
    pub fn choose(&self, seed: u64) -> usize {
        let mut rng = Rng::new(mix(seed));
        let mut best = (0, f64::NEG_INFINITY);
        for arm in 0..self.arms() {
            let a = 1.0 + self.successes[arm] as f64;
            let b = 1.0 + self.failures[arm] as f64;
            let x = gamma(&mut rng, a);
            let y = gamma(&mut rng, b);
            let draw = x / (x + y);
            if draw > best.1 {
                best = (arm, draw);
            }
        }
        best.0
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.arms() as u8);
        for arm in 0..self.arms() {
            out.extend_from_slice(&self.successes[arm].to_be_bytes());
            out.extend_from_slice(&self.failures[arm].to_be_bytes());
        }
    }

    /// None when the bytes are not posteriors for `arms` arms (the experiment changed).
    pub fn decode(bytes: &[u8], arms: usize) -> Option<Posteriors> {
        if bytes.first().copied() != Some(arms as u8) || bytes.len() != 1 + 16 * arms {
            return None;
        }
        let mut p = Posteriors::new(arms);
        for (arm, chunk) in bytes[1..].chunks_exact(16).enumerate() {
            p.successes[arm] = u64::from_be_bytes(chunk[..8].try_into().ok()?);
            p.failures[arm] = u64::from_be_bytes(chunk[8..].try_into().ok()?);
        }
        Some(p)
    }
}

fn standard_normal(rng: &mut Rng) -> f64 {
    // Box–Muller; 1 - u keeps the logarithm finite.
    let u = 1.0 - rng.next_f64();
    let v = rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Gamma(shape, 1) for shape ≥ 1 (Marsaglia and Tsang, 2000).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Settle deadlines, earliest first. Event time mostly advances, so deadlines mostly
/// arrive in order: those queue at the back of a deque, O(1) each way; one earlier than
/// the newest queued (a late event, a restored list) waits in a heap instead. The
/// earliest deadline is the smaller of the two fronts. A heap alone cost a
/// cache-missing O(log n) pop per impression in a drain (BENCHMARKS.md).
///
/// Deadlines that are equal may come out in either order; what settles by a given
/// event time does not depend on it.
#[derive(Debug, Default)]
struct Deadlines {
    in_order: VecDeque<(i64, Arc<str>)>,
    late: BinaryHeap<Reverse<(i64, Arc<str>)>>,
}

impl Deadlines {
    fn push(&mut self, deadline: i64, user: Arc<str>) {
        match self.in_order.back() {
            Some((newest, _)) if deadline < *newest => self.late.push(Reverse((deadline, user))),
            _ => self.in_order.push_back((deadline, user)),
        }
    }

    /// Takes the earliest deadline's user if that deadline is before `ts`.
    fn pop_before(&mut self, ts: i64) -> Option<Arc<str>> {
        let queued = self.in_order.front().map(|(d, _)| *d).filter(|d| *d < ts);
        let late = self
            .late
            .peek()
            .map(|Reverse((d, _))| *d)
            .filter(|d| *d < ts);
        match (queued, late) {
            (Some(q), Some(l)) if l < q => self.late.pop().map(|Reverse((_, u))| u),
            (Some(_), _) => self.in_order.pop_front().map(|(_, u)| u),
            (None, Some(_)) => self.late.pop().map(|Reverse((_, u))| u),
            (None, None) => None,
        }
    }
}

/// An impression waiting for its reward (or label), with what to credit it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<T> {
    pub item: String,
    pub ts: i64,
    pub payload: T,
}

/// A bandit impression: the arm that served it.
pub type PendingReward = Pending<u8>;

/// The in-stream click join of SCENARIO.md, per partition. An impression of item i at
/// time t settles as 1 when the same user clicks i in (t, t + 30 min], and as 0 once
/// the partition's event time passes t + 30 min + the allowed lateness, so a click that
/// is late but within the lateness still counts.
///
/// A user's id is held once, shared by its pending list and its deadlines.
#[derive(Debug)]
pub struct ClickJoin<T> {
    pending: hashbrown::HashMap<Arc<str>, Vec<Pending<T>>, foldhash::fast::RandomState>,
    deadlines: Deadlines,
    count: usize,
    /// Users whose pending list changed since the last [`ClickJoin::take_changes`].
    dirty: HashSet<Arc<str>, foldhash::fast::RandomState>,
    max_ts: i64,
    settle_after_ms: i64,
    max_pending: usize,
    /// Whether changes are tracked for checkpoints.
    track: bool,
}

impl<T: Clone> ClickJoin<T> {
    /// A join whose changes are tracked for checkpointing.
    pub fn new(lateness_ms: i64, max_pending: usize) -> ClickJoin<T> {
        ClickJoin {
            pending: hashbrown::HashMap::default(),
            deadlines: Deadlines::default(),
            count: 0,
            dirty: HashSet::default(),
            max_ts: i64::MIN,
            settle_after_ms: REWARD_WINDOW_MS + lateness_ms,
            max_pending,
            track: true,
        }
    }

    /// A join kept in memory only (nothing to checkpoint).
    pub fn in_memory(lateness_ms: i64, max_pending: usize) -> ClickJoin<T> {
        ClickJoin {
            track: false,
            ..Self::new(lateness_ms, max_pending)
        }
    }

    fn touched(&mut self, user: &Arc<str>) {
        if self.track && !self.dirty.contains(&**user) {
            self.dirty.insert(Arc::clone(user));
        }
    }

    /// Impressions waiting.
    pub fn pending(&self) -> usize {
        self.count
    }

    /// Restores one user's pending impressions from a checkpoint.
    pub fn restore_user(&mut self, user: String, list: Vec<Pending<T>>) {
        let user: Arc<str> = user.into();
        for r in &list {
            self.deadlines
                .push(r.ts + self.settle_after_ms, Arc::clone(&user));
            self.max_ts = self.max_ts.max(r.ts);
        }
        self.count += list.len();
        self.pending.insert(user, list);
    }

    /// Records an impression; false when the pending set is full and it is not tracked.
    pub fn impression(&mut self, user: &str, item: &str, ts: i64, payload: T) -> bool {
        if self.count >= self.max_pending {
            return false;
        }
        let pending = Pending {
            item: item.to_owned(),
            ts,
            payload,
        };
        let user = match self.pending.get_key_value_mut(user) {
            Some((key, list)) => {
                list.push(pending);
                Arc::clone(key)
            }
            None => {
                let key: Arc<str> = Arc::from(user);
                self.pending.insert(Arc::clone(&key), vec![pending]);
                key
            }
        };
        self.deadlines
            .push(ts + self.settle_after_ms, Arc::clone(&user));
        self.count += 1;
        self.touched(&user);
        true
    }

    /// A click: every pending impression of the same item in [ts − 30 min, ts) settles
    /// as 1. Returns how many did.
    pub fn click(
        &mut self,
        user: &str,
        item: &str,
        ts: i64,
        mut settle: impl FnMut(&T, bool),
    ) -> u64 {
        let Some((key, list)) = self.pending.get_key_value_mut(user) else {
            return 0;
        };
        let before = list.len();
        list.retain(|r| {
            let hit = r.item == item && r.ts < ts && ts <= r.ts + REWARD_WINDOW_MS;
            if hit {
                settle(&r.payload, true);
            }
            !hit
        });
        let settled = before - list.len();
        if settled > 0 {
            let key = Arc::clone(key);
            self.count -= settled;
            self.touched(&key);
        }
        settled as u64
    }

    /// Moves the partition's event time to `ts`; impressions whose window (plus the
    /// lateness) has passed settle as 0. Returns how many did.
    pub fn advance(&mut self, ts: i64, mut settle: impl FnMut(&T, bool)) -> u64 {
        if ts <= self.max_ts {
            return 0;
        }
        self.max_ts = ts;
        let mut expired = 0u64;
        while let Some(user) = self.deadlines.pop_before(ts) {
            let hashbrown::hash_map::EntryRef::Occupied(mut entry) = self.pending.entry_ref(&*user)
            else {
                continue;
            };
            let list = entry.get_mut();
            let before = list.len();
            let settle_after = self.settle_after_ms;
            list.retain(|r| {
                let done = r.ts + settle_after < ts;
                if done {
                    settle(&r.payload, false);
                }
                !done
            });
            let n = before - list.len();
            if list.is_empty() {
                entry.remove();
            }
            if n > 0 {
                expired += n as u64;
                self.count -= n;
                self.touched(&user);
            }
        }
        expired
    }

    /// The users whose pending list changed, with their current list (empty: delete);
    /// clears the change marks.
    pub fn take_changes(&mut self) -> Vec<(String, Vec<Pending<T>>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|u| {
                let list = self.pending.get(&u).cloned().unwrap_or_default();
                (u.to_string(), list)
            })
            .collect()
    }
}

/// A partition's Thompson-sampling bandit: posteriors plus the click join that settles
/// its rewards.
#[derive(Debug)]
pub struct Bandit {
    pub posteriors: Posteriors,
    pub join: ClickJoin<u8>,
    posteriors_dirty: bool,
}

impl Bandit {
    pub fn new(arms: usize, lateness_ms: i64, max_pending: usize) -> Bandit {
        Bandit {
            posteriors: Posteriors::new(arms),
            join: ClickJoin::new(lateness_ms, max_pending),
            posteriors_dirty: false,
        }
    }

    pub fn pending(&self) -> usize {
        self.join.pending()
    }

    /// Records an impression served by `arm`; false when it is not tracked.
    pub fn impression(&mut self, user: &str, item: &str, ts: i64, arm: usize) -> bool {
        self.join.impression(user, item, ts, arm as u8)
    }

    pub fn click(&mut self, user: &str, item: &str, ts: i64) -> u64 {
        let posteriors = &mut self.posteriors;
        let n = self
            .join
            .click(user, item, ts, |arm, r| posteriors.reward(*arm as usize, r));
        self.posteriors_dirty |= n > 0;
        n
    }

    pub fn advance(&mut self, ts: i64) -> u64 {
        let posteriors = &mut self.posteriors;
        let n = self
            .join
            .advance(ts, |arm, r| posteriors.reward(*arm as usize, r));
        self.posteriors_dirty |= n > 0;
        n
    }

    /// Changed users' pending rewards, and whether the posteriors changed.
    pub fn take_changes(&mut self) -> (Vec<(String, Vec<PendingReward>)>, bool) {
        (
            self.join.take_changes(),
            std::mem::take(&mut self.posteriors_dirty),
        )
    }

    pub fn restore_user(&mut self, user: String, list: Vec<PendingReward>) {
        self.join.restore_user(user, list);
    }
}

/// Encodes a user's pending rewards: count, then (item length, item, ts, arm) each.
pub fn encode_pending(list: &[PendingReward], out: &mut Vec<u8>) {
    out.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for r in list {
        out.extend_from_slice(&(r.item.len() as u32).to_be_bytes());
        out.extend_from_slice(r.item.as_bytes());
        out.extend_from_slice(&r.ts.to_be_bytes());
        out.push(r.payload);
    }
}

pub fn decode_pending(mut bytes: &[u8]) -> Option<Vec<PendingReward>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    let n = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
    let mut list = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let len = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
        let item = String::from_utf8(take(&mut bytes, len)?.to_vec()).ok()?;
        let ts = i64::from_be_bytes(take(&mut bytes, 8)?.try_into().ok()?);
        let arm = take(&mut bytes, 1)?[0];
        list.push(PendingReward {
            item,
            ts,
            payload: arm,
        });
    }
    bytes.is_empty().then_some(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn deadlines_come_out_earliest_first_and_only_before_the_time_asked() {
        let mut rng = Rng::new(7);
        let mut deadlines = Deadlines::default();
        let mut waiting: HashMap<String, i64> = HashMap::new();
        let (mut clock, mut late_pushes) = (0i64, 0usize);
        for round in 0..2_000 {
            // Mostly advancing, sometimes far behind (a late event or a restore).
            for i in 0..(rng.next_u64() % 5) {
                let d = if rng.next_u64() % 4 == 0 {
                    clock - (rng.next_u64() % 500) as i64
                } else {
                    clock + (rng.next_u64() % 3) as i64
                };
                clock = clock.max(d);
                let user = format!("u{round}-{i}");
                let late = deadlines.late.len();
                deadlines.push(d, Arc::from(user.as_str()));
                late_pushes += deadlines.late.len() - late;
                waiting.insert(user, d);
            }
            let ts = clock - (rng.next_u64() % 100) as i64;
            let mut previous = i64::MIN;
            while let Some(user) = deadlines.pop_before(ts) {
                let d = waiting
                    .remove(&*user)
                    .expect("each deadline comes out once");
                assert!(
                    d < ts && d >= previous,
                    "round {round}: {d} after {previous}, ts {ts}"
                );
                previous = d;
            }
            assert!(
                waiting.values().all(|d| *d >= ts),
                "round {round}: a deadline before {ts} stayed in"
            );
        }
        assert!(
            late_pushes > 100,
            "the late heap was used ({late_pushes} times)"
        );
    }

    #[test]
    fn the_split_is_sticky_and_within_one_percent_of_its_fractions() {
        let fractions = [0.5, 0.3, 0.2];
        let split = Split::new(&fractions);
        let mut counts = [0usize; 3];
        let users = 100_000;
        for u in 0..users {
            let user = format!("user-{u}");
            let arm = split.arm("exp-1", &user);
            assert_eq!(arm, split.arm("exp-1", &user), "sticky");
            counts[arm] += 1;
        }
        for (arm, f) in fractions.iter().enumerate() {
            let share = counts[arm] as f64 / users as f64;
            eprintln!("arm {arm}: configured {f}, got {share:.4}");
            assert!((share - f).abs() < 0.01, "arm {arm}: {share} vs {f}");
        }
        // Another experiment reshuffles users independently.
        let moved = (0..10_000)
            .filter(|u| {
                let user = format!("user-{u}");
                split.arm("exp-1", &user) != split.arm("exp-2", &user)
            })
            .count();
        assert!(moved > 5_000, "only {moved} of 10000 users changed arm");
        // Pinned: the hash is part of the contract (users keep their arm across
        // versions of augur), so a change to it must fail here.
        assert_eq!(user_position("exp-1", "ü-7-é"), 0.3351081365016133);
        assert_eq!(split.arm("exp-1", "ü-7-é"), 0);
    }

    #[test]
    fn thompson_sampling_finds_the_best_of_three_arms() {
        let rates = [0.04, 0.05, 0.07];
        let mut posteriors = Posteriors::new(3);
        let mut env = Rng::new(7);
        let rewards = 20_000;
        let mut to_best_in_last = 0;
        let mut regret = 0.0;
        let mut curve = Vec::new();
        for t in 0..rewards {
            let arm = posteriors.choose(0xC0FFEE ^ (t as u64) << 8);
            let clicked = env.next_f64() < rates[arm];
            posteriors.reward(arm, clicked);
            regret += rates[2] - rates[arm];
            if t >= rewards - 5_000 && arm == 2 {
                to_best_in_last += 1;
            }
            if (t + 1) % 2_000 == 0 {
                curve.push((t + 1, regret));
            }
        }
        eprintln!("regret curve (decisions, cumulative regret):");
        for (t, r) in &curve {
            eprintln!("  {t:>6} {r:>8.2}");
        }
        eprintln!(
            "posterior means: {:.4} {:.4} {:.4}; last 5000 to the best arm: {to_best_in_last}",
            posteriors.mean(0),
            posteriors.mean(1),
            posteriors.mean(2)
        );
        assert!(
            to_best_in_last >= 4_500,
            "{to_best_in_last} of the last 5000 decisions went to the best arm"
        );
        // Regret grows sublinearly: the second half adds less than the first.
        let half = curve[curve.len() / 2 - 1].1;
        assert!(regret - half < half, "regret {half} then {regret}");
    }

    #[test]
    fn beta_draws_have_the_right_mean() {
        let mut rng = Rng::new(3);
        let (a, b) = (3.0, 7.0);
        let n = 50_000;
        let mean: f64 = (0..n)
            .map(|_| {
                let x = gamma(&mut rng, a);
                x / (x + gamma(&mut rng, b))
            })
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.3).abs() < 0.005, "{mean}");
    }

    #[test]
    fn clicks_and_expiry_settle_rewards() {
        let minute = 60_000;
        let mut bandit = Bandit::new(2, 10 * minute, 100);
        assert!(bandit.impression("u1", "i1", 0, 0));
        assert!(bandit.impression("u1", "i2", 0, 1));
        assert!(bandit.impression("u2", "i1", 0, 1));
        // A click on another item, or before the impression, earns nothing.
        assert_eq!(bandit.click("u1", "i3", minute), 0);
        assert_eq!(bandit.click("u1", "i1", 0), 0);
        assert_eq!(bandit.click("u1", "i1", 29 * minute), 1);
        assert_eq!(bandit.posteriors.successes, vec![1, 0]);
        // 30 min + 10 min lateness must pass before a 0 is settled.
        assert_eq!(bandit.advance(40 * minute), 0);
        assert_eq!(bandit.advance(40 * minute + 1), 2);
        assert_eq!(bandit.posteriors.failures, vec![0, 2]);
        assert_eq!(bandit.pending(), 0);
        let (changes, posteriors_changed) = bandit.take_changes();
        assert!(posteriors_changed);
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|(_, list)| list.is_empty()));
    }

    #[test]
    fn pending_rewards_and_posteriors_round_trip() {
        let list = vec![
            PendingReward {
                item: "ü-item".into(),
                ts: -5,
                payload: 2,
            },
            PendingReward {
                item: String::new(),
                ts: i64::MAX,
                payload: 0,
            },
        ];
        let mut bytes = Vec::new();
        encode_pending(&list, &mut bytes);
        assert_eq!(decode_pending(&bytes), Some(list));
        assert_eq!(decode_pending(&bytes[..bytes.len() - 1]), None);
        let mut p = Posteriors::new(3);
        p.reward(1, true);
        p.reward(2, false);
        let mut bytes = Vec::new();
        p.encode(&mut bytes);
        assert_eq!(Posteriors::decode(&bytes, 3), Some(p));
        assert_eq!(Posteriors::decode(&bytes, 2), None);
    }

    #[test]
    fn a_full_pending_set_refuses_new_impressions() {
        let mut bandit = Bandit::new(2, 0, 1);
        assert!(bandit.impression("u", "i", 0, 0));
        assert!(!bandit.impression("u", "j", 0, 0));
    }
}
