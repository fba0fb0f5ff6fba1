//! Per-user state: the sparse time buckets behind windowed features and the lifetime
//! values behind the others. Plain synchronous data; no Kafka, sled or tokio here, so
//! the stream and the offline paths share it unchanged.
//!
//! A window of `span` buckets at time `t` covers the buckets `(bucket(t) - span,
//! bucket(t)]`, exactly SCENARIO.md's rule. Buckets are kept sorted by id and only where
//! events fell, so memory follows activity, not window length.

pub mod changelog;
mod encoding;
pub mod store;

pub use encoding::{decode_user_state, encode_user_state, StateDecodeError};

/// No event applied yet.
pub const NO_TS: i64 = i64::MIN;

/// Everything kept about one user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserState {
    /// Newest event time applied so far ([`NO_TS`] before the first event).
    pub max_ts: i64,
    /// One entry per compiled aggregator of the feature set, in its order.
    pub aggs: Vec<AggState>,
}

/// The state of one aggregator.
#[derive(Debug, Clone, PartialEq)]
pub enum AggState {
    /// Count and sum per bucket.
    Window(Vec<WindowBucket>),
    /// Distinct value hashes per bucket.
    Distinct(Vec<DistinctBucket>),
    /// Time of the last matching event ([`NO_TS`] if none).
    Last(i64),
    /// Lifetime count of matching events.
    Lifetime(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowBucket {
    pub id: i64,
    pub count: u32,
    pub sum: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DistinctBucket {
    pub id: i64,
    /// FNV-1a hashes of the values seen in this bucket, sorted, without duplicates.
    pub values: Vec<u64>,
}

/// The bucket an event time falls in.
#[inline]
pub fn bucket_of(ts: i64, resolution_ms: i64) -> i64 {
    ts.div_euclid(resolution_ms)
}

/// Position of bucket `id` in a sorted bucket list: `Ok` if present, `Err` where it goes.
/// Events mostly arrive in time order, so the last bucket is checked first.
#[inline]
fn locate<B>(buckets: &[B], id: i64, id_of: impl Fn(&B) -> i64) -> Result<usize, usize> {
    match buckets.last().map(&id_of) {
        None => Err(0),
        Some(last) if last == id => Ok(buckets.len() - 1),
        Some(last) if last < id => Err(buckets.len()),
        Some(_) => buckets.binary_search_by_key(&id, id_of),
    }
}

/// Drops buckets whose id is `<= oldest_needed - 1`, i.e. keeps ids `>= oldest_needed`.
#[inline]
fn prune<B>(buckets: &mut Vec<B>, oldest_needed: i64, id_of: impl Fn(&B) -> i64) {
    let stale = buckets
        .iter()
        .take_while(|b| id_of(b) < oldest_needed)
        .count();
    if stale > 0 {
        buckets.drain(..stale);
    }
}

/// Adds one event (count 1, `value` to the sum) to its bucket.
pub fn window_add(buckets: &mut Vec<WindowBucket>, id: i64, value: f64) {
    match locate(buckets, id, |b| b.id) {
        Ok(i) => {
            buckets[i].count += 1;
            buckets[i].sum += value;
        }
        Err(i) => buckets.insert(
            i,
            WindowBucket {
                id,
                count: 1,
                sum: value,
            },
        ),
    }
}

/// Count and sum over the buckets `(current - span, current]`.
pub fn window_read(buckets: &[WindowBucket], current: i64, span: i64) -> (u64, f64) {
    let (mut count, mut sum) = (0u64, 0.0f64);
    for b in buckets.iter().rev() {
        if b.id > current {
            continue;
        }
        if b.id <= current - span {
            break;
        }
        count += u64::from(b.count);
        sum += b.sum;
    }
    (count, sum)
}

pub fn window_prune(buckets: &mut Vec<WindowBucket>, oldest_needed: i64) {
    prune(buckets, oldest_needed, |b| b.id);
}

/// Records one value hash in its bucket.
pub fn distinct_add(buckets: &mut Vec<DistinctBucket>, id: i64, hash: u64) {
    let bucket = match locate(buckets, id, |b| b.id) {
        Ok(i) => &mut buckets[i],
        Err(i) => {
            buckets.insert(
                i,
                DistinctBucket {
                    id,
                    values: Vec::new(),
                },
            );
            &mut buckets[i]
        }
    };
    if let Err(pos) = bucket.values.binary_search(&hash) {
        bucket.values.insert(pos, hash);
    }
}

/// Number of distinct hashes over the buckets `(current - span, current]`.
/// `scratch` is reused between calls to avoid allocating per event.
pub fn distinct_read(
    buckets: &[DistinctBucket],
    current: i64,
    span: i64,
    scratch: &mut Vec<u64>,
) -> u64 {
    scratch.clear();
    let mut in_window = buckets
        .iter()
        .filter(|b| b.id <= current && b.id > current - span);
    let Some(first) = in_window.next() else {
        return 0;
    };
    scratch.extend_from_slice(&first.values);
    let mut merged = false;
    for b in in_window {
        scratch.extend_from_slice(&b.values);
        merged = true;
    }
    if merged {
        scratch.sort_unstable();
        scratch.dedup();
    }
    scratch.len() as u64
}

pub fn distinct_prune(buckets: &mut Vec<DistinctBucket>, oldest_needed: i64) {
    prune(buckets, oldest_needed, |b| b.id);
}

impl UserState {
    /// Approximate heap + inline bytes, for the memory budget and metrics.
    pub fn approx_bytes(&self) -> usize {
        let mut bytes = std::mem::size_of::<UserState>()
            + self.aggs.capacity() * std::mem::size_of::<AggState>();
        for agg in &self.aggs {
            bytes += match agg {
                AggState::Window(b) => b.capacity() * std::mem::size_of::<WindowBucket>(),
                AggState::Distinct(b) => b
                    .iter()
                    .map(|d| std::mem::size_of::<DistinctBucket>() + d.values.capacity() * 8)
                    .sum(),
                AggState::Last(_) | AggState::Lifetime(_) => 0,
            };
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_exactly_the_last_span_buckets() {
        let mut b = Vec::new();
        for id in [1, 2, 2, 5, 9] {
            window_add(&mut b, id, 1.0);
        }
        assert_eq!(window_read(&b, 9, 5).0, 2); // (4, 9] holds buckets 5 and 9
        assert_eq!(window_read(&b, 9, 4).0, 1); // (5, 9] holds bucket 9 only
        assert_eq!(window_read(&b, 9, 10).0, 5);
        assert_eq!(window_read(&b, 2, 1).0, 2); // (1, 2]
    }

    #[test]
    fn out_of_order_insert_keeps_buckets_sorted_and_future_buckets_out() {
        let mut b = Vec::new();
        window_add(&mut b, 10, 1.0);
        window_add(&mut b, 7, 2.0);
        window_add(&mut b, 8, 3.0);
        let ids: Vec<i64> = b.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![7, 8, 10]);
        // An event at bucket 8 must not see bucket 10 (not yet in its window).
        assert_eq!(window_read(&b, 8, 60), (2, 5.0));
    }

    #[test]
    fn distinct_counts_union_across_buckets() {
        let mut b = Vec::new();
        distinct_add(&mut b, 1, 7);
        distinct_add(&mut b, 1, 7);
        distinct_add(&mut b, 2, 7);
        distinct_add(&mut b, 2, 9);
        let mut scratch = Vec::new();
        assert_eq!(distinct_read(&b, 2, 7, &mut scratch), 2);
        assert_eq!(distinct_read(&b, 1, 7, &mut scratch), 1);
        distinct_prune(&mut b, 2);
        assert_eq!(b.len(), 1);
    }
}
