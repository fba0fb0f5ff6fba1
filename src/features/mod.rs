//! Features, compiled once from the topology into a small program over [`UserState`].
//! Pure and synchronous: the stream, backfill and the benches all call
//! [`FeatureSet::apply_event`], which is what makes training/serving skew impossible.
//!
//! Compilation dedupes the state: `purchases_30d` (a count) and
//! `avg_purchase_amount_30d` (a mean) share one bucketed aggregator, since a bucket keeps
//! both the count and the sum.

use crate::codec::{Event, EventType, TypeMask};
use crate::config::{parse_duration, FeatureConfig, Problem};
use crate::state::{
    bucket_of, distinct_add, distinct_prune, distinct_read, window_add, window_prune, window_read,
    AggState, UserState, NO_TS,
};
use crate::util::fnv1a64;

/// A numeric event field that can be summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumField {
    Amount,
}

/// A text event field whose distinct values can be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextField {
    Category,
    ItemId,
    Type,
}

impl TextField {
    fn of(self, event: &Event) -> &str {
        match self {
            TextField::Category => &event.category,
            TextField::ItemId => &event.item_id,
            TextField::Type => event.kind.as_str(),
        }
    }
}

/// One piece of per-user state, shared by every feature that reads it.
#[derive(Debug, Clone, PartialEq)]
enum Aggregator {
    Window {
        types: TypeMask,
        resolution_ms: i64,
        span: i64,
        field: Option<NumField>,
    },
    Distinct {
        types: TypeMask,
        resolution_ms: i64,
        span: i64,
        field: TextField,
    },
    /// Last matching event time; read *before* the event is applied.
    Last {
        types: TypeMask,
    },
    Lifetime {
        types: TypeMask,
    },
}

/// How one feature value is read.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Count {
        agg: usize,
    },
    Sum {
        agg: usize,
    },
    Mean {
        agg: usize,
        default: f64,
    },
    Distinct {
        agg: usize,
    },
    SinceLast {
        agg: usize,
        unit_ms: f64,
        default: f64,
    },
    Lifetime {
        agg: usize,
    },
    /// `feature[num] / max(feature[den], min_den)`; both are earlier features.
    Ratio {
        num: usize,
        den: usize,
        min_den: f64,
    },
}

/// Why an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateEvent {
    /// How far behind the user's newest applied event time it was, in ms.
    pub behind_ms: i64,
}

/// The compiled features of a topology.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    names: Vec<String>,
    aggregators: Vec<Aggregator>,
    exprs: Vec<Expr>,
    lateness_ms: i64,
}

/// Reusable per-thread buffers for [`FeatureSet::apply_event`].
#[derive(Debug, Default)]
pub struct Scratch {
    hashes: Vec<u64>,
}

const KINDS: &str = "count, sum, mean, distinct, since_last, lifetime_count, ratio";

impl FeatureSet {
    /// Compiles feature declarations. Returns every problem, each with its path.
    pub fn compile(
        features: &[FeatureConfig],
        lateness_ms: i64,
    ) -> Result<FeatureSet, Vec<Problem>> {
        let mut set = FeatureSet {
            names: Vec::new(),
            aggregators: Vec::new(),
            exprs: Vec::new(),
            lateness_ms,
        };
        let mut problems = Vec::new();
        if features.is_empty() {
            problems.push(Problem::new(
                "features",
                "must declare at least one feature",
            ));
        }
        for (i, f) in features.iter().enumerate() {
            let at = |key: &str| format!("features[{i}].{key}");
            let before = problems.len();
            if f.name.trim().is_empty() {
                problems.push(Problem::new(at("name"), "must not be empty"));
            } else if set.names.contains(&f.name) {
                problems.push(Problem::new(
                    at("name"),
                    format!("duplicate feature name \"{}\"", f.name),
                ));
            }
            let mut ctx = Ctx {
                f,
                at: &at,
                problems: &mut problems,
            };
            let expr = match f.kind.as_str() {
                "count" | "sum" | "mean" => {
                    ctx.forbid(&["unit", "numerator", "denominator", "min_denominator"]);
                    let types = ctx.types();
                    let window = ctx.window();
                    let field = match (f.kind.as_str(), f.field.as_deref()) {
                        ("count", None) => None,
                        ("count", Some(_)) => {
                            ctx.problem("field", "a count takes no field");
                            None
                        }
                        (_, Some("amount")) => Some(NumField::Amount),
                        (_, Some(other)) => {
                            ctx.problem(
                                "field",
                                &format!("\"{other}\" is not a numeric field (expected amount)"),
                            );
                            None
                        }
                        (kind, None) => {
                            ctx.problem(
                                "field",
                                &format!("a {kind} needs a numeric field (amount)"),
                            );
                            None
                        }
                    };
                    match window {
                        Some((resolution_ms, span)) if problems.len() == before => {
                            let agg = set.window_aggregator(types, resolution_ms, span, field);
                            match f.kind.as_str() {
                                "count" => Some(Expr::Count { agg }),
                                "sum" => Some(Expr::Sum { agg }),
                                _ => Some(Expr::Mean {
                                    agg,
                                    default: f.default.unwrap_or(0.0),
                                }),
                            }
                        }
                        _ => None,
                    }
                }
                "distinct" => {
                    ctx.forbid(&[
                        "unit",
                        "numerator",
                        "denominator",
                        "min_denominator",
                        "default",
                    ]);
                    let types = ctx.types();
                    let window = ctx.window();
                    let field = match f.field.as_deref() {
                        Some("category") => Some(TextField::Category),
                        Some("item_id") => Some(TextField::ItemId),
                        Some("type") => Some(TextField::Type),
                        Some(other) => {
                            ctx.problem("field", &format!("\"{other}\" is not a text field (expected category, item_id or type)"));
                            None
                        }
                        None => {
                            ctx.problem(
                                "field",
                                "a distinct count needs a field (category, item_id or type)",
                            );
                            None
                        }
                    };
                    match (window, field) {
                        (Some((resolution_ms, span)), Some(field)) if problems.len() == before => {
                            let agg = set.add_aggregator(Aggregator::Distinct {
                                types,
                                resolution_ms,
                                span,
                                field,
                            });
                            Some(Expr::Distinct { agg })
                        }
                        _ => None,
                    }
                }
                "since_last" => {
                    ctx.forbid(&[
                        "field",
                        "window",
                        "resolution",
                        "numerator",
                        "denominator",
                        "min_denominator",
                    ]);
                    let types = ctx.types();
                    let unit_ms = match f.unit.as_deref() {
                        None => {
                            ctx.problem("unit", "since_last needs a unit such as 1s or 1d");
                            None
                        }
                        Some(text) => match parse_duration(text) {
                            Ok(d) if !d.is_zero() => Some(d.as_millis() as f64),
                            Ok(_) => {
                                ctx.problem("unit", "must be greater than zero");
                                None
                            }
                            Err(e) => {
                                ctx.problem("unit", &e);
                                None
                            }
                        },
                    };
                    match unit_ms {
                        Some(unit_ms) if problems.len() == before => {
                            let agg = set.add_aggregator(Aggregator::Last { types });
                            Some(Expr::SinceLast {
                                agg,
                                unit_ms,
                                default: f.default.unwrap_or(-1.0),
                            })
                        }
                        _ => None,
                    }
                }
                "lifetime_count" => {
                    ctx.forbid(&[
                        "field",
                        "window",
                        "resolution",
                        "unit",
                        "numerator",
                        "denominator",
                        "min_denominator",
                        "default",
                    ]);
                    let types = ctx.types();
                    (problems.len() == before).then(|| Expr::Lifetime {
                        agg: set.add_aggregator(Aggregator::Lifetime { types }),
                    })
                }
                "ratio" => {
                    ctx.forbid(&["filter", "field", "window", "resolution", "unit", "default"]);
                    let num = ctx.earlier_feature("numerator", f.numerator.as_deref(), &set.names);
                    let den =
                        ctx.earlier_feature("denominator", f.denominator.as_deref(), &set.names);
                    let min_den = f.min_denominator.unwrap_or(1.0);
                    if !(min_den.is_finite() && min_den > 0.0) {
                        ctx.problem("min_denominator", "must be a positive number");
                    }
                    match (num, den) {
                        (Some(num), Some(den)) if problems.len() == before => {
                            Some(Expr::Ratio { num, den, min_den })
                        }
                        _ => None,
                    }
                }
                other => {
                    problems.push(Problem::new(
                        at("kind"),
                        format!("unknown kind \"{other}\" (expected one of {KINDS})"),
                    ));
                    None
                }
            };
            // Keep names even for broken features so later ratios don't report twice.
            set.names.push(f.name.clone());
            if let Some(expr) = expr {
                set.exprs.push(expr);
            }
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    fn add_aggregator(&mut self, agg: Aggregator) -> usize {
        if let Some(i) = self.aggregators.iter().position(|a| *a == agg) {
            return i;
        }
        self.aggregators.push(agg);
        self.aggregators.len() - 1
    }

    /// A count reads any window with the same filter and shape; a sum or mean needs the
    /// field too, and may upgrade a count-only window to carry it.
    fn window_aggregator(
        &mut self,
        types: TypeMask,
        resolution_ms: i64,
        span: i64,
        field: Option<NumField>,
    ) -> usize {
        for (i, agg) in self.aggregators.iter_mut().enumerate() {
            if let Aggregator::Window {
                types: t,
                resolution_ms: r,
                span: s,
                field: existing,
            } = agg
            {
                if *t == types && *r == resolution_ms && *s == span {
                    match (field, *existing) {
                        (None, _) => return i,
                        (Some(f), Some(e)) if f == e => return i,
                        (Some(f), None) => {
                            *existing = Some(f);
                            return i;
                        }
                        _ => {}
                    }
                }
            }
        }
        self.add_aggregator(Aggregator::Window {
            types,
            resolution_ms,
            span,
            field,
        })
    }

    /// Feature names, in output (model input) order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn lateness_ms(&self) -> i64 {
        self.lateness_ms
    }

    /// A fresh state for a user never seen before.
    pub fn new_state(&self) -> UserState {
        let aggs = self
            .aggregators
            .iter()
            .map(|a| match a {
                Aggregator::Window { .. } => AggState::Window(Vec::new()),
                Aggregator::Distinct { .. } => AggState::Distinct(Vec::new()),
                Aggregator::Last { .. } => AggState::Last(NO_TS),
                Aggregator::Lifetime { .. } => AggState::Lifetime(0),
            })
            .collect();
        UserState {
            max_ts: NO_TS,
            aggs,
        }
    }

    /// Whether a stored state has this feature set's shape.
    pub fn fits(&self, state: &UserState) -> bool {
        state.aggs.len() == self.aggregators.len()
            && state.aggs.iter().zip(&self.aggregators).all(|(s, a)| {
                matches!(
                    (s, a),
                    (AggState::Window(_), Aggregator::Window { .. })
                        | (AggState::Distinct(_), Aggregator::Distinct { .. })
                        | (AggState::Last(_), Aggregator::Last { .. })
                        | (AggState::Lifetime(_), Aggregator::Lifetime { .. })
                )
            })
    }

    /// Applies one event to its user's state and writes the event's point-in-time
    /// feature values into `out` (length [`FeatureSet::len`]).
    ///
    /// A late event (older than the user's newest event by more than the lateness) is
    /// refused and leaves the state untouched.
    pub fn apply_event(
        &self,
        state: &mut UserState,
        event: &Event,
        out: &mut [f64],
        scratch: &mut Scratch,
    ) -> Result<(), LateEvent> {
        debug_assert_eq!(out.len(), self.names.len());
        if state.max_ts != NO_TS && event.ts < state.max_ts - self.lateness_ms {
            return Err(LateEvent {
                behind_ms: state.max_ts - event.ts,
            });
        }
        // "Since last" reads the state before this event is applied.
        for (expr, slot) in self.exprs.iter().zip(out.iter_mut()) {
            if let Expr::SinceLast {
                agg,
                unit_ms,
                default,
            } = *expr
            {
                *slot = match state.aggs[agg] {
                    AggState::Last(NO_TS) => default,
                    AggState::Last(last) => (event.ts - last) as f64 / unit_ms,
                    _ => unreachable!("state shape checked by fits()"),
                };
            }
        }

        state.max_ts = state.max_ts.max(event.ts);
        let horizon = state.max_ts - self.lateness_ms;
        for (agg, st) in self.aggregators.iter().zip(state.aggs.iter_mut()) {
            match (agg, st) {
                (
                    Aggregator::Window {
                        types,
                        resolution_ms,
                        span,
                        field,
                    },
                    AggState::Window(buckets),
                ) => {
                    if types.contains(event.kind) {
                        let value = match field {
                            Some(NumField::Amount) => event.amount,
                            None => 0.0,
                        };
                        window_add(buckets, bucket_of(event.ts, *resolution_ms), value);
                    }
                    window_prune(buckets, bucket_of(horizon, *resolution_ms) - span + 1);
                }
                (
                    Aggregator::Distinct {
                        types,
                        resolution_ms,
                        span,
                        field,
                    },
                    AggState::Distinct(buckets),
                ) => {
                    if types.contains(event.kind) {
                        let hash = fnv1a64(field.of(event).as_bytes());
                        distinct_add(buckets, bucket_of(event.ts, *resolution_ms), hash);
                    }
                    distinct_prune(buckets, bucket_of(horizon, *resolution_ms) - span + 1);
                }
                (Aggregator::Last { types }, AggState::Last(last)) => {
                    if types.contains(event.kind) {
                        *last = event.ts;
                    }
                }
                (Aggregator::Lifetime { types }, AggState::Lifetime(n)) => {
                    if types.contains(event.kind) {
                        *n += 1;
                    }
                }
                _ => unreachable!("state shape checked by fits()"),
            }
        }

        for i in 0..self.exprs.len() {
            let value = match self.exprs[i] {
                Expr::SinceLast { .. } => continue,
                Expr::Count { agg } => self.read_window(state, agg, event.ts).0 as f64,
                Expr::Sum { agg } => self.read_window(state, agg, event.ts).1,
                Expr::Mean { agg, default } => {
                    let (count, sum) = self.read_window(state, agg, event.ts);
                    if count == 0 {
                        default
                    } else {
                        sum / count as f64
                    }
                }
                Expr::Distinct { agg } => {
                    let (
                        Aggregator::Distinct {
                            resolution_ms,
                            span,
                            ..
                        },
                        AggState::Distinct(buckets),
                    ) = (&self.aggregators[agg], &state.aggs[agg])
                    else {
                        unreachable!("state shape checked by fits()")
                    };
                    distinct_read(
                        buckets,
                        bucket_of(event.ts, *resolution_ms),
                        *span,
                        &mut scratch.hashes,
                    ) as f64
                }
                Expr::Lifetime { agg } => match state.aggs[agg] {
                    AggState::Lifetime(n) => n as f64,
                    _ => unreachable!("state shape checked by fits()"),
                },
                Expr::Ratio { num, den, min_den } => out[num] / out[den].max(min_den),
            };
            out[i] = value;
        }
        Ok(())
    }

    fn read_window(&self, state: &UserState, agg: usize, ts: i64) -> (u64, f64) {
        match (&self.aggregators[agg], &state.aggs[agg]) {
            (
                Aggregator::Window {
                    resolution_ms,
                    span,
                    ..
                },
                AggState::Window(buckets),
            ) => window_read(buckets, bucket_of(ts, *resolution_ms), *span),
            _ => unreachable!("state shape checked by fits()"),
        }
    }
}

/// Helper for compiling one feature: reports problems under its path.
struct Ctx<'a, F: Fn(&str) -> String> {
    f: &'a FeatureConfig,
    at: &'a F,
    problems: &'a mut Vec<Problem>,
}

impl<F: Fn(&str) -> String> Ctx<'_, F> {
    fn problem(&mut self, key: &str, message: &str) {
        self.problems.push(Problem::new((self.at)(key), message));
    }

    /// Keys that this kind does not take are errors, not silently ignored settings.
    fn forbid(&mut self, keys: &[&str]) {
        let f = self.f;
        let set = |key: &str| match key {
            "filter" => f.filter.is_some(),
            "field" => f.field.is_some(),
            "window" => f.window.is_some(),
            "resolution" => f.resolution.is_some(),
            "default" => f.default.is_some(),
            "unit" => f.unit.is_some(),
            "numerator" => f.numerator.is_some(),
            "denominator" => f.denominator.is_some(),
            "min_denominator" => f.min_denominator.is_some(),
            _ => false,
        };
        for key in keys {
            if set(key) {
                self.problem(key, &format!("not used by kind \"{}\"", f.kind));
            }
        }
    }

    fn types(&mut self) -> TypeMask {
        let Some(filter) = &self.f.filter else {
            return TypeMask::ALL;
        };
        let names = filter.event_type.as_slice();
        if names.is_empty() {
            self.problem("filter.type", "must name at least one event type");
        }
        let mut mask = TypeMask::default();
        for (j, name) in names.iter().enumerate() {
            match EventType::parse(name) {
                Some(t) => mask.insert(t),
                None => {
                    let path = format!("filter.type[{j}]");
                    self.problem(
                        &path,
                        &format!(
                            "unknown event type \"{name}\" (expected {})",
                            EventType::NAMES.join(", ")
                        ),
                    );
                }
            }
        }
        mask
    }

    /// (resolution in ms, number of buckets), checking that the window is a positive
    /// multiple of the resolution.
    fn window(&mut self) -> Option<(i64, i64)> {
        let parse = |ctx: &mut Self, key: &str, value: Option<&String>| -> Option<i64> {
            match value.map(|v| parse_duration(v)) {
                None => {
                    ctx.problem(key, "required for a windowed feature");
                    None
                }
                Some(Ok(d)) if d.is_zero() => {
                    ctx.problem(key, "must be greater than zero");
                    None
                }
                Some(Ok(d)) => Some(d.as_millis() as i64),
                Some(Err(e)) => {
                    ctx.problem(key, &e);
                    None
                }
            }
        };
        let window = parse(self, "window", self.f.window.as_ref());
        let resolution = parse(self, "resolution", self.f.resolution.as_ref());
        let (window, resolution) = (window?, resolution?);
        if window % resolution != 0 {
            self.problem(
                "window",
                &format!(
                    "{} is not a multiple of the resolution {}",
                    self.f.window.as_deref().unwrap_or_default(),
                    self.f.resolution.as_deref().unwrap_or_default()
                ),
            );
            return None;
        }
        Some((resolution, window / resolution))
    }

    fn earlier_feature(
        &mut self,
        key: &str,
        name: Option<&str>,
        earlier: &[String],
    ) -> Option<usize> {
        let Some(name) = name else {
            self.problem(key, "required for a ratio");
            return None;
        };
        let found = earlier.iter().position(|n| n == name);
        if found.is_none() {
            self.problem(
                key,
                &format!("\"{name}\" is not a feature declared before this one"),
            );
        }
        found
    }
}
