//! In-process counters for the live status line of `augur demo` and for the load
//! harness: lock-free, cheap enough to bump per record.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A latency histogram with logarithmic buckets (factor 2^(1/4), from 1 µs), so that
/// quantiles are within ~19% of the truth without storing samples.
pub struct LatencyHistogram {
    buckets: [AtomicU64; Self::BUCKETS],
}

impl LatencyHistogram {
    const BUCKETS: usize = 128;

    pub fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn index(micros: u64) -> usize {
        if micros <= 1 {
            return 0;
        }
        let i = ((micros as f64).log2() * 4.0).ceil() as usize;
        i.min(Self::BUCKETS - 1)
    }

    pub fn record_us(&self, micros: u64) {
        self.buckets[Self::index(micros)].fetch_add(1, Relaxed);
    }

    /// Upper bound of the bucket holding quantile `q`, in µs; None when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(2f64.powf(i as f64 / 4.0).round() as u64);
            }
        }
        None
    }

    /// Zeroes the histogram (for per-interval figures).
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Worker-wide totals.
#[derive(Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub predictions: AtomicU64,
    pub dead_letters: AtomicU64,
    pub e2e_latency: LatencyHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record_us(us * 10);
        }
        let p50 = h.quantile_us(0.5).unwrap() as f64;
        let p99 = h.quantile_us(0.99).unwrap() as f64;
        assert!((5000.0..=5000.0 * 1.19).contains(&p50), "{p50}");
        assert!((9900.0..=9900.0 * 1.19).contains(&p99), "{p99}");
        h.reset();
        assert_eq!(h.quantile_us(0.5), None);
    }
}
