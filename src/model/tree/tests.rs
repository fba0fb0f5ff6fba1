//! Parsing and semantics of augur's tree-ensemble ops. Expected values come from the
//! ONNX-ML operator definitions (comparisons) or, where onnxruntime's behaviour is
//! what defines them (binary layouts, aggregates, PROBIT), from onnxruntime 1.20.1
//! outputs on the same hand-made models; `tests/trees.rs` checks against a live
//! onnxruntime on many more.

// Expected values are onnxruntime's f32 outputs, printed to more digits than f32 holds.
#![allow(clippy::excessive_precision)]

use super::*;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{
    type_proto, GraphProto, ModelProto, OperatorSetIdProto, TypeProto, ValueInfoProto,
};

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: AttributeType::Ints as i32,
        ..Default::default()
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        floats: v.to_vec(),
        r#type: AttributeType::Floats as i32,
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    }
}

fn string(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: s.as_bytes().to_vec(),
        r#type: AttributeType::String as i32,
        ..Default::default()
    }
}

fn strings(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        r#type: AttributeType::Strings as i32,
        ..Default::default()
    }
}

fn tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        t: Some(t),
        r#type: AttributeType::Tensor as i32,
        ..Default::default()
    }
}

fn node(op: &str, attributes: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        domain: "ai.onnx.ml".into(),
        attribute: attributes,
        ..Default::default()
    }
}

/// Nodes of trees given as rows (tree, node, feature, value, mode, true, false, missing).
type Row = (i64, i64, i64, f32, &'static str, i64, i64, i64);

fn tree_attributes(rows: &[Row]) -> Vec<AttributeProto> {
    vec![
        ints(
            "nodes_treeids",
            &rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ),
        ints(
            "nodes_nodeids",
            &rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        ),
        ints(
            "nodes_featureids",
            &rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ),
        floats(
            "nodes_values",
            &rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        ),
        strings("nodes_modes", &rows.iter().map(|r| r.4).collect::<Vec<_>>()),
        ints(
            "nodes_truenodeids",
            &rows.iter().map(|r| r.5).collect::<Vec<_>>(),
        ),
        ints(
            "nodes_falsenodeids",
            &rows.iter().map(|r| r.6).collect::<Vec<_>>(),
        ),
        ints(
            "nodes_missing_value_tracks_true",
            &rows.iter().map(|r| r.7).collect::<Vec<_>>(),
        ),
    ]
}

/// Leaf weights as (tree, node, class or target, weight).
fn weight_attributes(prefix: &str, weights: &[(i64, i64, i64, f32)]) -> Vec<AttributeProto> {
    vec![
        ints(
            &format!("{prefix}_treeids"),
            &weights.iter().map(|w| w.0).collect::<Vec<_>>(),
        ),
        ints(
            &format!("{prefix}_nodeids"),
            &weights.iter().map(|w| w.1).collect::<Vec<_>>(),
        ),
        ints(
            &format!("{prefix}_ids"),
            &weights.iter().map(|w| w.2).collect::<Vec<_>>(),
        ),
        floats(
            &format!("{prefix}_weights"),
            &weights.iter().map(|w| w.3).collect::<Vec<_>>(),
        ),
    ]
}

/// One stump on feature 0: node 0 compares, leaf 1 (true) and leaf 2 (false).
fn stump(mode: &'static str, threshold: f32, missing: i64) -> Vec<Row> {
    vec![
        (0, 0, 0, threshold, mode, 1, 2, missing),
        (0, 1, 0, 0.0, "LEAF", 0, 0, 0),
        (0, 2, 0, 0.0, "LEAF", 0, 0, 0),
    ]
}

fn regressor(
    rows: &[Row],
    weights: &[(i64, i64, i64, f32)],
    targets: i64,
    extra: Vec<AttributeProto>,
) -> Forest {
    let mut a = tree_attributes(rows);
    a.extend(weight_attributes("target", weights));
    a.push(int("n_targets", targets));
    a.extend(extra);
    parse_regressor(&node("TreeEnsembleRegressor", a)).unwrap()
}

fn classifier(
    rows: &[Row],
    weights: &[(i64, i64, i64, f32)],
    classes: usize,
    extra: Vec<AttributeProto>,
) -> TractResult<Forest> {
    let mut a = tree_attributes(rows);
    a.extend(weight_attributes("class", weights));
    a.push(ints(
        "classlabels_int64s",
        &(0..classes as i64).collect::<Vec<_>>(),
    ));
    a.extend(extra);
    parse_classifier(&node("TreeEnsembleClassifier", a))
}

/// Scores rows of `width` values: the batched path, checked against row by row.
fn eval(forest: &Forest, x: &[f32], width: usize) -> Vec<f32> {
    let n = x.len() / width;
    let mut out = vec![0.0; n * forest.outputs()];
    forest.eval(x, width, &mut out);
    let mut single = Vec::new();
    for row in x.chunks_exact(width) {
        let mut o = vec![0.0; forest.outputs()];
        forest.eval(row, width, &mut o);
        single.extend(o);
    }
    for (a, b) in out.iter().zip(&single) {
        assert!(
            a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(),
            "{out:?} vs {single:?}"
        );
    }
    out
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (a, b) in got.iter().zip(want) {
        assert!(
            a == b || a.is_nan() && b.is_nan() || (a - b).abs() <= 1e-6,
            "got {got:?}, want {want:?}"
        );
    }
}

const INPUTS: [f32; 6] = [0.0, 0.5, 1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

#[test]
fn every_mode_and_missing_track_follows_the_spec() {
    let modes = [
        "BRANCH_LEQ",
        "BRANCH_LT",
        "BRANCH_GTE",
        "BRANCH_GT",
        "BRANCH_EQ",
        "BRANCH_NEQ",
    ];
    for mode in modes {
        for missing in [0, 1] {
            let f = regressor(
                &stump(mode, 0.5, missing),
                &[(0, 1, 0, 1.0), (0, 2, 0, 2.0)],
                1,
                vec![],
            );
            let got = eval(&f, &INPUTS, 1);
            for (x, y) in INPUTS.iter().zip(&got) {
                let t = 0.5;
                let goes_true = match mode {
                    "BRANCH_LEQ" => *x <= t,
                    "BRANCH_LT" => *x < t,
                    "BRANCH_GTE" => *x >= t,
                    "BRANCH_GT" => *x > t,
                    "BRANCH_EQ" => *x == t,
                    _ => *x != t,
                } || (missing == 1 && x.is_nan());
                let want = if goes_true { 1.0 } else { 2.0 };
                assert_eq!(*y, want, "{mode} missing={missing} x={x}");
            }
        }
    }
}

#[test]
fn the_comparison_kernel_is_chosen_from_the_modes_used() {
    let kernel =
        |mode, missing| regressor(&stump(mode, 0.5, missing), &[(0, 1, 0, 1.0)], 1, vec![]).kernel;
    assert_eq!(kernel("BRANCH_LEQ", 0), Kernel::Leq);
    assert_eq!(kernel("BRANCH_LEQ", 1), Kernel::LeqGt);
    assert_eq!(kernel("BRANCH_GT", 0), Kernel::LeqGt);
    assert_eq!(kernel("BRANCH_LT", 0), Kernel::Lt);
    assert_eq!(kernel("BRANCH_LT", 1), Kernel::LtGte);
    assert_eq!(kernel("BRANCH_GTE", 0), Kernel::LtGte);
    assert_eq!(kernel("BRANCH_EQ", 0), Kernel::Mixed);
    assert_eq!(kernel("BRANCH_NEQ", 1), Kernel::Mixed);
}

/// A small deterministic generator for random trees.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

/// The ONNX-ML semantics, walked naively over the attribute rows.
fn reference(rows: &[Row], weights: &[(i64, i64, i64, f32)], x: &[f32]) -> f32 {
    let find = |tree: i64, id: i64| rows.iter().position(|r| r.0 == tree && r.1 == id).unwrap();
    let mut sum = 0.0f32;
    for (i, r) in rows.iter().enumerate() {
        if i > 0 && rows[i - 1].0 == r.0 {
            continue; // not the first node of a tree
        }
        let mut at = i;
        while rows[at].4 != "LEAF" {
            let (tree, _, feature, t, mode, yes, no, missing) = rows[at];
            let v = x[feature as usize];
            let go = match mode {
                "BRANCH_LEQ" => v <= t,
                "BRANCH_LT" => v < t,
                "BRANCH_GTE" => v >= t,
                "BRANCH_GT" => v > t,
                "BRANCH_EQ" => v == t,
                _ => v != t,
            } || (missing == 1 && v.is_nan());
            at = find(tree, if go { yes } else { no });
        }
        let (tree, id) = (rows[at].0, rows[at].1);
        sum += weights
            .iter()
            .find(|w| w.0 == tree && w.1 == id)
            .map_or(0.0, |w| w.3);
    }
    sum
}

#[test]
fn random_forests_match_a_naive_walk_in_both_evaluation_paths() {
    let modes = [
        "BRANCH_LEQ",
        "BRANCH_LT",
        "BRANCH_GTE",
        "BRANCH_GT",
        "BRANCH_EQ",
        "BRANCH_NEQ",
    ];
    let grid = [-1.0f32, -0.5, 0.0, 0.5, 1.0];
    for seed in 0..12u64 {
        let mut rng = Lcg(seed + 1);
        // Some forests use one mode, some all; some track missing values.
        let allowed: &[&str] = match seed % 4 {
            0 => &modes[..1],
            1 => &modes[1..2],
            2 => &modes[2..4],
            _ => &modes,
        };
        let track = seed % 3 != 0;
        let mut rows: Vec<Row> = Vec::new();
        let mut weights = Vec::new();
        for tree in 0..(5 + seed as i64 * 3) {
            // Breadth-first ids, random depth up to 6.
            let mut queue = vec![(0i64, 0u32)];
            let mut next_id = 1;
            while !queue.is_empty() {
                let (id, depth) = queue.remove(0);
                if depth >= 6 || (depth > 0 && rng.below(4) == 0) {
                    rows.push((tree, id, 0, 0.0, "LEAF", 0, 0, 0));
                    weights.push((tree, id, 0, rng.unit() * 2.0 - 1.0));
                } else {
                    let mode = allowed[rng.below(allowed.len() as u64) as usize];
                    let missing = i64::from(track && rng.below(2) == 0);
                    let feature = rng.below(5) as i64;
                    let t = grid[rng.below(5) as usize];
                    rows.push((tree, id, feature, t, mode, next_id, next_id + 1, missing));
                    queue.push((next_id, depth + 1));
                    queue.push((next_id + 1, depth + 1));
                    next_id += 2;
                }
            }
        }
        let forest = regressor(&rows, &weights, 1, vec![]);
        assert!(matches!(forest.leaves, Leaves::PerTree { .. }));
        // 37 rows: two blocks of 16 and five single rows.
        let x: Vec<f32> = (0..37 * 6)
            .map(|_| match rng.below(10) {
                0..=4 => grid[rng.below(5) as usize],
                5 => f32::NAN,
                6 => f32::INFINITY,
                _ => rng.unit() * 3.0 - 1.5,
            })
            .collect();
        let got = eval(&forest, &x, 6);
        for (i, row) in x.chunks_exact(6).enumerate() {
            assert_eq!(
                got[i],
                reference(&rows, &weights, row),
                "seed {seed} row {i}"
            );
        }
    }
}

#[test]
fn binary_layouts_follow_onnxruntime() {
    // Stump on x <= 0.5; inputs 0 (leaf 1) and 1 (leaf 2). Expected values are
    // onnxruntime 1.20.1's outputs for these models.
    let x = [0.0f32, 1.0];
    let case = |weights: &[(i64, i64, i64, f32)], base: &[f32], post: &str| {
        let mut extra = vec![string("post_transform", post)];
        if !base.is_empty() {
            extra.push(floats("base_values", base));
        }
        let f = classifier(&stump("BRANCH_LEQ", 0.5, 0), weights, 2, extra).unwrap();
        eval(&f, &x, 1)
    };
    let c0_mixed = [(0, 1, 0, 0.3), (0, 2, 0, -0.7)];
    let c0_positive = [(0, 1, 0, 0.3), (0, 2, 0, 0.9)];
    let c1_mixed = [(0, 1, 1, 0.3), (0, 2, 1, -0.7)];
    let both = [
        (0, 1, 0, 0.3),
        (0, 1, 1, 0.2),
        (0, 2, 0, -0.7),
        (0, 2, 1, 0.4),
    ];

    // Weights for class 0 only, one score: [-s, s], or [σ(-s), σ(s)] under LOGISTIC;
    // SOFTMAX does not apply.
    close(&case(&c0_mixed, &[], "NONE"), &[-0.3, 0.3, 0.7, -0.7]);
    close(
        &case(&c0_mixed, &[], "LOGISTIC"),
        &[0.42555749, 0.57444251, 0.66818774, 0.33181226],
    );
    close(&case(&c0_mixed, &[0.1], "SOFTMAX"), &[-0.4, 0.4, 0.6, -0.6]);
    // All weights positive: [1 - s, s], whatever the transform.
    close(&case(&c0_positive, &[], "LOGISTIC"), &[0.7, 0.3, 0.1, 0.9]);
    close(&case(&c0_positive, &[0.1], "NONE"), &[0.6, 0.4, 0.0, 1.0]);
    // Two base values, class 1 without score: class 0 gets base[0], class 1 reads 0.
    close(
        &case(&c0_mixed, &[0.1, 0.25], "NONE"),
        &[0.4, 0.0, -0.6, 0.0],
    );
    close(
        &case(&c0_mixed, &[0.1, 0.25], "SOFTMAX"),
        &[0.59868765, 0.40131232, 0.35434371, 0.64565629],
    );
    close(
        &case(&c0_mixed, &[0.1, 0.25], "SOFTMAX_ZERO"),
        &[1.0, 0.0, 1.0, 0.0],
    );
    // Class 1 only: class 0 has no score and reads 0.
    close(&case(&c1_mixed, &[], "NONE"), &[0.0, 0.3, 0.0, -0.7]);
    close(
        &case(&c1_mixed, &[0.1], "LOGISTIC"),
        &[0.5, 0.57444251, 0.5, 0.33181226],
    );
    // Two base values with a class-1 score: class 1 = base[1] + score0, class 0 its
    // opposite (and reads 0 here, having no score of its own).
    close(
        &case(&c1_mixed, &[0.1, 0.25], "NONE"),
        &[0.0, 0.25, 0.0, 0.25],
    );
    close(
        &case(&both, &[0.1, 0.25], "NONE"),
        &[-0.55, 0.55, 0.45, -0.45],
    );
    // Both classes, fewer base values: plain two-class scores.
    close(&case(&both, &[0.1], "NONE"), &[0.4, 0.2, -0.6, 0.4]);
    close(
        &case(&both, &[], "SOFTMAX"),
        &[0.52497919, 0.47502081, 0.24973989, 0.75026011],
    );
}

#[test]
fn binary_outputs_onnxruntime_leaves_unwritten_are_nan() {
    // Weights for both classes, class 1 missing on leaf 2, one base value: onnxruntime
    // writes only the first column for rows reaching leaf 2.
    let f = classifier(
        &stump("BRANCH_LEQ", 0.5, 0),
        &[(0, 1, 0, 0.3), (0, 1, 1, 0.2), (0, 2, 0, -0.7)],
        2,
        vec![
            floats("base_values", &[0.1]),
            string("post_transform", "LOGISTIC"),
        ],
    )
    .unwrap();
    let got = eval(&f, &[0.0, 1.0], 1);
    close(&got[..2], &[0.59868765, 0.54983395]);
    close(&got[2..3], &[-0.6]);
    assert!(got[3].is_nan());
    // Without base value the single score is spread as [σ(-s), σ(s)].
    let f = classifier(
        &stump("BRANCH_LEQ", 0.5, 0),
        &[(0, 1, 0, 0.3), (0, 1, 1, 0.2), (0, 2, 0, -0.7)],
        2,
        vec![string("post_transform", "LOGISTIC")],
    )
    .unwrap();
    close(&eval(&f, &[1.0], 1), &[0.66818774, 0.33181226]);
}

#[test]
fn multiclass_base_values_and_softmax_zero() {
    let weights = [(0, 1, 0, 0.3), (0, 2, 1, -0.7)];
    let f = classifier(
        &stump("BRANCH_LEQ", 0.5, 0),
        &weights,
        3,
        vec![string("post_transform", "SOFTMAX_ZERO")],
    )
    .unwrap();
    close(&eval(&f, &[0.0, 1.0], 1), &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let f = classifier(
        &stump("BRANCH_LEQ", 0.5, 0),
        &weights,
        3,
        vec![floats("base_values", &[0.1, 0.2, 0.3])],
    )
    .unwrap();
    close(&eval(&f, &[0.0, 1.0], 1), &[0.4, 0.2, 0.3, 0.1, -0.5, 0.3]);
    let f = classifier(
        &stump("BRANCH_LEQ", 0.5, 0),
        &weights,
        3,
        vec![string("post_transform", "SOFTMAX")],
    )
    .unwrap();
    close(&eval(&f, &[0.0], 1), &[0.40295988, 0.29852003, 0.29852003]);
}

#[test]
fn regressor_aggregates_follow_onnxruntime() {
    // Two stumps (x <= 0.5, x <= 1.5); tree 1's false leaf has no weight.
    let mut rows = stump("BRANCH_LEQ", 0.5, 0);
    rows.extend(stump("BRANCH_LEQ", 1.5, 0).into_iter().map(|mut r| {
        r.0 = 1;
        r
    }));
    let x = [0.0f32, 1.0, 2.0];
    let one = [(0, 1, 0, 0.3), (0, 2, 0, -0.7), (1, 1, 0, 0.2)];
    let run = |agg: &str, base: Option<f32>, post: &str| {
        let mut extra = vec![
            string("aggregate_function", agg),
            string("post_transform", post),
        ];
        if let Some(b) = base {
            extra.push(floats("base_values", &[b]));
        }
        eval(&regressor(&rows, &one, 1, extra), &x, 1)
    };
    close(&run("SUM", None, "NONE"), &[0.5, -0.5, -0.7]);
    // With one target only PROBIT applies.
    close(&run("SUM", Some(0.1), "LOGISTIC"), &[0.6, -0.4, -0.6]);
    close(&run("AVERAGE", Some(0.1), "NONE"), &[0.35, -0.15, -0.25]);
    close(&run("MIN", None, "NONE"), &[0.2, -0.7, -0.7]);
    // A leaf without weight counts as 0.
    close(&run("MAX", None, "NONE"), &[0.3, 0.2, 0.0]);
    close(&run("MAX", Some(0.1), "NONE"), &[0.4, 0.3, 0.1]);

    // Two targets: only present weights count, and targets without one read 0.
    let two = [
        (0, 1, 0, 0.3),
        (0, 1, 1, 0.5),
        (0, 2, 0, -0.7),
        (1, 1, 0, 0.2),
    ];
    let run2 = |agg: &str, base: bool, post: &str| {
        let mut extra = vec![
            string("aggregate_function", agg),
            string("post_transform", post),
        ];
        if base {
            extra.push(floats("base_values", &[0.1, 0.2]));
        }
        eval(&regressor(&rows, &two, 2, extra), &x, 1)
    };
    close(
        &run2("SUM", true, "NONE"),
        &[0.6, 0.7, -0.4, 0.0, -0.6, 0.0],
    );
    close(
        &run2("AVERAGE", false, "NONE"),
        &[0.25, 0.25, -0.25, 0.0, -0.35, 0.0],
    );
    close(
        &run2("MAX", false, "NONE"),
        &[0.3, 0.5, 0.2, 0.0, -0.7, 0.0],
    );
    close(
        &run2("MIN", true, "NONE"),
        &[0.3, 0.7, -0.6, 0.0, -0.6, 0.0],
    );
    close(
        &run2("SUM", false, "LOGISTIC"),
        &[0.62245935, 0.62245935, 0.37754065, 0.5, 0.33181226, 0.5],
    );
}

#[test]
fn a_tree_id_split_in_two_runs_counts_twice() {
    // onnxruntime takes each run of equal tree ids as a tree rooted at its first node.
    let rows: Vec<Row> = vec![
        (0, 0, 0, 0.5, "BRANCH_LEQ", 1, 2, 0),
        (1, 0, 0, 0.5, "BRANCH_LEQ", 1, 2, 0),
        (1, 1, 0, 0.0, "LEAF", 0, 0, 0),
        (1, 2, 0, 0.0, "LEAF", 0, 0, 0),
        (0, 1, 0, 0.0, "LEAF", 0, 0, 0),
        (0, 2, 0, 0.0, "LEAF", 0, 0, 0),
    ];
    let weights = [
        (0, 1, 0, 1.0),
        (0, 2, 0, 2.0),
        (1, 1, 0, 10.0),
        (1, 2, 0, 20.0),
    ];
    let f = regressor(&rows, &weights, 1, vec![]);
    close(&eval(&f, &[0.0, 1.0], 1), &[12.0, 23.0]);
    let f = regressor(
        &rows,
        &weights,
        1,
        vec![string("aggregate_function", "AVERAGE")],
    );
    close(&eval(&f, &[0.0, 1.0], 1), &[4.0, 7.6666665]);
}

#[test]
fn one_target_takes_a_leafs_first_weight() {
    let weights = [(0, 2, 0, 0.7), (0, 1, 0, 0.3), (0, 1, 0, 0.5)];
    let f = regressor(&stump("BRANCH_LEQ", 0.5, 0), &weights, 1, vec![]);
    close(&eval(&f, &[0.0, 1.0], 1), &[0.3, 0.7]);
    // With several targets all weights add up.
    let f = regressor(&stump("BRANCH_LEQ", 0.5, 0), &weights, 2, vec![]);
    close(&eval(&f, &[0.0, 1.0], 1), &[0.8, 0.0, 0.7, 0.0]);
    assert!(matches!(f.leaves, Leaves::Lists { .. }));
}

#[test]
fn probit_uses_onnxruntimes_approximation() {
    // onnxruntime 1.20.1's PROBIT outputs.
    for (p, want) in [
        (0.001f32, -3.0846436f32),
        (0.01, -2.3240902),
        (0.1, -1.2817129),
        (0.2, -0.8417561),
        (0.3, -0.5244459),
        (0.45, -0.12566201),
        (0.55, 0.12566201),
        (0.9, 1.2817129),
        (0.999, 3.0846436),
    ] {
        let got = probit(p);
        assert!(
            (got - want).abs() < 2e-6,
            "probit({p}) = {got}, want {want}"
        );
    }
    assert_eq!(probit(0.5), 0.0);
    assert_eq!(probit(1.0), f32::INFINITY);
    assert_eq!(probit(0.0), f32::NEG_INFINITY);
    assert!(probit(-0.2).is_nan());
    assert!((logistic(-0.3) - 0.42555749).abs() < 1e-7);
}

#[test]
fn float_tensor_attributes_are_read_and_double_ones_refused() {
    let raw = TensorProto {
        data_type: 1,
        dims: vec![3],
        raw_data: [0.5f32, 0.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        ..Default::default()
    };
    let mut a = tree_attributes(&stump("BRANCH_LEQ", 99.0, 0));
    a.retain(|a| a.name != "nodes_values");
    a.push(tensor("nodes_values_as_tensor", raw));
    a.extend(weight_attributes(
        "target",
        &[(0, 1, 0, 1.0), (0, 2, 0, 2.0)],
    ));
    let listed = TensorProto {
        data_type: 1,
        dims: vec![1],
        float_data: vec![0.25],
        ..Default::default()
    };
    a.push(tensor("base_values_as_tensor", listed));
    let f = parse_regressor(&node("TreeEnsembleRegressor", a.clone())).unwrap();
    close(&eval(&f, &[0.0, 1.0], 1), &[1.25, 2.25]);

    let double = TensorProto {
        data_type: 11,
        dims: vec![1],
        double_data: vec![0.25],
        ..Default::default()
    };
    a.retain(|a| a.name != "base_values_as_tensor");
    a.push(tensor("base_values_as_tensor", double));
    let err = parse_regressor(&node("TreeEnsembleRegressor", a)).unwrap_err();
    assert!(format!("{err:#}").contains("double"), "{err:#}");
}

#[test]
fn malformed_models_are_refused_with_a_reason() {
    let refused =
        |rows: Vec<Row>, weights: &[(i64, i64, i64, f32)], classes: usize, needle: &str| {
            let err = classifier(&rows, weights, classes, vec![]).unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(needle), "{needle:?} not in {text:?}");
        };
    let leaf = [(0, 1, 0, 1.0), (0, 2, 0, 1.0)];
    let mut missing_child = stump("BRANCH_LEQ", 0.5, 0);
    missing_child[0].6 = 7;
    refused(missing_child, &leaf, 2, "false child 7");
    let mut twice = stump("BRANCH_LEQ", 0.5, 0);
    twice[2].1 = 1;
    refused(twice, &leaf[..1], 2, "appears twice");
    let cycle: Vec<Row> = vec![
        (0, 0, 0, 0.5, "BRANCH_LEQ", 1, 2, 0),
        (0, 1, 0, 0.5, "BRANCH_LEQ", 0, 2, 0),
        (0, 2, 0, 0.0, "LEAF", 0, 0, 0),
    ];
    refused(cycle, &[(0, 2, 0, 1.0)], 2, "cycle");
    refused(
        stump("BRANCH_LEQ", 0.5, 0),
        &[(0, 1, 5, 1.0)],
        2,
        "out of 0..2",
    );
    refused(
        stump("BRANCH_LEQ", 0.5, 0),
        &[(0, 9, 0, 1.0)],
        2,
        "does not exist",
    );
    refused(
        stump("BRANCH_MEMBER", 0.5, 0),
        &leaf,
        2,
        "unsupported node mode",
    );
    refused(stump("BRANCH_LEQ", 0.5, 0), &leaf, 1, "1 class label");
    let mut short = tree_attributes(&stump("BRANCH_LEQ", 0.5, 0));
    short[3] = floats("nodes_values", &[0.5]);
    short.push(ints("classlabels_int64s", &[0, 1]));
    let err = parse_classifier(&node("TreeEnsembleClassifier", short)).unwrap_err();
    assert!(format!("{err:#}").contains("nodes_values has 1"), "{err:#}");
}

fn value_info(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn the_registered_classifier_runs_in_tract_with_labels_from_probabilities() {
    // A skl2onnx-style binary model: weights for class 0 only, one base value,
    // LOGISTIC. Labels must follow the probabilities (tract's own op inverted them).
    let mut attributes = tree_attributes(&stump("BRANCH_LEQ", 0.5, 0));
    attributes.extend(weight_attributes(
        "class",
        &[(0, 1, 0, 0.8), (0, 2, 0, -0.9)],
    ));
    attributes.push(strings("classlabels_strings", &["no", "yes"]));
    attributes.push(floats("base_values", &[0.1]));
    attributes.push(string("post_transform", "LOGISTIC"));
    let mut tree = node("TreeEnsembleClassifier", attributes);
    tree.input = vec!["features".into()];
    tree.output = vec!["label".into(), "probabilities".into()];
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 3,
            },
        ],
        graph: Some(GraphProto {
            node: vec![tree],
            name: "g".into(),
            input: vec![value_info("features", 1)],
            output: vec![value_info("label", 8), value_info("probabilities", 1)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut model = onnx().model_for_proto_model(&proto).unwrap();
    model
        .set_input_fact(0, f32::fact([3.to_dim(), 2.to_dim()]).into())
        .unwrap();
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    let x = Tensor::from_shape(&[3, 2], &[0.0f32, 9.0, 1.0, 9.0, f32::NAN, 9.0]).unwrap();
    let out = plan.run(tvec!(x.into())).unwrap();
    let labels = out[0].try_as_plain_ram().unwrap();
    let labels = labels.as_slice::<String>().unwrap().to_vec();
    let p = out[1].try_as_plain_ram().unwrap();
    let p = p.as_slice::<f32>().unwrap().to_vec();
    // Row 0: s = 0.9 → [σ(-0.9), σ(0.9)]; rows 1 and NaN: s = -0.8.
    close(
        &p,
        &[
            0.28905050, 0.71094950, 0.68997448, 0.31002552, 0.68997448, 0.31002552,
        ],
    );
    assert_eq!(labels, ["yes", "no", "no"]);
}

#[test]
fn argmax_takes_the_first_largest_and_skips_nan() {
    assert_eq!(argmax(&[0.2, 0.5, 0.5]), 1);
    assert_eq!(argmax(&[f32::NAN, 0.1, 0.0]), 1);
    assert_eq!(argmax(&[0.7]), 0);
}
