//! The statistics behind drift and quality monitoring: the two-sample
//! Kolmogorov–Smirnov test with its exact p-value, the population stability index,
//! ROC AUC and log loss. Plain functions over slices; the monitor calls them off the
//! hot path.

/// Result of a two-sample KS test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsTest {
    /// sup |F1 − F2| over the pooled sample.
    pub statistic: f64,
    /// P(D ≥ statistic) under the null that both samples come from one continuous
    /// distribution.
    pub p_value: f64,
}

/// Largest sample size for which the exact null distribution is computed (the same
/// limit below which `scipy.stats.ks_2samp` uses its exact method by default).
pub const MAX_EXACT: usize = 10_000;

/// The two-sided two-sample KS test. Both samples must be sorted ascending and free of
/// NaN. Ties are handled by evaluating both empirical CDFs after each distinct value.
/// The p-value is exact for samples of up to [`MAX_EXACT`] values each and otherwise
/// from the asymptotic Kolmogorov distribution.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> KsTest {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 || n.max(m) > MAX_EXACT {
        return ks_2samp_asymptotic(a, b);
    }
    // The statistic only takes values k / lcm(n, m); snap it to that lattice.
    let d = ks_statistic(a, b);
    let g = gcd(n, m);
    let lcm = (n / g) as f64 * m as f64;
    let h = (d * lcm).round_ties_even();
    KsTest {
        statistic: h / lcm,
        p_value: if h == 0.0 {
            1.0
        } else {
            exact_exceedance(n, m, h as u64)
        },
    }
}

/// The KS test with the asymptotic p-value only (Stephens' approximation of the
/// Kolmogorov distribution): linear time, for when the exact value is not needed.
pub fn ks_2samp_asymptotic(a: &[f64], b: &[f64]) -> KsTest {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 {
        return KsTest {
            statistic: 0.0,
            p_value: 1.0,
        };
    }
    let d = ks_statistic(a, b);
    let en = (n as f64 * m as f64) / (n + m) as f64;
    KsTest {
        statistic: d,
        p_value: kolmogorov_sf((en.sqrt() + 0.12 + 0.11 / en.sqrt()) * d),
    }
}

fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0usize, 0usize);
    let mut d = 0.0f64;
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// P(D ≥ h / lcm(n, m)) for two samples of sizes n and m, exactly.
///
/// Under the null every interleaving of the two samples is equally likely: a uniformly
/// random monotone lattice path from (0, 0) to (n, m), whose point (i, j) has
/// F1 − F2 = i/n − j/m = (i·m/g − j·n/g) / lcm. The path exceeds the statistic when
/// |i·m/g − j·n/g| ≥ h somewhere. A random path steps right from (i, j) with
/// probability (n − i) / (n − i + m − j). Walking the lattice forward, we carry the
/// probability of being at each point without having left the band, and add the mass
/// of every step that leaves it to the answer. Every term is positive, so small
/// p-values keep their relative precision (no 1 − (1 − p) cancellation).
fn exact_exceedance(n: usize, m: usize, h: u64) -> f64 {
    let g = gcd(n, m);
    let (mg, ng) = ((m / g) as i64, (n / g) as i64);
    let h = h as i64;
    // The rows of column i inside the band: (i·mg − h) / ng < j < (i·mg + h) / ng.
    let band = |i: usize| -> (usize, usize) {
        let center = i as i64 * mg;
        let lo = ((center - h).div_euclid(ng) + 1).max(0) as usize;
        let hi = ((center + h + ng - 1).div_euclid(ng) - 1).min(m as i64);
        (lo, hi.max(-1) as usize)
    };
    let inverse: Vec<f64> = (0..=n + m)
        .map(|k| if k == 0 { 0.0 } else { 1.0 / k as f64 })
        .collect();
    let mut column = vec![0.0f64; m + 1];
    let mut next = vec![0.0f64; m + 1];
    column[0] = 1.0;
    let mut exceeded = 0.0f64;
    let (mut lo, mut hi) = band(0);
    for i in 0..=n {
        let (next_lo, next_hi) = if i < n { band(i + 1) } else { (1, 0) };
        let right = (n - i) as f64;
        if lo <= hi {
            for j in lo..=hi {
                let p = column[j];
                if p == 0.0 {
                    continue;
                }
                // A random path at (i, j) steps right with probability (n − i) / left
                // and up with probability (m − j) / left.
                let q = p * inverse[n - i + m - j];
                if i < n {
                    let step = q * right;
                    if (next_lo..=next_hi).contains(&j) {
                        next[j] += step;
                    } else {
                        exceeded += step;
                    }
                }
                if j < m {
                    let step = q * (m - j) as f64;
                    if j < hi {
                        column[j + 1] += step;
                    } else {
                        exceeded += step;
                    }
                }
            }
            column[lo..=hi].fill(0.0);
        }
        std::mem::swap(&mut column, &mut next);
        (lo, hi) = (next_lo, next_hi);
    }
    exceeded.min(1.0)
}

/// The Kolmogorov distribution's survival function, Q(x) = 2 Σ (−1)^(k−1) e^(−2k²x²).
fn kolmogorov_sf(x: f64) -> f64 {
    if x < 0.2 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * x * x).exp();
        sum += if k as i64 % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Bin edges for the PSI: the reference's deciles (sample values at ⌊k·n/10⌋ of the
/// sorted sample, k = 1..9), duplicates removed. A value's bin is the number of edges
/// ≤ it.
pub fn psi_edges(sorted_reference: &[f64]) -> Vec<f64> {
    let n = sorted_reference.len();
    let mut edges: Vec<f64> = (1..10)
        .filter_map(|k| sorted_reference.get(k * n / 10).copied())
        .collect();
    edges.dedup();
    edges
}

/// Share of values per bin, each floored at 1e-4 so empty bins stay finite.
pub fn bin_shares(values: &[f64], edges: &[f64]) -> Vec<f64> {
    let mut counts = vec![0usize; edges.len() + 1];
    for v in values {
        counts[edges.partition_point(|e| e <= v)] += 1;
    }
    let n = values.len().max(1) as f64;
    counts
        .into_iter()
        .map(|c| (c as f64 / n).max(1e-4))
        .collect()
}

/// Population stability index of `actual` against `expected` shares:
/// Σ (a − e) · ln(a / e).
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    expected
        .iter()
        .zip(actual)
        .map(|(e, a)| (a - e) * (a / e).ln())
        .sum()
}

/// ROC AUC of scores against 0/1 labels (ties get half credit); None without both classes.
pub fn auc(scored: &mut [(f64, bool)]) -> Option<f64> {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = scored.iter().filter(|s| s.1).count();
    let negatives = scored.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Mann–Whitney U with average ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < scored.len() {
        let mut j = i;
        while j < scored.len() && scored[j].0 == scored[i].0 {
            j += 1;
        }
        let average_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += average_rank * scored[i..j].iter().filter(|s| s.1).count() as f64;
        i = j;
    }
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Mean log loss, with probabilities clipped to [1e-15, 1 − 1e-15].
pub fn log_loss(scored: &[(f64, bool)]) -> f64 {
    let n = scored.len().max(1) as f64;
    scored
        .iter()
        .map(|(s, y)| {
            let p = s.clamp(1e-15, 1.0 - 1e-15);
            if *y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_samples_have_p_one_and_disjoint_ones_p_tiny() {
        let a: Vec<f64> = (0..50).map(f64::from).collect();
        let t = ks_2samp(&a, &a);
        assert_eq!((t.statistic, t.p_value), (0.0, 1.0));
        let b: Vec<f64> = (100..150).map(f64::from).collect();
        let t = ks_2samp(&a, &b);
        assert_eq!(t.statistic, 1.0);
        // P(D = 1) = 2 / C(100, 50).
        let binomial: f64 = (1..=50).map(|k| (50 + k) as f64 / k as f64).product();
        assert!(
            (t.p_value * binomial / 2.0 - 1.0).abs() < 1e-9,
            "{}",
            t.p_value
        );
    }

    #[test]
    fn small_exact_case_matches_enumeration() {
        // n = m = 2: of the 6 interleavings, those with D = 1 are aabb and bbaa.
        let t = ks_2samp(&[1.0, 2.0], &[3.0, 4.0]);
        assert_eq!(t.statistic, 1.0);
        assert!((t.p_value - 2.0 / 6.0).abs() < 1e-15);
        // D ≥ 1/2 holds for every interleaving.
        let t = ks_2samp(&[1.0, 3.0], &[2.0, 4.0]);
        assert_eq!(t.statistic, 0.5);
        assert!((t.p_value - 1.0).abs() < 1e-15);
    }

    #[test]
    fn auc_and_log_loss() {
        let mut s = vec![(0.1, false), (0.4, true), (0.5, false), (0.8, true)];
        assert_eq!(auc(&mut s), Some(0.75));
        let mut perfect = vec![(0.1, false), (0.9, true)];
        assert_eq!(auc(&mut perfect), Some(1.0));
        assert_eq!(auc(&mut [(0.5, true)]), None);
        assert!((log_loss(&[(0.5, true), (0.5, false)]) - std::f64::consts::LN_2).abs() < 1e-15);
    }

    #[test]
    fn psi_is_zero_for_the_reference_itself() {
        let reference: Vec<f64> = (0..1000).map(|i| (i % 97) as f64).collect();
        let mut sorted = reference.clone();
        sorted.sort_by(f64::total_cmp);
        let edges = psi_edges(&sorted);
        let e = bin_shares(&reference, &edges);
        assert!(psi(&e, &e).abs() < 1e-15);
        let shifted: Vec<f64> = reference.iter().map(|x| x + 30.0).collect();
        assert!(psi(&e, &bin_shares(&shifted, &edges)) > 0.2);
    }
}
