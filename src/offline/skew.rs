//! The skew report: recompute offline, with the same feature code, the features behind
//! logged online predictions, and compare them feature by feature.

use std::collections::HashMap;
use std::path::Path;

use super::{EventInput, OfflineError, Rejections, Replay};
use crate::codec::TypeMask;
use crate::features::FeatureSet;

/// Mismatches of one feature.
#[derive(Debug, Clone, Default)]
pub struct FeatureSkew {
    pub name: String,
    pub mismatches: u64,
    pub max_abs: f64,
    pub max_rel: f64,
    pub examples: Vec<String>,
}

#[derive(Debug, Default)]
pub struct SkewReport {
    /// Logged predictions compared with a recomputed row.
    pub compared: u64,
    /// Logged predictions whose event the offline replay did not produce.
    pub unmatched: Vec<String>,
    pub features: Vec<FeatureSkew>,
    pub rejections: Rejections,
}

impl SkewReport {
    pub fn mismatches(&self) -> u64 {
        self.features.iter().map(|f| f.mismatches).sum()
    }

    pub fn is_clean(&self) -> bool {
        self.mismatches() == 0 && self.unmatched.is_empty() && self.compared > 0
    }

    pub fn render(&self) -> String {
        let mut text = format!(
            "compared {} logged predictions; {} feature mismatches; {} logged predictions without a recomputed event\n",
            self.compared,
            self.mismatches(),
            self.unmatched.len()
        );
        text += &format!(
            "{:<28} {:>10} {:>14} {:>14}\n",
            "feature", "mismatches", "max |diff|", "max rel diff"
        );
        for f in &self.features {
            text += &format!(
                "{:<28} {:>10} {:>14.3e} {:>14.3e}\n",
                f.name, f.mismatches, f.max_abs, f.max_rel
            );
            for e in &f.examples {
                text += &format!("    {e}\n");
            }
        }
        for id in self.unmatched.iter().take(5) {
            text += &format!("unmatched: {id}\n");
        }
        text
    }
}

/// Where logged predictions come from: a JSON-lines file or a topic.
pub enum LoggedSource<'a> {
    File(&'a Path),
    Topic { brokers: &'a str, topic: &'a str },
}

/// Loads logged predictions (JSON, with `features`) as event_id → feature vectors in
/// topology order; a re-emitted prediction adds another vector.
fn load_logged(
    source: &LoggedSource<'_>,
    names: &[String],
) -> Result<HashMap<String, Vec<Vec<f64>>>, OfflineError> {
    let mut logged: HashMap<String, Vec<Vec<f64>>> = HashMap::new();
    let mut error = None;
    let mut add = |payload: &[u8], at: String| {
        if error.is_some() {
            return;
        }
        let parsed: Result<serde_json::Value, _> = serde_json::from_slice(payload);
        let result = parsed.map_err(|e| format!("{at}: not a JSON prediction: {e}")).and_then(|v| {
            let id = v["event_id"].as_str().ok_or_else(|| format!("{at}: prediction has no event_id"))?.to_owned();
            let features = v["features"]
                .as_object()
                .ok_or_else(|| format!("{at}: prediction for {id} has no features (run the stream with --log-features)"))?;
            let values = names
                .iter()
                .map(|n| features.get(n).and_then(|x| x.as_f64()).ok_or_else(|| format!("{at}: prediction for {id} lacks feature {n}")))
                .collect::<Result<Vec<f64>, String>>()?;
            Ok((id, values))
        });
        match result {
            Ok((id, values)) => logged.entry(id).or_default().push(values),
            Err(e) => error = Some(e),
        }
    };
    match source {
        LoggedSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| super::InputError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                add(
                    line.as_bytes(),
                    format!("{} line {}", path.display(), i + 1),
                );
            }
        }
        LoggedSource::Topic { brokers, topic } => {
            super::input::read_topic_records(brokers, topic, |_, payload, location| {
                add(payload, format!("topic {topic} {location}"))
            })?;
        }
    }
    match error {
        Some(e) => Err(OfflineError::Other(e)),
        None => Ok(logged),
    }
}

/// Recomputes every event's features and compares them with the logged ones.
/// A value mismatches when `|online - offline| > tolerance * max(|offline|, 1e-12)`.
pub fn skew_report(
    features: &FeatureSet,
    scored: TypeMask,
    logged: &LoggedSource<'_>,
    events: &EventInput,
    tolerance: f64,
) -> Result<SkewReport, OfflineError> {
    let names = features.names().to_vec();
    let mut logged = load_logged(logged, &names)?;
    let mut report = SkewReport {
        features: names
            .iter()
            .map(|n| FeatureSkew {
                name: n.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut replay = Replay::new(features, scored, true);
    let mut compare = |row: super::Row, report: &mut SkewReport| {
        let Some(copies) = logged.remove(&row.event_id) else {
            return;
        };
        for online in copies {
            report.compared += 1;
            for ((skew, on), off) in report
                .features
                .iter_mut()
                .zip(&online)
                .zip(row.features.iter())
            {
                let diff = (on - off).abs();
                let rel = diff / off.abs().max(1e-12);
                if diff > tolerance * off.abs().max(1e-12) {
                    skew.mismatches += 1;
                    skew.max_abs = skew.max_abs.max(diff);
                    skew.max_rel = skew.max_rel.max(rel);
                    if skew.examples.len() < 5 {
                        skew.examples
                            .push(format!("{}: online {on}, offline {off}", row.event_id));
                    }
                }
            }
        }
    };
    let mut rejections = Rejections::default();
    replay.run(events, &mut rejections, None, |row| {
        compare(row, &mut report)
    })?;
    report.rejections = rejections;
    let mut unmatched: Vec<String> = logged.into_keys().collect();
    unmatched.sort();
    report.unmatched = unmatched;
    Ok(report)
}
