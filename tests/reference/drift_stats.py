"""Reference drift statistics for augur's monitor, from trusted tools.

Reads a JSON list of sample pairs {"a": [...], "b": [...]} and writes, per pair, the
two-sample KS statistic and p-value from scipy.stats.ks_2samp (defaults: two-sided,
method "auto") and the PSI computed with NumPy under augur's documented binning: edges
are the reference sample's deciles taken as sorted_a[floor(k * n / 10)] for k = 1..9,
duplicates removed; a value's bin is the number of edges <= it (np.searchsorted
side="right"); shares are floored at 1e-4; PSI = sum((b - a) * ln(b / a)).

usage: drift_stats.py PAIRS.json OUT.json
"""

import json
import sys

import numpy as np
from scipy import stats


def psi(reference, actual):
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    n = len(ref)
    edges = np.unique(ref[[k * n // 10 for k in range(1, 10)]])
    def shares(values):
        bins = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="right")
        counts = np.bincount(bins, minlength=len(edges) + 1)
        return np.maximum(counts / max(len(values), 1), 1e-4)
    e, a = shares(reference), shares(actual)
    return float(np.sum((a - e) * np.log(a / e)))


def main():
    pairs = json.load(open(sys.argv[1]))
    out = []
    for pair in pairs:
        result = stats.ks_2samp(pair["a"], pair["b"])
        out.append({
            "statistic": float(result.statistic),
            "p_value": float(result.pvalue),
            "psi": psi(pair["a"], pair["b"]),
        })
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
