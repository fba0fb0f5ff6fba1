"""Checks a backfill output (CSV or Parquet) against the pandas golden files.

Usage: check_backfill.py BACKFILL GOLDEN_DIR

Every golden event must have a row; counts must match exactly and real values within
1e-9 relative; every impression's label must equal expected_labels.csv, and every
other row's label must be empty. Prints a summary; exits 1 on the first kind of
mismatch found (with examples).
"""

import sys

import numpy as np
import pandas as pd


def main() -> int:
    path, golden_dir = sys.argv[1], sys.argv[2]
    got = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    expected = pd.read_csv(f"{golden_dir}/expected_features.csv").set_index("event_id")
    labels = pd.read_csv(f"{golden_dir}/expected_labels.csv").set_index("event_id")["label"]
    got = got.set_index("event_id")
    if got.index.duplicated().any():
        print("duplicate rows:", list(got.index[got.index.duplicated()][:5]))
        return 1
    missing = expected.index.difference(got.index)
    if len(missing):
        print(f"{len(missing)} golden events have no row, e.g. {list(missing[:5])}")
        return 1
    rows = got.loc[expected.index]
    worst = 0.0
    for column in expected.columns:
        want = expected[column].to_numpy(dtype=float)
        have = rows[column].to_numpy(dtype=float)
        rel = np.abs(have - want) / np.maximum(np.abs(want), 1e-12)
        bad = rel > 1e-9
        if bad.any():
            ids = list(expected.index[bad][:5])
            print(f"feature {column}: {int(bad.sum())} mismatches, e.g. {ids}")
            return 1
        worst = max(worst, float(rel.max()))
    got_labels = rows.loc[labels.index, "label"]
    if got_labels.isna().any() or (got_labels.astype(int) != labels).any():
        bad = labels.index[got_labels.isna() | (got_labels.fillna(-1).astype(int) != labels)]
        print(f"labels: {len(bad)} mismatches, e.g. {list(bad[:5])}")
        return 1
    unscored = rows.index.difference(labels.index)
    if rows.loc[unscored, "label"].notna().any():
        print("unscored events carry a label")
        return 1
    print(f"ok: {len(rows)} rows, {len(labels)} labels, max relative difference {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
