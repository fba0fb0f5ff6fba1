"""Train the click-through (CTR) model and export it for the augur engine.

The model is a logistic regression on the 12 standardized features of the
reference scenario. The standardization is folded into the coefficients
(w' = w / sigma, b' = b - sum(w * mu / sigma)) so that the exported ONNX graph
is a single ``ai.onnx.ml`` ``LinearClassifier`` node: the Rust runtime (tract)
has no ``Scaler`` operator.

Steps:
  1. read the features (CSV or Parquet, e.g. ``augur backfill`` output, with or
     without ``--all-events``) and, with ``--labels``, join the labels on
     ``event_id``; only rows with a label (impressions) are kept;
  2. validate (missing feature column, nulls or non-finite values, label not
     0/1, label rate 0 or 1): any failure stops with exit code 2 and a message
     naming the column;
  3. split: the last 20% by ``ts`` (ties by ``event_id``) is the holdout when a
     ``ts`` column exists, else the last 20% of rows;
  4. fit StandardScaler + LogisticRegression on the training part, fold the
     scaling, export with skl2onnx and check with onnxruntime that the folded
     ONNX model reproduces the pipeline's probabilities within 1e-5;
  5. evaluate the ONNX model on the holdout and write ``model.onnx`` and
     ``model.json`` into ``--out``;
  6. with ``--register``: ``augur models register`` the ``--out`` directory
     (the registry assigns the version), score the same holdout rows with the
     registry's champion (the ``champion`` alias, else the newest other
     version; its own ``features`` order, float32) and, if the new holdout AUC
     is strictly greater or there is no other version, ``augur models
     promote`` the new version. A failing augur command or an unreadable
     champion stops with exit code 3; "not promoted" is a success (exit 0).

In ``model.json``, ``metrics`` are measured on the holdout (``positive_rate``
is the holdout's observed label rate; a score >= ``threshold`` counts as a
positive for ``accuracy``), ``reference`` describes the training part
(quantiles use numpy's linear interpolation; the samples share one seeded
choice of rows) and ``lineage.rows`` counts all labelled rows, both parts.

Examples:
  python training/train.py --features tests/data/golden/expected_features.csv \\
      --labels tests/data/golden/expected_labels.csv --out models/ctr/1

  augur backfill --topology topologies/ctr.yaml \\
      --input tests/data/golden/events.jsonl --out /tmp/train.parquet
  python training/train.py --features /tmp/train.parquet --out /tmp/candidate \\
      --register --topology topologies/ctr.yaml

The augur binary is ``--augur``, else ``$AUGUR_BIN``, else ``augur`` on PATH,
else ``target/release/augur`` or ``target/debug/augur`` of this repository.
"""

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = [
    "impressions_1h",
    "clicks_1h",
    "ctr_1h",
    "impressions_24h",
    "clicks_24h",
    "ctr_24h",
    "purchases_30d",
    "avg_purchase_amount_30d",
    "distinct_categories_7d",
    "secs_since_last_event",
    "days_since_last_purchase",
    "events_total",
]
SEED = 0
HOLDOUT_FRACTION = 0.2
CALIBRATION_BINS = 10
SAMPLE_SIZE = 1000
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"
# Only ai.onnx.ml ops are emitted; a modest default-domain opset keeps the
# file readable by older runtimes.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 1}
FOLD_TOLERANCE = 1e-5


class DataError(Exception):
    """Invalid training data; the message names the offending column."""


class RegistryError(Exception):
    """augur failed or the registry's champion could not be scored."""


def read_table(path):
    """Read a CSV or Parquet file (chosen by extension) into a DataFrame."""
    if path.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    return pd.read_csv(path)


def load(features_path, labels_path):
    """Return the labelled rows: features joined with labels when given."""
    df = read_table(features_path)
    if "event_id" not in df.columns:
        raise DataError(f"{features_path}: required column 'event_id' is missing")
    if labels_path is not None:
        if "label" in df.columns:
            raise DataError(
                f"column 'label': present in {features_path} and --labels was also given"
            )
        labels = pd.read_csv(labels_path)
        for column in ("event_id", "label"):
            if column not in labels.columns:
                raise DataError(f"{labels_path}: required column '{column}' is missing")
        if labels["event_id"].duplicated().any():
            raise DataError(f"column 'event_id': duplicated in {labels_path}")
        df = df.merge(labels[["event_id", "label"]], on="event_id", how="inner")
    elif "label" not in df.columns:
        raise DataError(f"column 'label': not in {features_path} and no --labels given")
    return df[df["label"].notna()].reset_index(drop=True)


def validate(df):
    """Raise DataError unless the labelled rows are fit for training."""
    for name in FEATURES:
        if name not in df.columns:
            raise DataError(f"column '{name}': required feature column is missing")
    if df.empty:
        raise DataError("column 'label': no labelled rows")
    checked = FEATURES + ["label"] + (["ts"] if "ts" in df.columns else [])
    for name in checked:
        column = df[name]
        if column.isna().any():
            raise DataError(f"column '{name}': {int(column.isna().sum())} null value(s)")
        if not pd.api.types.is_numeric_dtype(column):
            raise DataError(f"column '{name}': not numeric ({column.dtype})")
        if not np.isfinite(column.to_numpy(dtype=np.float64)).all():
            raise DataError(f"column '{name}': non-finite value(s)")
    bad = sorted(set(df["label"].unique().tolist()) - {0, 1})
    if bad:
        raise DataError(f"column 'label': values must be 0 or 1, found {bad[:5]}")
    rate = df["label"].mean()
    if rate in (0.0, 1.0):
        raise DataError(f"column 'label': label rate is {rate:g}, both classes are needed")


def split(df):
    """Split into (train, holdout): the last 20% by ts, else by row order."""
    if "ts" in df.columns:
        df = df.sort_values(["ts", "event_id"], kind="mergesort").reset_index(drop=True)
    n_train = int(len(df) * (1 - HOLDOUT_FRACTION))
    train, holdout = df.iloc[:n_train], df.iloc[n_train:]
    for part, name in ((train, "training"), (holdout, "holdout")):
        if part["label"].nunique() < 2:
            raise DataError(f"column 'label': the {name} part has a single class")
    return train, holdout


def fit(x, y, c):
    """Fit StandardScaler + LogisticRegression and its folded equivalent."""
    pipeline = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=SEED)
    )
    pipeline.fit(x, y)
    scaler, clf = pipeline[0], pipeline[-1]
    w, b = clf.coef_, clf.intercept_
    folded = copy.deepcopy(clf)
    folded.coef_ = w / scaler.scale_
    folded.intercept_ = b - (w * scaler.mean_ / scaler.scale_).sum(axis=1)
    return pipeline, folded


def export(folded):
    """Convert the folded classifier to a single-node LinearClassifier graph."""
    onx = to_onnx(
        folded,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, len(FEATURES)]))],
        options={id(folded): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    ops = [(node.domain, node.op_type) for node in onx.graph.node]
    if ops != [("ai.onnx.ml", "LinearClassifier")]:
        raise RuntimeError(f"expected a single LinearClassifier node, got {ops}")
    return onx


def onnx_scores(model, x, positive_index, input_name=ONNX_INPUT, output_name=ONNX_OUTPUT):
    """Positive-class probabilities of an ONNX model (serialized bytes or a
    file path), run on float32 input."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (proba,) = session.run([output_name], {input_name: x.astype(np.float32)})
    return proba[:, positive_index].astype(np.float64)


def calibration(y, p):
    """[mean predicted, observed rate, count] per equal-count bin of scores."""
    order = np.argsort(p, kind="mergesort")
    bins = np.array_split(order, min(CALIBRATION_BINS, len(p)))
    return [[float(p[b].mean()), float(y[b].mean()), int(len(b))] for b in bins]


def evaluate(y, p, threshold):
    """Holdout metrics of the scores p against the labels y."""
    return {
        "auc": float(roc_auc_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(((p >= threshold).astype(int) == y).mean()),
        "positive_rate": float(y.mean()),
        "calibration": calibration(y, p),
    }


def distribution(values, rows):
    """Percentiles 0..100 and the values at the sampled rows."""
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, 101))
    return {
        "quantiles": [float(q) for q in quantiles],
        "sample": [float(v) for v in values[rows]],
    }


def reference(x, y, scores):
    """Training-set distributions of each feature and of the model's score."""
    rng = np.random.default_rng(SEED)
    rows = np.sort(rng.choice(len(x), size=min(SAMPLE_SIZE, len(x)), replace=False))
    return {
        "features": {name: distribution(x[:, i], rows) for i, name in enumerate(FEATURES)},
        "score": distribution(scores, rows),
        "positive_rate": float(y.mean()),
    }


def lineage(path, df, topology_hash):
    """Where the model came from."""
    has_ts = "ts" in df.columns
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {
        "training_data": path,
        "rows": int(len(df)),
        "ts_min": int(df["ts"].min()) if has_ts else None,
        "ts_max": int(df["ts"].max()) if has_ts else None,
        "created": created.isoformat().replace("+00:00", "Z"),
        "topology_hash": topology_hash,
    }


def find_augur():
    """The augur binary when --augur is not given (see the module docstring)."""
    found = os.environ.get("AUGUR_BIN") or shutil.which("augur")
    if found:
        return found
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for build in ("release", "debug"):
        candidate = os.path.join(repo, "target", build, "augur")
        if os.path.isfile(candidate):
            return candidate
    raise RegistryError("no augur binary: pass --augur, set AUGUR_BIN or put augur on PATH")


def augur(binary, *args):
    """Run an augur command and return its stdout; RegistryError on failure."""
    command = [binary, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise RegistryError(f"cannot run {binary}: {err}") from err
    if done.returncode != 0:
        raise RegistryError(f"`{' '.join(command)}` failed with exit code "
                            f"{done.returncode}: {done.stderr.strip()}")
    return done.stdout


def register(binary, topology, out, name):
    """Register the --out directory; return (new version, registry root)."""
    stdout = augur(binary, "models", "register", "--topology", topology, out, "--name", name)
    pattern = rf"registered {re.escape(name)} v(\d+) from {re.escape(out)} in (.+)"
    match = re.fullmatch(pattern, stdout.strip())
    if match is None:
        raise RegistryError(f"unexpected output of augur models register: {stdout.strip()!r}")
    return int(match[1]), match[2]


def champion_version(root, name, new_version):
    """The version to beat: the champion alias, else the newest other version
    (None when the new version is the only one)."""
    model_dir = os.path.join(root, name)
    aliases_path = os.path.join(model_dir, "aliases.json")
    if os.path.exists(aliases_path):
        with open(aliases_path) as f:
            champion = json.load(f).get("champion")
        if champion is not None:
            return int(champion)
    others = [int(e) for e in os.listdir(model_dir) if e.isdigit() and int(e) != new_version]
    return max(others, default=None)


def champion_auc(model_dir, holdout):
    """Holdout AUC of a registered model, fed its own model.json feature order."""
    with open(os.path.join(model_dir, "model.json")) as f:
        meta = json.load(f)
    missing = [n for n in meta["features"] if n not in holdout.columns]
    if missing:
        raise ValueError(f"{model_dir}: feature(s) {missing} are not in the training data")
    x = holdout[meta["features"]].to_numpy(dtype=np.float32)
    p = onnx_scores(os.path.join(model_dir, "model.onnx"), x, meta["positive_index"],
                    meta["input"], meta["output"])
    return float(roc_auc_score(holdout["label"].to_numpy(dtype=np.int64), p))


def register_and_compare(args, holdout, new_auc):
    """Register --out, compare with the champion on the holdout, promote if
    better; return the summary lines."""
    binary = args.augur or find_augur()
    version, root = register(binary, args.topology, args.out, args.name)
    lines = [f"registered {args.name} v{version} in {root} (augur: {binary})"]
    try:
        champion = champion_version(root, args.name, version)
        champ_auc = None if champion is None else champion_auc(
            os.path.join(root, args.name, str(champion)), holdout)
    except (OSError, ValueError, KeyError) as err:
        raise RegistryError(f"registered {args.name} v{version}, but its champion could not "
                            f"be scored: {err}") from err
    if champion is None:
        reason = "no other version"
    elif new_auc > champ_auc:
        reason = f"holdout AUC {new_auc:.6f} > champion v{champion} {champ_auc:.6f}"
    else:
        lines.append(f"not promoted: holdout AUC {new_auc:.6f} <= "
                     f"champion v{champion} {champ_auc:.6f}")
        return lines
    augur(binary, "models", "promote", "--topology", args.topology, args.name, str(version))
    lines.append(f"promoted {args.name} v{version} to champion: {reason}")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train the CTR logistic regression and export ONNX + model.json."
    )
    parser.add_argument("--features", required=True, help="features CSV or Parquet")
    parser.add_argument("--labels", help="labels CSV (event_id,label) to join on event_id")
    parser.add_argument("--out", required=True, help="output directory, e.g. models/ctr/1")
    parser.add_argument("--name", default="ctr", help="model name (default: ctr)")
    parser.add_argument("--version", type=int, default=1,
                        help="model version (default: 1; with --register the registry's)")
    parser.add_argument("--C", dest="c", type=float, default=1.0,
                        help="inverse regularization strength (default: 1.0)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="decision threshold stored in model.json (default: 0.5)")
    parser.add_argument("--topology-hash", default=None,
                        help="hash of the feature topology, recorded in lineage")
    parser.add_argument("--register", action="store_true",
                        help="register --out with augur and promote it if it beats the champion")
    parser.add_argument("--topology", help="topology YAML naming the registry (with --register)")
    parser.add_argument("--augur", help="augur binary (default: $AUGUR_BIN, PATH, target/)")
    args = parser.parse_args(argv)
    if args.register != (args.topology is not None):
        parser.error("--register and --topology go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        df = load(args.features, args.labels)
        validate(df)
        train, holdout = split(df)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    x_train = train[FEATURES].to_numpy(dtype=np.float64)
    y_train = train["label"].to_numpy(dtype=np.int64)
    x_hold = holdout[FEATURES].to_numpy(dtype=np.float64)
    y_hold = holdout["label"].to_numpy(dtype=np.int64)

    pipeline, folded = fit(x_train, y_train, args.c)
    positive_index = int(np.flatnonzero(folded.classes_ == 1)[0])
    onx = export(folded)

    onnx_bytes = onx.SerializeToString()
    p_hold = onnx_scores(onnx_bytes, x_hold, positive_index)
    gap = float(np.abs(p_hold - pipeline.predict_proba(x_hold)[:, positive_index]).max())
    if gap > FOLD_TOLERANCE:
        print(f"error: folded ONNX model differs from the pipeline by {gap:.3g}",
              file=sys.stderr)
        return 1

    metrics = evaluate(y_hold, p_hold, args.threshold)
    meta = {
        "name": args.name,
        "version": args.version,
        "features": FEATURES,
        "input": ONNX_INPUT,
        "output": ONNX_OUTPUT,
        "positive_index": positive_index,
        "threshold": args.threshold,
        "metrics": metrics,
        "reference": reference(x_train, y_train, onnx_scores(onnx_bytes, x_train, positive_index)),
        "lineage": lineage(args.features, df, args.topology_hash),
    }

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model.onnx"), "wb") as f:
        f.write(onnx_bytes)
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump(meta, f, indent=2, allow_nan=False)
        f.write("\n")

    print(f"{args.name} v{args.version} (C={args.c:g}): trained on {len(train)} rows, "
          f"holdout {len(holdout)} rows, folded-vs-pipeline max gap {gap:.2e}")
    for key in ("auc", "log_loss", "accuracy", "positive_rate"):
        print(f"  {key:<14}{metrics[key]:.6f}")
    print("  calibration (mean predicted, observed, count):")
    for mean_pred, observed, count in metrics["calibration"]:
        print(f"    {mean_pred:.4f}  {observed:.4f}  {count}")
    print(f"wrote {args.out}/model.onnx and {args.out}/model.json")
    if args.register:
        try:
            lines = register_and_compare(args, holdout, metrics["auc"])
        except RegistryError as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
