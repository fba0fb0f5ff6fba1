//! augur's own `ai.onnx.ml` TreeEnsembleClassifier and TreeEnsembleRegressor for tract.
//!
//! tract 0.23 scores tree ensembles at a few thousand rows a second, refuses some
//! skl2onnx exports, and builds binary labels from an argmax taken before its
//! two-column layout. [`onnx`] returns tract's ONNX framework with these two ops
//! replaced by the ones below, which follow onnxruntime 1.20's CPU kernels, quirks
//! included (they were probed case by case against onnxruntime, and
//! `tests/trees.rs` compares the two on trained and on hand-made models):
//!
//! * Trees: each run of consecutive nodes sharing a tree id is one tree whose root is
//!   the run's first node (so a tree id split in two runs counts twice, as in
//!   onnxruntime). Children are looked up by (tree id, node id); a missing child, a
//!   repeated id or a cycle refuses the model.
//! * Comparisons are IEEE on f32 (inputs of another type are cast to f32): NaN takes
//!   the false branch, except BRANCH_NEQ (NaN
//!   differs from everything, so true) and nodes whose
//!   `nodes_missing_value_tracks_true` is 1, where NaN takes the true branch.
//! * Scores are summed in f32, tree by tree in model order. A class or target "has a
//!   score" for a row when a leaf reached by that row carries a weight for it; values
//!   without one are written as 0 whatever base value was added.
//! * Regressor with one target: every tree contributes its leaf's first weight (0 for
//!   a leaf without weight); SUM, AVERAGE (sum / trees), MIN or MAX, then plus
//!   `base_values[0]` when there is exactly one; of the post transforms only PROBIT
//!   applies. With several targets: only the weights present count, `base_values` is
//!   added when it has one value per target, and the post transform applies.
//! * Classifier with three classes or more: `base_values` is added (a class without a
//!   score takes its base value and then has one), then the post transform.
//! * Binary classifier (two labels): "binary case" when the weights name one class
//!   only. With two base values and a score for class 1, class 1 becomes
//!   `base[1] + score0` and class 0 its opposite (class 1's own weights are then
//!   ignored, as onnxruntime does); otherwise `base[0]` is added to class 0. When
//!   class 1 has no score and there are fewer than two base values, the single score
//!   `s` is spread over two columns: `[1 - s, s]` when every weight is positive in the
//!   binary case, `[σ(-s), σ(s)]` under LOGISTIC or `[-s, s]` otherwise (no other
//!   transform applies), and with no base value in the non-binary case too.
//!   Where onnxruntime leaves the second column unwritten (PROBIT with one score, or
//!   one score in the non-binary case with one base value) it is NaN here.
//! * LOGISTIC, SOFTMAX, SOFTMAX_ZERO (values within 1e-7 of zero stay near zero) and
//!   PROBIT (onnxruntime's approximation of erfinv, not the exact one) as onnxruntime
//!   computes them. PROBIT agrees within 1e-5 only for |p - 0.5| > 0.05 (results below
//!   ~0.13 in magnitude): nearer 0.5 the approximation cancels in f32 and onnxruntime's
//!   compiled code and this one round differently, by up to 1e-3 (see [`probit`]).
//! * Labels are the argmax of the probabilities output (first of equal maxima). augur
//!   never reads them; onnxruntime's own label rules differ only on ties.
//!
//! Not supported: `*_as_tensor` attributes in double precision (onnxruntime refuses
//! them for float inputs too), BRANCH_MEMBER and other later modes, classifiers with
//! fewer than two labels, inputs of rank other than 2.
//!
//! Evaluation: trees are flattened into one array of 16-byte nodes (feature and
//! comparison, threshold, both children) in depth-first order. Leaves point to
//! themselves, so a tree is walked with exactly its depth in branch-free steps. Blocks
//! of 16 rows go through a tree together (16 independent walks in flight); single rows
//! and the rows left over walk 8 trees at once. The comparison is chosen once per model:
//! all `<=`, `<=` or `>` (missing values tracked), `<`, `<` or `>=`, or any mix.

use std::fmt;
use std::sync::Arc;

use tract_hir::internal::*;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};

/// tract's ONNX framework with augur's TreeEnsembleClassifier and
/// TreeEnsembleRegressor in place of tract's.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert("TreeEnsembleClassifier", classifier_builder);
    onnx.op_register
        .insert("TreeEnsembleRegressor", regressor_builder);
    onnx
}

fn classifier_builder(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let forest = parse_classifier(node)
        .with_context(|| format!("TreeEnsembleClassifier {:?}", node.name))?;
    Ok((expand(TreeEnsemble::new(forest)), vec![]))
}

fn regressor_builder(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let forest =
        parse_regressor(node).with_context(|| format!("TreeEnsembleRegressor {:?}", node.name))?;
    Ok((expand(TreeEnsemble::new(forest)), vec![]))
}

// ---------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------

struct Attrs<'a>(&'a NodeProto);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        self.get(name).map(|a| a.ints.clone()).unwrap_or_default()
    }

    fn int(&self, name: &str) -> Option<i64> {
        self.get(name).map(|a| a.i)
    }

    fn string(&self, name: &str) -> TractResult<Option<String>> {
        self.get(name)
            .map(|a| {
                String::from_utf8(a.s.clone())
                    .with_context(|| format!("attribute {name} is not UTF-8"))
            })
            .transpose()
    }

    fn strings(&self, name: &str) -> TractResult<Vec<String>> {
        self.get(name)
            .map(|a| {
                a.strings
                    .iter()
                    .map(|s| {
                        String::from_utf8(s.clone())
                            .with_context(|| format!("attribute {name} is not UTF-8"))
                    })
                    .collect()
            })
            .unwrap_or_else(|| Ok(vec![]))
    }

    /// `name` (a list of floats) or `name_as_tensor` (a float tensor); empty when
    /// neither is there.
    fn floats(&self, name: &str) -> TractResult<Vec<f32>> {
        let tensor_name = format!("{name}_as_tensor");
        match (self.get(name), self.get(&tensor_name)) {
            (Some(_), Some(_)) => bail!("both {name} and {tensor_name} are set"),
            (Some(a), None) => Ok(a.floats.clone()),
            (None, Some(a)) => match &a.t {
                Some(t) => float_tensor(t).with_context(|| format!("attribute {tensor_name}")),
                None => bail!("attribute {tensor_name} holds no tensor"),
            },
            (None, None) => Ok(vec![]),
        }
    }
}

/// The values of a FLOAT tensor attribute (raw little-endian data or `float_data`).
fn float_tensor(t: &TensorProto) -> TractResult<Vec<f32>> {
    const FLOAT: i32 = 1;
    const DOUBLE: i32 = 11;
    match t.data_type {
        FLOAT => {}
        DOUBLE => bail!(
            "double-precision tree attributes are not supported (onnxruntime refuses them \
             for float inputs too)"
        ),
        other => bail!("expected a FLOAT tensor, found data type {other}"),
    }
    if !t.external_data.is_empty() {
        bail!("tensor attributes with external data are not supported");
    }
    if !t.raw_data.is_empty() {
        if t.raw_data.len() % 4 != 0 {
            bail!("raw float data of {} bytes", t.raw_data.len());
        }
        Ok(t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    } else {
        Ok(t.float_data.clone())
    }
}

// ---------------------------------------------------------------------------------
// Model description, as read from the attributes
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

fn parse_mode(s: &str) -> TractResult<Mode> {
    Ok(match s {
        "BRANCH_LEQ" => Mode::Leq,
        "BRANCH_LT" => Mode::Lt,
        "BRANCH_GTE" => Mode::Gte,
        "BRANCH_GT" => Mode::Gt,
        "BRANCH_EQ" => Mode::Eq,
        "BRANCH_NEQ" => Mode::Neq,
        "LEAF" => Mode::Leaf,
        other => bail!("unsupported node mode {other:?}"),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

fn parse_post_transform(s: Option<String>) -> TractResult<PostTransform> {
    Ok(match s.as_deref().unwrap_or("NONE") {
        "NONE" => PostTransform::None,
        "LOGISTIC" => PostTransform::Logistic,
        "SOFTMAX" => PostTransform::Softmax,
        "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
        "PROBIT" => PostTransform::Probit,
        other => bail!("unknown post_transform {other:?}"),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

fn parse_aggregate(s: Option<String>) -> TractResult<Aggregate> {
    Ok(match s.as_deref().unwrap_or("SUM") {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => bail!("unknown aggregate_function {other:?}"),
    })
}

/// Class labels of a classifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labels {
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

impl Labels {
    fn len(&self) -> usize {
        match self {
            Labels::Ints(v) => v.len(),
            Labels::Strings(v) => v.len(),
        }
    }
}

/// The node and leaf attributes common to both ops.
struct Description {
    tree_ids: Vec<i64>,
    node_ids: Vec<i64>,
    feature_ids: Vec<i64>,
    values: Vec<f32>,
    modes: Vec<Mode>,
    true_ids: Vec<i64>,
    false_ids: Vec<i64>,
    missing_tracks_true: Vec<i64>,
    leaf_tree_ids: Vec<i64>,
    leaf_node_ids: Vec<i64>,
    leaf_ids: Vec<i64>,
    leaf_weights: Vec<f32>,
}

fn parse_description(a: &Attrs, prefix: &str) -> TractResult<Description> {
    let modes = a
        .strings("nodes_modes")?
        .iter()
        .map(|s| parse_mode(s))
        .collect::<TractResult<Vec<_>>>()?;
    let d = Description {
        tree_ids: a.ints("nodes_treeids"),
        node_ids: a.ints("nodes_nodeids"),
        feature_ids: a.ints("nodes_featureids"),
        values: a.floats("nodes_values")?,
        modes,
        true_ids: a.ints("nodes_truenodeids"),
        false_ids: a.ints("nodes_falsenodeids"),
        missing_tracks_true: a.ints("nodes_missing_value_tracks_true"),
        leaf_tree_ids: a.ints(&format!("{prefix}_treeids")),
        leaf_node_ids: a.ints(&format!("{prefix}_nodeids")),
        leaf_ids: a.ints(&format!("{prefix}_ids")),
        leaf_weights: a.floats(&format!("{prefix}_weights"))?,
    };
    let n = d.tree_ids.len();
    for (name, len) in [
        ("nodes_nodeids", d.node_ids.len()),
        ("nodes_featureids", d.feature_ids.len()),
        ("nodes_values", d.values.len()),
        ("nodes_modes", d.modes.len()),
        ("nodes_truenodeids", d.true_ids.len()),
        ("nodes_falsenodeids", d.false_ids.len()),
    ] {
        if len != n {
            bail!("nodes_treeids has {n} entries but {name} has {len}");
        }
    }
    if !d.missing_tracks_true.is_empty() && d.missing_tracks_true.len() != n {
        bail!(
            "nodes_treeids has {n} entries but nodes_missing_value_tracks_true has {}",
            d.missing_tracks_true.len()
        );
    }
    let w = d.leaf_tree_ids.len();
    for (name, len) in [
        (format!("{prefix}_nodeids"), d.leaf_node_ids.len()),
        (format!("{prefix}_ids"), d.leaf_ids.len()),
        (format!("{prefix}_weights"), d.leaf_weights.len()),
    ] {
        if len != w {
            bail!("{prefix}_treeids has {w} entries but {name} has {len}");
        }
    }
    Ok(d)
}

fn parse_classifier(node: &NodeProto) -> TractResult<Forest> {
    let a = Attrs(node);
    let ints = a.ints("classlabels_int64s");
    let strings = a.strings("classlabels_strings")?;
    let labels = match (ints.is_empty(), strings.is_empty()) {
        (false, true) => Labels::Ints(ints),
        (true, false) => Labels::Strings(strings),
        (false, false) => bail!("both classlabels_int64s and classlabels_strings are set"),
        (true, true) => bail!("no class labels (classlabels_int64s or classlabels_strings)"),
    };
    let n_classes = labels.len();
    if n_classes < 2 {
        bail!("a classifier with {n_classes} class label is not supported");
    }
    let description = parse_description(&a, "class")?;
    let base = a.floats("base_values")?;
    let post = parse_post_transform(a.string("post_transform")?)?;
    let finalize = if n_classes == 2 {
        if base.len() > 2 {
            bail!("a binary classifier with {} base_values", base.len());
        }
        let mut classes: Vec<i64> = description.leaf_ids.clone();
        classes.sort_unstable();
        classes.dedup();
        Finalize::Binary {
            base,
            binary_case: classes.len() == 1,
            all_positive: description
                .leaf_weights
                .iter()
                .all(|w| w.is_nan() || *w >= 0.0),
            post,
        }
    } else {
        if !base.is_empty() && base.len() != n_classes {
            bail!("{} base_values for {n_classes} classes", base.len());
        }
        Finalize::Classes { base, post }
    };
    Forest::build(
        description,
        n_classes,
        Aggregate::Sum,
        false,
        finalize,
        Some(labels),
    )
}

fn parse_regressor(node: &NodeProto) -> TractResult<Forest> {
    let a = Attrs(node);
    let n_targets = a.int("n_targets").unwrap_or(1);
    if n_targets < 1 {
        bail!("n_targets is {n_targets}");
    }
    let n_targets = n_targets as usize;
    let description = parse_description(&a, "target")?;
    let base = a.floats("base_values")?;
    let post = parse_post_transform(a.string("post_transform")?)?;
    let aggregate = parse_aggregate(a.string("aggregate_function")?)?;
    let finalize = if n_targets == 1 {
        Finalize::OneTarget {
            aggregate,
            origin: if base.len() == 1 { base[0] } else { 0.0 },
            probit: post == PostTransform::Probit,
        }
    } else {
        Finalize::Targets {
            aggregate,
            base: if base.len() == n_targets {
                base
            } else {
                vec![]
            },
            post,
        }
    };
    Forest::build(
        description,
        n_targets,
        aggregate,
        n_targets == 1,
        finalize,
        None,
    )
}

// ---------------------------------------------------------------------------------
// The flattened forest
// ---------------------------------------------------------------------------------

/// Comparison codes, in the top three bits of [`Node::word`]. Every ONNX mode and
/// missing-value direction maps to one of these, children swapped where needed, so
/// that plain IEEE comparison sends NaN where onnxruntime does.
const OP_LEQ: u32 = 0;
const OP_GT: u32 = 1;
const OP_LT: u32 = 2;
const OP_GTE: u32 = 3;
const OP_EQ: u32 = 4;
/// Ordered and unequal: `x < t || x > t` (false for NaN).
const OP_ONEQ: u32 = 5;
const OP_SHIFT: u32 = 29;
const FEATURE_MASK: u32 = (1 << OP_SHIFT) - 1;

/// One node. A leaf has both children pointing to itself and holds its value (one
/// weight) or the index of its weight list (as bits) in `threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Node {
    /// Feature index in the low 29 bits, comparison code in the top 3.
    word: u32,
    threshold: f32,
    on_true: u32,
    on_false: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tree {
    root: u32,
    /// Longest root-to-leaf path, in branch nodes.
    depth: u32,
}

/// How leaves contribute.
#[derive(Clone, Debug, PartialEq)]
enum Leaves {
    /// Each leaf of tree `t` adds the value in its `threshold` to column `class[t]`;
    /// every tree contributes to its column on every row.
    PerTree { class: Vec<u32> },
    /// Leaves hold an index into `spans`, a range of `weights` (column, value).
    Lists {
        spans: Vec<(u32, u32)>,
        weights: Vec<(u32, f32)>,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Finalize {
    OneTarget {
        aggregate: Aggregate,
        origin: f32,
        probit: bool,
    },
    Targets {
        aggregate: Aggregate,
        base: Vec<f32>,
        post: PostTransform,
    },
    Classes {
        base: Vec<f32>,
        post: PostTransform,
    },
    Binary {
        base: Vec<f32>,
        binary_case: bool,
        all_positive: bool,
        post: PostTransform,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Leq,
    LeqGt,
    Lt,
    LtGte,
    Mixed,
}

/// A parsed, flattened tree ensemble.
#[derive(Clone, Debug, PartialEq)]
pub struct Forest {
    nodes: Vec<Node>,
    trees: Vec<Tree>,
    leaves: Leaves,
    aggregate: Aggregate,
    finalize: Finalize,
    kernel: Kernel,
    /// Number of output columns (classes or targets).
    outputs: usize,
    /// Input columns needed: the largest feature index used, plus one (at least 1).
    width: usize,
    /// Whether "has a score" must be tracked per row (else [`Forest::static_has`]).
    dynamic_has: bool,
    static_has: Vec<bool>,
    labels: Option<Labels>,
}

impl Forest {
    fn build(
        d: Description,
        outputs: usize,
        aggregate: Aggregate,
        one_target: bool,
        finalize: Finalize,
        labels: Option<Labels>,
    ) -> TractResult<Forest> {
        let n = d.tree_ids.len();
        if outputs > u32::MAX as usize {
            bail!("too many outputs");
        }
        if n >= (1 << 31) {
            bail!("too many nodes");
        }
        let mut by_id: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
        for i in 0..n {
            if by_id.insert((d.tree_ids[i], d.node_ids[i]), i).is_some() {
                bail!(
                    "node {} of tree {} appears twice",
                    d.node_ids[i],
                    d.tree_ids[i]
                );
            }
        }
        let child = |i: usize, id: i64, which: &str| -> TractResult<usize> {
            by_id.get(&(d.tree_ids[i], id)).copied().with_context(|| {
                format!(
                    "node {} of tree {} has {which} child {id}, which does not exist",
                    d.node_ids[i], d.tree_ids[i]
                )
            })
        };
        let is_leaf = |i: usize| d.modes[i] == Mode::Leaf;

        // Roots: the first node of each run of equal tree ids.
        let roots: Vec<usize> = (0..n)
            .filter(|&i| i == 0 || d.tree_ids[i] != d.tree_ids[i - 1])
            .collect();

        // Children of branch nodes, as positions.
        let mut kids = vec![(0usize, 0usize); n];
        for (i, kid) in kids.iter_mut().enumerate() {
            if !is_leaf(i) {
                *kid = (
                    child(i, d.true_ids[i], "true")?,
                    child(i, d.false_ids[i], "false")?,
                );
            }
        }

        // Depths, refusing cycles.
        let mut depth = vec![0u32; n];
        let mut state = vec![0u8; n]; // 0 new, 1 on the current path, 2 done
        let mut stack: Vec<(usize, bool)> = Vec::new();
        for &root in &roots {
            stack.push((root, false));
            while let Some((i, expanded)) = stack.pop() {
                if expanded {
                    depth[i] = 1 + depth[kids[i].0].max(depth[kids[i].1]);
                    state[i] = 2;
                    continue;
                }
                match state[i] {
                    2 => continue,
                    1 => bail!(
                        "tree {} has a cycle through node {}",
                        d.tree_ids[i],
                        d.node_ids[i]
                    ),
                    _ => {}
                }
                if is_leaf(i) {
                    state[i] = 2;
                    continue;
                }
                state[i] = 1;
                stack.push((i, true));
                stack.push((kids[i].1, false));
                stack.push((kids[i].0, false));
            }
        }

        // Leaf weights, in attribute order, by node position (weights on branch nodes
        // are never reached and are dropped).
        let mut leaf_weights: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for k in 0..d.leaf_tree_ids.len() {
            let i = by_id
                .get(&(d.leaf_tree_ids[k], d.leaf_node_ids[k]))
                .copied()
                .with_context(|| {
                    format!(
                        "a weight names node {} of tree {}, which does not exist",
                        d.leaf_node_ids[k], d.leaf_tree_ids[k]
                    )
                })?;
            let id = d.leaf_ids[k];
            if !one_target && (id < 0 || id as usize >= outputs) {
                bail!("a weight is for class or target {id}, out of 0..{outputs}");
            }
            leaf_weights[i].push((id.max(0) as u32, d.leaf_weights[k]));
        }

        // Layout: depth-first from each root, true child right after its parent.
        let mut new_index: Vec<u32> = vec![u32::MAX; n];
        let mut order: Vec<usize> = Vec::new();
        let mut trees = Vec::with_capacity(roots.len());
        let mut spans_of_trees = Vec::with_capacity(roots.len());
        let mut todo: Vec<usize> = Vec::new();
        // Whether some run reaches nodes laid out for an earlier one (a tree id in
        // two runs): then leaves are not attributed to a single tree.
        let mut shared = false;
        for &root in &roots {
            let start = order.len();
            todo.push(root);
            while let Some(i) = todo.pop() {
                if new_index[i] != u32::MAX {
                    shared |= (new_index[i] as usize) < start;
                    continue;
                }
                new_index[i] = order.len() as u32;
                order.push(i);
                if !is_leaf(i) {
                    todo.push(kids[i].1);
                    todo.push(kids[i].0);
                }
            }
            trees.push(Tree {
                root: new_index[root],
                depth: depth[root],
            });
            spans_of_trees.push(start..order.len());
        }

        // Which trees have, on every leaf, exactly one weight for one same column?
        // (With one target, every tree qualifies: a leaf gives its first weight or 0.)
        let mut tree_class: Vec<Option<u32>> = vec![None; roots.len()];
        let mut per_tree = !shared;
        if !one_target && per_tree {
            'trees: for (t, span) in spans_of_trees.iter().enumerate() {
                for &i in &order[span.clone()] {
                    if !is_leaf(i) {
                        continue;
                    }
                    match (leaf_weights[i].as_slice(), tree_class[t]) {
                        ([(class, _)], None) => tree_class[t] = Some(*class),
                        ([(class, _)], Some(c)) if *class == c => {}
                        _ => {
                            per_tree = false;
                            break 'trees;
                        }
                    }
                }
            }
        }

        // Nodes.
        let mut ops_used = [false; 6];
        let mut width = 1usize;
        let mut spans: Vec<(u32, u32)> = Vec::new();
        let mut weights: Vec<(u32, f32)> = Vec::new();
        let mut nodes = Vec::with_capacity(order.len());
        for (new, &i) in order.iter().enumerate() {
            let new = new as u32;
            if is_leaf(i) {
                let threshold = if one_target {
                    leaf_weights[i].first().map_or(0.0, |w| w.1)
                } else if per_tree {
                    leaf_weights[i][0].1
                } else {
                    let span = (weights.len() as u32, leaf_weights[i].len() as u32);
                    weights.extend_from_slice(&leaf_weights[i]);
                    spans.push(span);
                    f32::from_bits(spans.len() as u32 - 1)
                };
                nodes.push(Node {
                    word: 0,
                    threshold,
                    on_true: new,
                    on_false: new,
                });
                continue;
            }
            let feature = d.feature_ids[i];
            if feature < 0 || feature > FEATURE_MASK as i64 {
                bail!(
                    "node {} of tree {} uses feature {feature}",
                    d.node_ids[i],
                    d.tree_ids[i]
                );
            }
            width = width.max(feature as usize + 1);
            let nan_true = d.missing_tracks_true.get(i) == Some(&1);
            let (op, swap) = match (d.modes[i], nan_true) {
                (Mode::Leq, false) => (OP_LEQ, false),
                (Mode::Leq, true) => (OP_GT, true),
                (Mode::Lt, false) => (OP_LT, false),
                (Mode::Lt, true) => (OP_GTE, true),
                (Mode::Gte, false) => (OP_GTE, false),
                (Mode::Gte, true) => (OP_LT, true),
                (Mode::Gt, false) => (OP_GT, false),
                (Mode::Gt, true) => (OP_LEQ, true),
                (Mode::Eq, false) => (OP_EQ, false),
                (Mode::Eq, true) => (OP_ONEQ, true),
                (Mode::Neq, _) => (OP_EQ, true),
                (Mode::Leaf, _) => unreachable!(),
            };
            ops_used[op as usize] = true;
            let (t, f) = (new_index[kids[i].0], new_index[kids[i].1]);
            let (on_true, on_false) = if swap { (f, t) } else { (t, f) };
            nodes.push(Node {
                word: (op << OP_SHIFT) | feature as u32,
                threshold: d.values[i],
                on_true,
                on_false,
            });
        }
        let only = |allowed: &[u32]| {
            ops_used
                .iter()
                .enumerate()
                .all(|(op, used)| !used || allowed.contains(&(op as u32)))
        };
        let kernel = if only(&[OP_LEQ]) {
            Kernel::Leq
        } else if only(&[OP_LEQ, OP_GT]) {
            Kernel::LeqGt
        } else if only(&[OP_LT]) {
            Kernel::Lt
        } else if only(&[OP_LT, OP_GTE]) {
            Kernel::LtGte
        } else {
            Kernel::Mixed
        };

        let leaves = if one_target || per_tree {
            Leaves::PerTree {
                class: tree_class.iter().map(|c| c.unwrap_or(0)).collect(),
            }
        } else {
            Leaves::Lists { spans, weights }
        };
        let mut static_has = vec![false; outputs];
        if let Leaves::PerTree { class } = &leaves {
            for &c in class {
                static_has[c as usize] = true;
            }
        }
        let dynamic_has = matches!(leaves, Leaves::Lists { .. })
            || matches!(aggregate, Aggregate::Min | Aggregate::Max);
        let aggregate = if aggregate == Aggregate::Average {
            Aggregate::Sum // divided at the end
        } else {
            aggregate
        };
        Ok(Forest {
            nodes,
            trees,
            leaves,
            aggregate,
            finalize,
            kernel,
            outputs,
            width,
            dynamic_has,
            static_has,
            labels,
        })
    }

    /// Number of output columns.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Input columns the model reads (largest feature index plus one).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Scores `x` (row-major, `width` columns, `width >= self.width()`) into `out`
    /// (`rows × outputs`, zeroed).
    pub fn eval(&self, x: &[f32], width: usize, out: &mut [f32]) {
        assert!(width >= self.width, "input narrower than the model");
        let rows = x.len() / width;
        assert_eq!(out.len(), rows * self.outputs);
        match self.kernel {
            Kernel::Leq => self.eval_with::<Leq>(x, width, rows, out),
            Kernel::LeqGt => self.eval_with::<LeqGt>(x, width, rows, out),
            Kernel::Lt => self.eval_with::<Lt>(x, width, rows, out),
            Kernel::LtGte => self.eval_with::<LtGte>(x, width, rows, out),
            Kernel::Mixed => self.eval_with::<Mixed>(x, width, rows, out),
        }
    }

    fn eval_with<C: Compare>(&self, x: &[f32], width: usize, rows: usize, out: &mut [f32]) {
        const BLOCK: usize = 16;
        let k = self.outputs;
        let mut has = if self.dynamic_has {
            vec![false; BLOCK * k]
        } else {
            Vec::new()
        };
        let full = rows / BLOCK * BLOCK;
        for start in (0..full).step_by(BLOCK) {
            let xs = &x[start * width..(start + BLOCK) * width];
            let outs = &mut out[start * k..(start + BLOCK) * k];
            has.fill(false);
            self.block::<C, BLOCK>(xs, width, outs, &mut has);
            for r in 0..BLOCK {
                let has_row = if self.dynamic_has {
                    &mut has[r * k..(r + 1) * k]
                } else {
                    &mut []
                };
                self.finish(&mut outs[r * k..(r + 1) * k], has_row);
            }
        }
        for r in full..rows {
            let row = &x[r * width..(r + 1) * width];
            let out_row = &mut out[r * k..(r + 1) * k];
            let has_row = if self.dynamic_has {
                has[..k].fill(false);
                &mut has[..k]
            } else {
                &mut []
            };
            self.row::<C>(row, out_row, has_row);
            self.finish(out_row, has_row);
        }
    }

    /// `B` rows through each tree together.
    #[inline(never)]
    fn block<C: Compare, const B: usize>(
        &self,
        x: &[f32],
        width: usize,
        out: &mut [f32],
        has: &mut [bool],
    ) {
        let nodes = self.nodes.as_slice();
        let k = self.outputs;
        let mut at = [0u32; B];
        for (t, tree) in self.trees.iter().enumerate() {
            at.fill(tree.root);
            for _ in 0..tree.depth {
                for (r, a) in at.iter_mut().enumerate() {
                    *a = step::<C>(nodes, x, r * width, *a);
                }
            }
            match &self.leaves {
                Leaves::PerTree { class } if !self.dynamic_has => {
                    let c = class[t] as usize;
                    for (r, a) in at.iter().enumerate() {
                        out[r * k + c] += nodes[*a as usize].threshold;
                    }
                }
                _ => {
                    for (r, a) in at.iter().enumerate() {
                        self.add_leaf(
                            t,
                            *a,
                            &mut out[r * k..(r + 1) * k],
                            &mut has[r * k..(r + 1) * k],
                        );
                    }
                }
            }
        }
    }

    /// One row, walking up to 8 trees at once.
    fn row<C: Compare>(&self, x: &[f32], out: &mut [f32], has: &mut [bool]) {
        const LANES: usize = 8;
        let nodes = self.nodes.as_slice();
        let mut at = [0u32; LANES];
        for (chunk, trees) in self.trees.chunks(LANES).enumerate() {
            let lanes = &mut at[..trees.len()];
            let mut depth = 0;
            for (a, tree) in lanes.iter_mut().zip(trees) {
                *a = tree.root;
                depth = depth.max(tree.depth);
            }
            for _ in 0..depth {
                for a in lanes.iter_mut() {
                    *a = step::<C>(nodes, x, 0, *a);
                }
            }
            for (lane, a) in lanes.iter().enumerate() {
                let t = chunk * LANES + lane;
                match &self.leaves {
                    Leaves::PerTree { class } if !self.dynamic_has => {
                        out[class[t] as usize] += nodes[*a as usize].threshold;
                    }
                    _ => self.add_leaf(t, *a, out, has),
                }
            }
        }
    }

    /// Adds the leaf `at` of tree `t` to one row's scores, tracking which have one.
    #[inline]
    fn add_leaf(&self, t: usize, at: u32, out: &mut [f32], has: &mut [bool]) {
        let node = &self.nodes[at as usize];
        let mut add = |c: usize, w: f32| {
            let s = &mut out[c];
            match self.aggregate {
                Aggregate::Sum | Aggregate::Average => *s += w,
                Aggregate::Min => {
                    if !has[c] || w < *s {
                        *s = w
                    }
                }
                Aggregate::Max => {
                    if !has[c] || w > *s {
                        *s = w
                    }
                }
            }
            has[c] = true;
        };
        match &self.leaves {
            Leaves::PerTree { class } => add(class[t] as usize, node.threshold),
            Leaves::Lists { spans, weights } => {
                let (start, len) = spans[node.threshold.to_bits() as usize];
                for &(c, w) in &weights[start as usize..(start + len) as usize] {
                    add(c as usize, w);
                }
            }
        }
    }

    /// Turns one row's aggregated scores into the op's output, in place. `has` is
    /// the row's "has a score" flags when they are tracked, else empty.
    fn finish(&self, s: &mut [f32], has: &mut [bool]) {
        if self.dynamic_has {
            finalize(&self.finalize, self.trees.len(), s, has);
        } else if self.outputs <= 8 {
            let mut local = [false; 8];
            let has = &mut local[..self.outputs];
            has.copy_from_slice(&self.static_has);
            finalize(&self.finalize, self.trees.len(), s, has);
        } else {
            let mut has = self.static_has.clone();
            finalize(&self.finalize, self.trees.len(), s, &mut has);
        }
    }
}

/// onnxruntime's finalization of one row: base values, aggregation, post transform.
fn finalize(f: &Finalize, n_trees: usize, s: &mut [f32], has: &mut [bool]) {
    match f {
        Finalize::OneTarget {
            aggregate,
            origin,
            probit: use_probit,
        } => {
            let mut v = s[0];
            v = match aggregate {
                Aggregate::Sum => v + origin,
                Aggregate::Average => v / n_trees as f32 + origin,
                Aggregate::Min | Aggregate::Max => {
                    if has[0] {
                        v + origin
                    } else {
                        *origin
                    }
                }
            };
            s[0] = if *use_probit { probit(v) } else { v };
        }
        Finalize::Targets {
            aggregate,
            base,
            post,
        } => {
            for j in 0..s.len() {
                let b = base.get(j).copied();
                s[j] = match aggregate {
                    Aggregate::Sum => s[j] + b.unwrap_or(0.0),
                    Aggregate::Average => match b {
                        Some(b) => s[j] / n_trees as f32 + b,
                        None => s[j] / n_trees as f32,
                    },
                    Aggregate::Min | Aggregate::Max => {
                        b.unwrap_or(0.0) + if has[j] { s[j] } else { 0.0 }
                    }
                };
            }
            values(s, has);
            transform(*post, s);
        }
        Finalize::Classes { base, post } => {
            for (j, b) in base.iter().enumerate() {
                if has[j] {
                    s[j] += b;
                } else {
                    s[j] = *b;
                    has[j] = true;
                }
            }
            values(s, has);
            transform(*post, s);
        }
        Finalize::Binary {
            base,
            binary_case,
            all_positive,
            post,
        } => binary(base, *binary_case, *all_positive, *post, s, has),
    }
}

/// Scores without a value read as 0.
fn values(s: &mut [f32], has: &[bool]) {
    for (v, h) in s.iter_mut().zip(has) {
        if !h {
            *v = 0.0;
        }
    }
}

fn binary(
    base: &[f32],
    binary_case: bool,
    all_positive: bool,
    post: PostTransform,
    s: &mut [f32],
    has: &mut [bool],
) {
    // How a single score is spread over two columns, when it is.
    #[derive(PartialEq)]
    enum Spread {
        Undefined,
        Complement,
        Opposite,
    }
    let spread = if binary_case {
        if all_positive {
            Spread::Complement
        } else {
            Spread::Opposite
        }
    } else if base.is_empty() {
        Spread::Opposite
    } else {
        Spread::Undefined
    };
    let mut single = false;
    match base.len() {
        2 => {
            if has[1] {
                s[1] = base[1] + s[0];
                s[0] = -s[1];
            } else {
                s[0] += base[0];
                s[1] += base[1];
            }
        }
        1 => {
            s[0] += base[0];
            single = !has[1];
        }
        _ => single = !has[1],
    }
    if !single {
        values(s, has);
        transform(post, s);
        return;
    }
    let v = if has[0] { s[0] } else { 0.0 };
    if post == PostTransform::Probit {
        s[0] = probit(v);
        s[1] = f32::NAN;
        return;
    }
    match spread {
        Spread::Complement => {
            s[0] = 1.0 - v;
            s[1] = v;
        }
        Spread::Opposite if post == PostTransform::Logistic => {
            s[0] = logistic(-v);
            s[1] = logistic(v);
        }
        Spread::Opposite => {
            s[0] = -v;
            s[1] = v;
        }
        Spread::Undefined => {
            s[0] = v;
            s[1] = f32::NAN;
        }
    }
}

fn transform(post: PostTransform, v: &mut [f32]) {
    match post {
        PostTransform::None => {}
        PostTransform::Logistic => v.iter_mut().for_each(|x| *x = logistic(*x)),
        PostTransform::Probit => v.iter_mut().for_each(|x| *x = probit(*x)),
        PostTransform::Softmax => {
            let max = v.iter().fold(-f32::MAX, |m, &x| if x > m { x } else { m });
            let mut sum = 0.0f32;
            for x in v.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            v.iter_mut().for_each(|x| *x /= sum);
        }
        PostTransform::SoftmaxZero => {
            let max = v.iter().fold(-f32::MAX, |m, &x| if x > m { x } else { m });
            let scale = (-max).exp();
            let mut sum = 0.0f32;
            for x in v.iter_mut() {
                if *x > 1e-7 || *x < -1e-7 {
                    *x = (*x - max).exp();
                    sum += *x;
                } else {
                    *x *= scale;
                }
            }
            v.iter_mut().for_each(|x| *x /= sum);
        }
    }
}

/// The logistic function, computed as onnxruntime does (on |x|, then reflected).
pub fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 {
        1.0 - v
    } else {
        v
    }
}

/// onnxruntime's PROBIT: √2 · erfinv(2p − 1), with erfinv by Winitzki's closed-form
/// approximation (a = 0.147), so results differ from the exact inverse by ~1e-4.
/// The constants are onnxruntime's (3.14159, not π).
#[allow(clippy::approx_constant)]
pub fn probit(p: f32) -> f32 {
    let x = 2.0 * p - 1.0;
    let sign = if x < 0.0 { -1.0f32 } else { 1.0 };
    let w = (1.0 - x) * (1.0 + x);
    let ln = w.ln();
    let a = 0.147f32;
    let u = 2.0 / (3.14159f32 * a) + 0.5 * ln;
    let v = 1.0 / a * ln;
    // Near p = 0.5, `-u + sqrt(u² - v)` cancels catastrophically in f32 and the last
    // bits of log and sqrt decide the result: onnxruntime's build and this code agree
    // within 1e-5 for |p - 0.5| > 0.05 and may differ by up to 1e-3 closer to 0.5 (where
    // both are quantized far from the exact probit). A fused u² - v matched
    // onnxruntime on more of the points probed than the plain expression.
    let r = -u + u.mul_add(u, -v).sqrt();
    std::f32::consts::SQRT_2 * (sign * r.sqrt())
}

/// Where one comparison sends a value.
trait Compare {
    fn go_true(word: u32, v: f32, threshold: f32) -> bool;
}

struct Leq;
struct LeqGt;
struct Lt;
struct LtGte;
struct Mixed;

impl Compare for Leq {
    #[inline(always)]
    fn go_true(_: u32, v: f32, t: f32) -> bool {
        v <= t
    }
}

impl Compare for LeqGt {
    #[inline(always)]
    fn go_true(word: u32, v: f32, t: f32) -> bool {
        let gt = word >> OP_SHIFT == OP_GT;
        (gt & (v > t)) | (!gt & (v <= t))
    }
}

impl Compare for Lt {
    #[inline(always)]
    fn go_true(_: u32, v: f32, t: f32) -> bool {
        v < t
    }
}

impl Compare for LtGte {
    #[inline(always)]
    fn go_true(word: u32, v: f32, t: f32) -> bool {
        let gte = word >> OP_SHIFT == OP_GTE;
        (gte & (v >= t)) | (!gte & (v < t))
    }
}

impl Compare for Mixed {
    #[inline(always)]
    fn go_true(word: u32, v: f32, t: f32) -> bool {
        match word >> OP_SHIFT {
            OP_LEQ => v <= t,
            OP_GT => v > t,
            OP_LT => v < t,
            OP_GTE => v >= t,
            OP_EQ => v == t,
            // Ordered and unequal (false for NaN, unlike `v != t`).
            _ => (v < t) | (v > t),
        }
    }
}

#[inline(always)]
fn step<C: Compare>(nodes: &[Node], x: &[f32], row: usize, at: u32) -> u32 {
    let node = &nodes[at as usize];
    let v = x[row + (node.word & FEATURE_MASK) as usize];
    if C::go_true(node.word, v, node.threshold) {
        node.on_true
    } else {
        node.on_false
    }
}

// ---------------------------------------------------------------------------------
// tract ops
// ---------------------------------------------------------------------------------

/// The inference-time op: shape rules, then wired as [`TreeScores`] (and
/// [`TreeLabels`] for a classifier's label output).
#[derive(Clone, Debug)]
pub struct TreeEnsemble {
    forest: Arc<Forest>,
}

impl TreeEnsemble {
    fn new(forest: Forest) -> TreeEnsemble {
        TreeEnsemble {
            forest: Arc::new(forest),
        }
    }
}

impl Expansion for TreeEnsemble {
    fn name(&self) -> StaticName {
        if self.forest.labels.is_some() {
            "AugurTreeEnsembleClassifier".into()
        } else {
            "AugurTreeEnsembleRegressor".into()
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.forest.summary()])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.forest.labels.is_some() { 2 } else { 1 })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        let scores = match &self.forest.labels {
            Some(labels) => {
                check_output_arity(outputs, 2)?;
                let dt = match labels {
                    Labels::Ints(_) => i64::datum_type(),
                    Labels::Strings(_) => String::datum_type(),
                };
                s.equals(&outputs[0].datum_type, dt)?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                &outputs[1]
            }
            None => {
                check_output_arity(outputs, 1)?;
                &outputs[0]
            }
        };
        s.equals(&scores.datum_type, f32::datum_type())?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], self.forest.outputs.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let scores = model.wire_node(
            format!("{prefix}.scores"),
            TreeScores {
                forest: self.forest.clone(),
            },
            inputs,
        )?[0];
        match &self.forest.labels {
            Some(labels) => {
                let labels = model.wire_node(
                    format!("{prefix}.labels"),
                    TreeLabels {
                        labels: labels.clone(),
                    },
                    &[scores],
                )?[0];
                Ok(tvec!(labels, scores))
            }
            None => Ok(tvec!(scores)),
        }
    }
}

impl Forest {
    fn summary(&self) -> String {
        format!(
            "{} trees, {} nodes, {} outputs, kernel {:?}, leaves {}",
            self.trees.len(),
            self.nodes.len(),
            self.outputs,
            self.kernel,
            match self.leaves {
                Leaves::PerTree { .. } => "one weight each",
                Leaves::Lists { .. } => "weight lists",
            }
        )
    }
}

/// Scores (probabilities for a classifier): f32 `[N, outputs]`.
#[derive(Clone)]
pub struct TreeScores {
    forest: Arc<Forest>,
}

impl fmt::Debug for TreeScores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeScores({})", self.forest.summary())
    }
}

impl PartialEq for TreeScores {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.forest, &other.forest)
    }
}
impl Eq for TreeScores {}

impl Op for TreeScores {
    fn name(&self) -> StaticName {
        "AugurTreeScores".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.forest.summary()])
    }

    op_as_typed_op!();
}

impl EvalOp for TreeScores {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let shape = input.shape();
        if shape.len() != 2 {
            bail!("tree ensemble input must be [N, features], got {shape:?}");
        }
        let (rows, width) = (shape[0], shape[1]);
        if width < self.forest.width {
            bail!(
                "tree ensemble reads feature {} but its input has {width} columns",
                self.forest.width - 1
            );
        }
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(&[rows, self.forest.outputs])?;
        if rows > 0 {
            let mut out_view = out.try_as_plain_ram_mut()?;
            self.forest.eval(x, width, out_view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TreeScores {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        if shape.rank() != 2 {
            bail!("tree ensemble input must be [N, features], got {shape:?}");
        }
        if let Ok(width) = shape[1].to_usize() {
            if width < self.forest.width {
                bail!(
                    "tree ensemble reads feature {} but its input has {width} columns",
                    self.forest.width - 1
                );
            }
        }
        Ok(tvec!(f32::fact([
            shape[0].clone(),
            self.forest.outputs.to_dim()
        ])))
    }

    as_op!();
}

/// A classifier's labels: the label of each row's largest probability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeLabels {
    labels: Labels,
}

impl Op for TreeLabels {
    fn name(&self) -> StaticName {
        "AugurTreeLabels".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TreeLabels {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let scores = args_1!(inputs);
        let shape = scores.shape();
        let (rows, k) = (shape[0], shape[1]);
        let view = scores.try_as_plain_ram()?;
        let p = view.as_slice::<f32>()?;
        let best = (0..rows).map(|r| argmax(&p[r * k..(r + 1) * k]));
        let tensor = match &self.labels {
            Labels::Ints(labels) => {
                let v: Vec<i64> = best.map(|j| labels[j]).collect();
                Tensor::from_shape(&[rows], &v)?
            }
            Labels::Strings(labels) => {
                let v: Vec<String> = best.map(|j| labels[j].clone()).collect();
                tract_ndarray::Array1::from_vec(v).into_tensor()
            }
        };
        Ok(tvec!(tensor.into_tvalue()))
    }
}

impl TypedOp for TreeLabels {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let rows = inputs[0].shape[0].clone();
        Ok(tvec!(match self.labels {
            Labels::Ints(_) => i64::fact([rows]),
            Labels::Strings(_) => String::fact([rows]),
        }))
    }

    as_op!();
}

/// Index of the first largest value (NaN never wins).
pub fn argmax(p: &[f32]) -> usize {
    let mut best = 0;
    for j in 1..p.len() {
        if p[j] > p[best] || p[best].is_nan() && !p[j].is_nan() {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests;
