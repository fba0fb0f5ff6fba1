"""Trusted reference scorer: run an ONNX model with onnxruntime.

Usage: onnx_score.py FEATURES_CSV MODEL_ONNX

FEATURES_CSV has a header of feature names and one row of float values per
line. When a model.json sits beside MODEL_ONNX, its "features" list gives the
input order (columns are picked by name; a missing one is an error), its
"input"/"output" name the tensors and "positive_index" the column of the
positive class; otherwise the CSV's column order, the tensors "features" and
"probabilities" and index 1 are used. Values are parsed as float64 and cast to
float32. For each row, stdout gets the positive-class probability with 17
significant digits (exact for the float32 result).
"""

import csv
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def model_meta(onnx_path):
    """Contents of model.json beside the model, or {} when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "model.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_rows(csv_path, order):
    """Rows of the CSV as a float32 matrix, columns in `order` (or CSV order)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [row for row in reader if row]
    names = order or header
    missing = [name for name in names if name not in header]
    if missing:
        sys.exit(f"error: {csv_path} lacks feature column(s) {missing}")
    index = [header.index(name) for name in names]
    values = np.array([[float(row[i]) for i in index] for row in rows], dtype=np.float64)
    return values.reshape(len(rows), len(names)).astype(np.float32)


def main(csv_path, onnx_path):
    meta = model_meta(onnx_path)
    x = read_rows(csv_path, meta.get("features"))
    if len(x) == 0:
        return
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (proba,) = session.run(
        [meta.get("output", "probabilities")], {meta.get("input", "features"): x}
    )
    column = proba[:, meta.get("positive_index", 1)]
    sys.stdout.write("".join(f"{float(p):.17g}\n" for p in column))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
