"""Builds a model version whose drift reference describes a given stream.

Copies MODEL_DIR's model.onnx and model.json into OUT_DIR and replaces
model.json's "reference" with distributions taken from a backfill (Parquet, as
written by `augur backfill`): only rows with ts >= --after-ts (the steady state
of the stream, past its warm-up), a seeded uniform sample of --sample rows per
feature, the model's onnxruntime scores on those rows, and the label rate.

usage: make_reference.py FEATURES.parquet MODEL_DIR OUT_DIR --after-ts MS [--sample N]
"""

import argparse
import json
import os
import shutil

import numpy as np
import onnxruntime as ort
import pandas as pd


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("features")
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--after-ts", type=int, required=True)
    parser.add_argument("--sample", type=int, default=5000)
    args = parser.parse_args()

    meta = json.load(open(os.path.join(args.model_dir, "model.json")))
    names = meta["features"]
    df = pd.read_parquet(args.features)
    df = df[df["ts"] >= args.after_ts]
    rng = np.random.default_rng(11)
    rows = df.iloc[np.sort(rng.choice(len(df), size=min(args.sample, len(df)), replace=False))]
    x = rows[names].to_numpy(dtype=np.float32)
    session = ort.InferenceSession(os.path.join(args.model_dir, "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = session.run([meta.get("output", "probabilities")], {meta.get("input", "features"): x})[0]
    scores = out[:, meta.get("positive_index", 1)].astype(np.float64)

    def distribution(values):
        values = np.asarray(values, dtype=np.float64)
        return {"quantiles": [float(q) for q in np.quantile(values, np.linspace(0, 1, 101))],
                "sample": [float(v) for v in values]}

    meta["reference"] = {
        "features": {n: distribution(rows[n]) for n in names},
        "score": distribution(scores),
        "positive_rate": float(df["label"].mean()),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    shutil.copy(os.path.join(args.model_dir, "model.onnx"), os.path.join(args.out_dir, "model.onnx"))
    json.dump(meta, open(os.path.join(args.out_dir, "model.json"), "w"), indent=1)
    print(f"{len(df)} steady rows, label rate {df['label'].mean():.4f}, "
          f"mean score {scores.mean():.4f}")


if __name__ == "__main__":
    main()
