"""Tree-ensemble references for augur: models, rows, and onnxruntime's answers.

Usage: trees.py OUT_DIR [--rows N] [--seed S] [--no-speed] [--repeats R]

Trains four scikit-learn models on a synthetic 8-feature data set and exports them
with skl2onnx (zipmap off, so the second output is the [N, classes] "probabilities"):

    gb2   GradientBoostingClassifier, 2 classes      (TreeEnsembleClassifier, LOGISTIC)
    gb3   GradientBoostingClassifier, 3 classes      (SOFTMAX)
    hgb2  HistGradientBoostingClassifier, 2 classes  (trained with NaNs: missing values
    hgb3  HistGradientBoostingClassifier, 3 classes   tracked per node)
    gbr   GradientBoostingRegressor                  (TreeEnsembleRegressor)

Each goes to OUT_DIR/<name>/ as model.onnx and model.json (augur's metadata: features
f0..f7, input "features", output "probabilities" or "variable", positive_index 1).

Test rows (OUT_DIR/rows.f32, float32 little-endian, N x 8) come from the training
distribution, with about 5% NaN cells, 4% cells set exactly to a split threshold
of the models, and a few infinities. onnxruntime scores them (one thread):
OUT_DIR/<name>/ort_scores.f32 (N x outputs) and, for classifiers,
OUT_DIR/<name>/ort_labels.i64 (N).

Hand-made models (OUT_DIR/crafted/*.onnx) cover what the trained ones do not: every
node mode, missing-value tracks, the binary layouts (weights for one class or both,
zero, one or two base values), multiclass with classes missing from leaves, string
labels, every post transform, and the regressor's aggregates (SUM, AVERAGE, MIN, MAX)
with one and several targets. Their rows are OUT_DIR/crafted/rows.f32 (M x 4) and
onnxruntime's outputs OUT_DIR/crafted/<name>.f32. Only configurations whose output
onnxruntime fully defines are generated (it leaves the second column of some binary
layouts unwritten).

Unless --no-speed, onnxruntime's single-thread throughput (intra_op_num_threads=1,
inter_op_num_threads=1, sequential) is measured per trained model at batch 1, 64 and
1024: R repeats of about 0.4 s each, the median in rows/s. Batch 1 includes the
Python call overhead of InferenceSession.run, as any Python caller pays it.

OUT_DIR/manifest.json lists all of it; the figures are printed too.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
)
from skl2onnx import to_onnx
from skl2onnx.common import _container
from skl2onnx.common.data_types import FloatTensorType

WIDTH = 8
FEATURES = [f"f{i}" for i in range(WIDTH)]
BATCHES = (1, 64, 1024)


def _ints_for_missing_tracks():
    """skl2onnx 1.18 hands nodes_missing_value_tracks_true to onnx as Python bools,
    which onnx 1.17's make_attribute refuses; cast them to 0/1 on the way."""
    original = _container.ModelComponentContainer.add_node

    def add_node(self, *args, **kwargs):
        tracks = kwargs.get("nodes_missing_value_tracks_true")
        if tracks is not None:
            kwargs["nodes_missing_value_tracks_true"] = [int(bool(t)) for t in tracks]
        return original(self, *args, **kwargs)

    _container.ModelComponentContainer.add_node = add_node


def synthetic(rng, n):
    """Features and the latent score the targets come from."""
    x = rng.normal(size=(n, WIDTH)).astype(np.float32)
    x[:, 5] = np.round(x[:, 5] * 2)  # a discrete column: many equal values
    x[:, 6] = np.exp(x[:, 6])  # skewed
    z = (
        1.2 * x[:, 0]
        - 0.8 * x[:, 1] * x[:, 2]
        + 0.5 * np.sin(3 * x[:, 3])
        + 0.3 * x[:, 5]
        - 0.4 * np.log(x[:, 6])
        + 0.2 * x[:, 7] ** 2
    )
    return x, z


def train(rng):
    x, z = synthetic(rng, 10_000)
    noisy = z + rng.normal(scale=0.5, size=z.shape)
    y2 = (noisy > 0).astype(np.int64)
    y3 = np.digitize(noisy, [-0.7, 0.7]).astype(np.int64)
    x_missing = x.copy()
    x_missing[rng.random(x.shape) < 0.08] = np.nan
    x_missing[:, 4] = x[:, 4]  # one column never missing
    return [
        ("gb2", GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0), x, y2),
        ("gb3", GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0), x, y3),
        (
            "hgb2",
            HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=0),
            x_missing,
            y2,
        ),
        (
            "hgb3",
            HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=0),
            x_missing,
            y3,
        ),
        ("gbr", GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=0), x, noisy),
    ]


def export(name, estimator, out_dir):
    classifier = hasattr(estimator, "classes_")
    model = to_onnx(
        estimator,
        initial_types=[("features", FloatTensorType([None, WIDTH]))],
        options={"zipmap": False} if classifier else None,
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    outputs = [o.name for o in model.graph.output]
    scores = "probabilities" if classifier else outputs[0]
    assert scores in outputs, outputs
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    onnx.save(model, os.path.join(path, "model.onnx"))
    meta = {
        "name": f"trees-{name}",
        "version": 1,
        "features": FEATURES,
        "input": "features",
        "output": scores,
        "positive_index": 1,
        "threshold": 0.5,
    }
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return model, classifier, scores, outputs


def thresholds(model):
    """Split thresholds of a tree model, by feature."""
    by_feature = {}
    for node in model.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for feature, value, mode in zip(
            attrs["nodes_featureids"], attrs["nodes_values"], attrs["nodes_modes"]
        ):
            if mode != b"LEAF":
                by_feature.setdefault(feature, []).append(np.float32(value))
    return by_feature


def test_rows(rng, n, split_values):
    x, _ = synthetic(rng, n)
    mask = rng.random(x.shape)
    x[mask < 0.05] = np.nan
    for j in range(WIDTH):
        values = split_values.get(j)
        if not values:
            continue
        rows = np.nonzero((mask[:, j] >= 0.05) & (mask[:, j] < 0.09))[0]
        x[rows, j] = rng.choice(np.array(values, dtype=np.float32), size=len(rows))
    x[rng.integers(0, n, 20), rng.integers(0, WIDTH, 20)] = np.inf
    x[rng.integers(0, n, 20), rng.integers(0, WIDTH, 20)] = -np.inf
    return x.astype(np.float32)


def session(model_bytes):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def speed(sess, input_name, output_names, x, repeats):
    """Median rows/s over `repeats` timed runs of ~0.4 s, per batch size."""
    figures = {}
    for batch in BATCHES:
        batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
        for b in batches[:20]:  # warm up
            sess.run(output_names, {input_name: b})
        rates = []
        for _ in range(repeats):
            rows = 0
            start = time.perf_counter()
            i = 0
            while True:
                sess.run(output_names, {input_name: batches[i % len(batches)]})
                rows += batch
                i += 1
                elapsed = time.perf_counter() - start
                if elapsed > 0.4:
                    break
            rates.append(rows / elapsed)
        figures[str(batch)] = float(np.median(rates))
    return figures


# ---------------------------------------------------------------------------------
# Hand-made models
# ---------------------------------------------------------------------------------

CRAFTED_WIDTH = 4
GRID = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32)
ALL_MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]


def random_tree(rng, tree_id, max_depth, modes, missing, leaf):
    """Nodes of one tree (node ids in breadth-first order), as attribute columns."""
    nodes = []  # (node_id, depth)
    columns = {k: [] for k in ("ids", "features", "values", "modes", "true", "false", "missing")}
    weights = []  # (node_id, class, weight)
    queue = [(0, 0)]
    next_id = 1
    while queue:
        node_id, depth = queue.pop(0)
        is_leaf = depth >= max_depth or (depth > 0 and rng.random() < 0.25)
        columns["ids"].append(node_id)
        if is_leaf:
            columns["features"].append(0)
            columns["values"].append(0.0)
            columns["modes"].append("LEAF")
            columns["true"].append(0)
            columns["false"].append(0)
            columns["missing"].append(0)
            weights.extend((node_id, c, w) for c, w in leaf(rng))
        else:
            columns["features"].append(int(rng.integers(0, CRAFTED_WIDTH)))
            columns["values"].append(float(rng.choice(GRID)))
            columns["modes"].append(str(rng.choice(modes)))
            columns["true"].append(next_id)
            columns["false"].append(next_id + 1)
            columns["missing"].append(int(missing and rng.random() < 0.5))
            queue.append((next_id, depth + 1))
            queue.append((next_id + 1, depth + 1))
            next_id += 2
        nodes.append(node_id)
    return columns, weights


def crafted_model(rng, spec):
    kind = spec["kind"]
    modes = spec.get("modes", ["BRANCH_LEQ"])
    attrs = {
        k: []
        for k in (
            "nodes_treeids",
            "nodes_nodeids",
            "nodes_featureids",
            "nodes_values",
            "nodes_modes",
            "nodes_truenodeids",
            "nodes_falsenodeids",
            "nodes_missing_value_tracks_true",
        )
    }
    prefix = "class" if kind == "classifier" else "target"
    leaves = {f"{prefix}_{k}": [] for k in ("treeids", "nodeids", "ids", "weights")}
    per_tree = []
    for tree_id in range(spec.get("trees", 6)):
        columns, weights = random_tree(
            rng, tree_id, spec.get("depth", 4), modes, spec.get("missing", False), spec["leaf"]
        )
        per_tree.append((tree_id, columns, weights))
    if spec.get("split_runs"):
        # Tree 0's nodes in two runs around tree 1: onnxruntime counts a tree per run.
        (t0, c0, w0), (t1, c1, w1) = per_tree[0], per_tree[1]
        half = max(1, len(c0["ids"]) // 2)
        first = {k: v[:half] for k, v in c0.items()}
        second = {k: v[half:] for k, v in c0.items()}
        order = [(t0, first, w0), (t1, c1, w1), (t0, second, [])] + per_tree[2:]
    else:
        order = per_tree
    for tree_id, columns, weights in order:
        n = len(columns["ids"])
        attrs["nodes_treeids"] += [tree_id] * n
        attrs["nodes_nodeids"] += columns["ids"]
        attrs["nodes_featureids"] += columns["features"]
        attrs["nodes_values"] += columns["values"]
        attrs["nodes_modes"] += columns["modes"]
        attrs["nodes_truenodeids"] += columns["true"]
        attrs["nodes_falsenodeids"] += columns["false"]
        attrs["nodes_missing_value_tracks_true"] += columns["missing"]
        for node_id, c, w in weights:
            leaves[f"{prefix}_treeids"].append(tree_id)
            leaves[f"{prefix}_nodeids"].append(node_id)
            leaves[f"{prefix}_ids"].append(c)
            leaves[f"{prefix}_weights"].append(float(w))
    attrs.update(leaves)
    attrs["post_transform"] = spec.get("post", "NONE")
    if spec.get("base") is not None:
        attrs["base_values"] = [float(b) for b in spec["base"]]
    if kind == "classifier":
        n_out = spec["classes"]
        if spec.get("string_labels"):
            attrs["classlabels_strings"] = [f"class-{i}" for i in range(n_out)]
            label_type = TensorProto.STRING
        else:
            attrs["classlabels_int64s"] = list(range(10, 10 + n_out))
            label_type = TensorProto.INT64
        node = helper.make_node(
            "TreeEnsembleClassifier", ["X"], ["label", "probabilities"], domain="ai.onnx.ml", **attrs
        )
        outputs = [
            helper.make_tensor_value_info("label", label_type, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_out]),
        ]
        output = "probabilities"
    else:
        n_out = spec["targets"]
        attrs["n_targets"] = n_out
        attrs["aggregate_function"] = spec.get("aggregate", "SUM")
        node = helper.make_node("TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml", **attrs)
        outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n_out])]
        output = "Y"
    graph = helper.make_graph(
        [node],
        spec["name"],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, CRAFTED_WIDTH])],
        outputs,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    return model, output, n_out


def one(c, low=-1.0, high=1.0):
    return lambda rng: [(c, rng.uniform(low, high))]


def maybe(c, p, low=-1.0, high=1.0):
    return lambda rng: [(c, rng.uniform(low, high))] if rng.random() < p else []


def both(p1, low=-1.0, high=1.0):
    return lambda rng: [(0, rng.uniform(low, high))] + (
        [(1, rng.uniform(low, high))] if rng.random() < p1 else []
    )


def subset(n, low=-1.0, high=1.0):
    return lambda rng: [(c, rng.uniform(low, high)) for c in range(n) if rng.random() < 0.5]


def duplicated(low=-1.0, high=1.0):
    """One or two weights for target 0, sometimes none."""
    return lambda rng: [(0, rng.uniform(low, high)) for _ in range(int(rng.integers(0, 3)))]


LEQ = ["BRANCH_LEQ"]
LT = ["BRANCH_LT"]
GE_GT = ["BRANCH_GTE", "BRANCH_GT"]


def crafted_specs():
    c, r = "classifier", "regressor"
    return [
        # Binary, weights for class 0 only (skl2onnx's gradient boosting layout).
        dict(name="bin_c0_mixed_b1_logistic", kind=c, classes=2, leaf=one(0), base=[0.2], post="LOGISTIC", modes=LEQ, missing=True),
        dict(name="bin_c0_mixed_b0_none", kind=c, classes=2, leaf=one(0), base=None, post="NONE", modes=LT, missing=True),
        dict(name="bin_c0_mixed_b0_softmax", kind=c, classes=2, leaf=one(0), base=None, post="SOFTMAX", modes=ALL_MODES, missing=True),
        dict(name="bin_c0_positive_b0_none", kind=c, classes=2, leaf=one(0, 0.0, 0.3), base=None, post="NONE", modes=LEQ),
        dict(name="bin_c0_positive_b1_logistic", kind=c, classes=2, leaf=one(0, 0.0, 0.2), base=[0.1], post="LOGISTIC", modes=GE_GT, missing=True),
        dict(name="bin_c0_empty_leaves_b1_logistic", kind=c, classes=2, leaf=maybe(0, 0.7), base=[-0.3], post="LOGISTIC", modes=LEQ, missing=True),
        dict(name="bin_c0_mixed_b2_logistic", kind=c, classes=2, leaf=one(0), base=[0.1, 0.25], post="LOGISTIC", modes=ALL_MODES),
        dict(name="bin_c0_mixed_b2_probit", kind=c, classes=2, leaf=one(0, -0.1, 0.2), base=[0.3, 0.2], post="PROBIT", modes=LEQ),
        dict(name="bin_c0_mixed_b2_softmax_zero", kind=c, classes=2, leaf=maybe(0, 0.8), base=[0.1, 0.25], post="SOFTMAX_ZERO", modes=LEQ, missing=True),
        # Binary, weights for class 1 only.
        dict(name="bin_c1_mixed_b2_softmax", kind=c, classes=2, leaf=one(1), base=[0.1, 0.25], post="SOFTMAX", modes=LEQ, missing=True),
        dict(name="bin_c1_mixed_b1_none", kind=c, classes=2, leaf=one(1), base=[0.4], post="NONE", modes=LT),
        dict(name="bin_c1_empty_leaves_b0_logistic", kind=c, classes=2, leaf=maybe(1, 0.6), base=None, post="LOGISTIC", modes=ALL_MODES, missing=True),
        dict(name="bin_c1_positive_empty_leaves_b1_none", kind=c, classes=2, leaf=maybe(1, 0.6, 0.0, 0.3), base=[0.2], post="NONE", modes=LEQ),
        # Binary, weights for both classes.
        dict(name="bin_both_b0_logistic", kind=c, classes=2, leaf=both(0.6), base=None, post="LOGISTIC", modes=LEQ, missing=True),
        dict(name="bin_both_b0_softmax", kind=c, classes=2, leaf=both(0.6), base=None, post="SOFTMAX", modes=GE_GT),
        dict(name="bin_both_full_b1_softmax_zero", kind=c, classes=2, leaf=both(1.0), base=[0.5], post="SOFTMAX_ZERO", modes=ALL_MODES, missing=True),
        dict(name="bin_both_b2_none", kind=c, classes=2, leaf=both(0.5), base=[0.1, 0.25], post="NONE", modes=LT, missing=True),
        dict(name="bin_both_b2_probit", kind=c, classes=2, leaf=both(0.5, 0.0, 0.1), base=[0.2, 0.3], post="PROBIT", modes=LEQ),
        # Multiclass.
        dict(name="multi3_subset_b0_softmax_zero", kind=c, classes=3, leaf=subset(3), base=None, post="SOFTMAX_ZERO", modes=LEQ, missing=True),
        dict(name="multi3_subset_b3_logistic_strings", kind=c, classes=3, leaf=subset(3), base=[0.1, -0.2, 0.3], post="LOGISTIC", modes=ALL_MODES, missing=True, string_labels=True),
        dict(name="multi4_one_b4_softmax", kind=c, classes=4, leaf=lambda rng: [(int(rng.integers(0, 4)), rng.uniform(-1, 1))], base=[0.0, 0.1, 0.2, 0.3], post="SOFTMAX", modes=LT, missing=True, trees=12),
        dict(name="multi3_subset_b3_probit", kind=c, classes=3, leaf=subset(3, 0.0, 0.08), base=[0.3, 0.4, 0.5], post="PROBIT", modes=LEQ),
        dict(name="multi3_subset_b0_none", kind=c, classes=3, leaf=subset(3), base=None, post="NONE", modes=GE_GT, missing=True),
        # Regressors, one target.
        dict(name="reg1_sum_b1", kind=r, targets=1, leaf=one(0), base=[0.5], aggregate="SUM", post="NONE", modes=LEQ, missing=True),
        dict(name="reg1_sum_logistic_ignored", kind=r, targets=1, leaf=one(0), base=None, aggregate="SUM", post="LOGISTIC", modes=ALL_MODES, missing=True),
        dict(name="reg1_average_probit", kind=r, targets=1, leaf=one(0, 0.05, 0.95), base=None, aggregate="AVERAGE", post="PROBIT", modes=LEQ),
        dict(name="reg1_min_empty_leaves", kind=r, targets=1, leaf=maybe(0, 0.7), base=[0.1], aggregate="MIN", post="NONE", modes=LT, missing=True),
        dict(name="reg1_max_duplicates", kind=r, targets=1, leaf=duplicated(), base=None, aggregate="MAX", post="NONE", modes=GE_GT, missing=True),
        dict(name="reg1_sum_split_runs", kind=r, targets=1, leaf=one(0), base=None, aggregate="SUM", post="NONE", modes=LEQ, split_runs=True),
        dict(name="reg1_average_split_runs", kind=r, targets=1, leaf=one(0), base=[0.25], aggregate="AVERAGE", post="NONE", modes=LEQ, split_runs=True),
        # Regressors, several targets.
        dict(name="reg3_sum_b3_softmax", kind=r, targets=3, leaf=subset(3), base=[0.1, 0.2, 0.3], aggregate="SUM", post="SOFTMAX", modes=LEQ, missing=True),
        dict(name="reg2_average_logistic", kind=r, targets=2, leaf=subset(2), base=None, aggregate="AVERAGE", post="LOGISTIC", modes=ALL_MODES, missing=True),
        dict(name="reg2_average_b2", kind=r, targets=2, leaf=subset(2), base=[1.0, -1.0], aggregate="AVERAGE", post="NONE", modes=LT),
        dict(name="reg2_min_b2", kind=r, targets=2, leaf=subset(2), base=[0.1, 0.2], aggregate="MIN", post="NONE", modes=LEQ, missing=True),
        dict(name="reg2_max_softmax_zero", kind=r, targets=2, leaf=subset(2), base=None, aggregate="MAX", post="SOFTMAX_ZERO", modes=GE_GT),
        dict(name="reg2_sum_one_base_ignored", kind=r, targets=2, leaf=subset(2), base=[5.0], aggregate="SUM", post="NONE", modes=LEQ),
    ]


def crafted(rng, out_dir, n_rows):
    path = os.path.join(out_dir, "crafted")
    os.makedirs(path, exist_ok=True)
    rows = rng.uniform(-1.5, 1.5, size=(n_rows, CRAFTED_WIDTH)).astype(np.float32)
    pick = rng.random(rows.shape)
    rows[pick < 0.35] = rng.choice(GRID, size=int((pick < 0.35).sum()))
    rows[(pick >= 0.35) & (pick < 0.45)] = np.nan
    rows[(pick >= 0.45) & (pick < 0.48)] = np.inf
    rows[(pick >= 0.48) & (pick < 0.50)] = -np.inf
    rows.astype("<f4").tofile(os.path.join(path, "rows.f32"))
    listed = []
    for spec in crafted_specs():
        model, output, n_out = crafted_model(rng, spec)
        onnx.checker.check_model(model)
        onnx.save(model, os.path.join(path, spec["name"] + ".onnx"))
        sess = session(model.SerializeToString())
        scores = sess.run([output], {"X": rows})[0].astype("<f4")
        assert scores.shape == (n_rows, n_out), (spec["name"], scores.shape)
        scores.tofile(os.path.join(path, spec["name"] + ".f32"))
        listed.append({"name": spec["name"], "output": output, "outputs": n_out, "kind": spec["kind"]})
    return {"rows": n_rows, "width": CRAFTED_WIDTH, "models": listed}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()

    _ints_for_missing_tracks()
    os.makedirs(args.out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    trained = []
    split_values = {}
    for name, estimator, x, y in train(rng):
        estimator.fit(x, y)
        model, classifier, scores, outputs = export(name, estimator, args.out_dir)
        for feature, values in thresholds(model).items():
            split_values.setdefault(feature, []).extend(values)
        trained.append((name, model, classifier, scores, outputs))

    rows = test_rows(rng, args.rows, split_values)
    rows.astype("<f4").tofile(os.path.join(args.out_dir, "rows.f32"))

    listed = []
    for name, model, classifier, scores, outputs in trained:
        sess = session(model.SerializeToString())
        result = dict(zip(outputs, sess.run(outputs, {"features": rows})))
        values = result[scores].astype("<f4")
        if values.ndim == 1:
            values = values.reshape(-1, 1)
        values.tofile(os.path.join(args.out_dir, name, "ort_scores.f32"))
        entry = {
            "name": name,
            "dir": name,
            "kind": "classifier" if classifier else "regressor",
            "output": scores,
            "outputs": int(values.shape[1]),
        }
        if classifier:
            result["label"].astype("<i8").tofile(os.path.join(args.out_dir, name, "ort_labels.i64"))
        if not args.no_speed:
            entry["ort_rows_per_s"] = speed(sess, "features", [scores], rows, args.repeats)
            figures = ", ".join(f"batch {b}: {entry['ort_rows_per_s'][str(b)]:,.0f}" for b in BATCHES)
            print(f"onnxruntime {ort.__version__} 1 thread, {name}: {figures} rows/s", flush=True)
        listed.append(entry)

    manifest = {
        "onnxruntime": ort.__version__,
        "rows": args.rows,
        "width": WIDTH,
        "features": FEATURES,
        "models": listed,
        "crafted": crafted(rng, args.out_dir, 3000),
    }
    with open(os.path.join(args.out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {len(listed)} trained and {len(manifest['crafted']['models'])} hand-made models to {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
