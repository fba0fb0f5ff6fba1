//! Live monitoring inside the stream: data drift (a KS test and the PSI per feature
//! against the champion's training reference), prediction drift (the score's
//! distribution and its mean against the reference positive rate), and model quality
//! (rolling AUC, log loss and accuracy from the in-stream label join, per model version
//! and variant).
//!
//! Partition tasks hand each scored batch (and each batch of settled labels) to one
//! monitor task per worker without waiting; when it is behind, inputs are dropped and
//! counted, never queued without bound. Every `check_every` scored rows the monitor
//! tests its windows and updates gauges. Alerts go through a hysteresis: a condition
//! must hold on `raise_after` consecutive checks to fire, and `clear_after` clean checks
//! resolve it, after which the same alert waits out a cool-down. A drift alert needs both
//! statistical significance (KS p below the threshold) and size (PSI above its
//! threshold): with thousands of values a KS test alone flags differences too small to
//! matter.

pub mod stats;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};

use tokio::sync::watch;

use crate::alerts::Alerts;
use crate::config::{parse_duration, MonitoringConfig};
use crate::metrics as m;
use crate::serving::ModelSet;

/// A stream slower than `check_every` rows per this long is judged on what it sent.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// What partitions send the monitor.
pub enum MonitorInput {
    /// Scored rows of one input partition (topology feature order, `stride` values
    /// each), their scores, and the newest event time among them.
    Rows {
        partition: i32,
        rows: Vec<f64>,
        scores: Vec<f64>,
        max_ts: i64,
    },
    /// Predictions whose label the click join settled.
    Labels(Vec<Labeled>),
}

#[derive(Debug, Clone, Copy)]
pub struct Labeled {
    pub version: u32,
    pub arm: u8,
    pub score: f64,
    pub label: bool,
}

/// Where partitions offer monitor inputs. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct MonitorHandle {
    sender: SyncSender<MonitorInput>,
    dropped: metrics::Counter,
}

impl MonitorHandle {
    pub fn offer(&self, input: MonitorInput) {
        if self.sender.try_send(input).is_err() {
            self.dropped.increment(1);
        }
    }
}

/// Starts the monitor thread of a worker; it ends when every handle is dropped.
pub fn start(
    config: MonitoringConfig,
    features: Vec<String>,
    variants: Vec<String>,
    models: watch::Receiver<Arc<ModelSet>>,
    alerts: Alerts,
) -> (MonitorHandle, std::thread::JoinHandle<()>) {
    // Small on purpose: a batch holds up to ~1000 rows, and a long queue would make the
    // monitor judge stale data; when it is behind, inputs are dropped and counted.
    let (sender, receiver) = sync_channel(16);
    let monitor = Monitor::new(config, features, variants, models, alerts);
    // Its own thread: busy partition tasks would otherwise starve it of the runtime.
    // Entering the runtime lets it publish alert records.
    let runtime = tokio::runtime::Handle::current();
    let task = std::thread::Builder::new()
        .name("augur-monitor".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            monitor.run(receiver)
        })
        .expect("spawning a thread");
    let handle = MonitorHandle {
        sender,
        dropped: metrics::counter!(m::MONITOR_DROPPED),
    };
    (handle, task)
}

/// Whether the monitor tests its windows now: every `check_every` rows, however fast
/// they come, so that a drift is judged within the same number of events on a backlog
/// as on a live stream (a wall-clock limit on checks made a backlog drained at 230k
/// rows/s wait 23k rows between checks). A check costs about 1–2 ms for the reference
/// topology, under 1 µs per row; a monitor that still falls behind drops inputs and
/// counts them. A stream that stopped (`idle`: nothing arrived for a second) is judged
/// on whatever arrived since the last check, once `IDLE_CHECK` has passed.
fn check_due(
    idle: bool,
    fresh: bool,
    rows_since_check: usize,
    check_every: usize,
    since_last_check: Option<Duration>,
) -> bool {
    if idle {
        fresh && since_last_check.is_none_or(|s| s >= IDLE_CHECK)
    } else {
        rows_since_check >= check_every
    }
}

/// A reference distribution prepared for testing: sorted sample, PSI edges and shares.
struct Baseline {
    sorted: Vec<f64>,
    edges: Vec<f64>,
    shares: Vec<f64>,
}

impl Baseline {
    fn new(sample: &[f64]) -> Option<Baseline> {
        let mut sorted: Vec<f64> = sample.iter().copied().filter(|x| !x.is_nan()).collect();
        if sorted.len() < 2 {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let edges = stats::psi_edges(&sorted);
        let shares = stats::bin_shares(&sorted, &edges);
        Some(Baseline {
            sorted,
            edges,
            shares,
        })
    }
}

/// The champion's reference, prepared once per champion version.
struct Prepared {
    version: u32,
    /// (topology feature index, baseline) of every watched feature.
    features: Vec<(usize, Baseline)>,
    score: Option<Baseline>,
    positive_rate: Option<f64>,
    threshold: f64,
}

#[derive(Default)]
struct Alarm {
    bad: u32,
    good: u32,
    firing: bool,
    quiet_until: Option<Instant>,
}

struct Monitor {
    config: MonitoringConfig,
    cooldown: Duration,
    features: Vec<String>,
    variants: Vec<String>,
    models: watch::Receiver<Arc<ModelSet>>,
    alerts: Alerts,
    prepared: Option<Prepared>,
    windows: Vec<VecDeque<f64>>,
    score_window: VecDeque<f64>,
    labels: HashMap<(u32, u8), VecDeque<(f64, bool)>>,
    alarms: HashMap<(&'static str, String), Alarm>,
    rows_since_check: usize,
    last_check: Option<Instant>,
    rows_seen: u64,
    /// The newest event time seen from each input partition: partitions drained at
    /// their own pace can be far apart, and an alert says how far each had got (and
    /// the newest of them).
    partition_ts: BTreeMap<i32, i64>,
    scratch: Vec<f64>,
}

impl Monitor {
    fn new(
        config: MonitoringConfig,
        features: Vec<String>,
        variants: Vec<String>,
        models: watch::Receiver<Arc<ModelSet>>,
        alerts: Alerts,
    ) -> Monitor {
        Monitor {
            cooldown: parse_duration(&config.cooldown).expect("validated"),
            windows: vec![VecDeque::new(); features.len()],
            config,
            features,
            variants,
            models,
            alerts,
            prepared: None,
            score_window: VecDeque::new(),
            labels: HashMap::new(),
            alarms: HashMap::new(),
            rows_since_check: 0,
            last_check: None,
            rows_seen: 0,
            partition_ts: BTreeMap::new(),
            scratch: Vec::new(),
        }
    }

    fn run(mut self, inputs: Receiver<MonitorInput>) {
        let mut fresh = false;
        loop {
            let idle = match inputs.recv_timeout(Duration::from_secs(1)) {
                Ok(MonitorInput::Rows {
                    partition,
                    rows,
                    scores,
                    max_ts,
                }) => {
                    self.add_rows(partition, &rows, &scores, max_ts);
                    fresh = true;
                    false
                }
                Ok(MonitorInput::Labels(labels)) => {
                    self.add_labels(&labels);
                    fresh = true;
                    false
                }
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let due = check_due(
                idle,
                fresh,
                self.rows_since_check,
                self.config.check_every,
                self.last_check.map(|t| t.elapsed()),
            );
            if due {
                fresh = false;
                self.rows_since_check = 0;
                let started = Instant::now();
                self.last_check = Some(started);
                self.check();
                metrics::histogram!(m::MONITOR_CHECK_SECONDS)
                    .record(started.elapsed().as_secs_f64());
            }
        }
    }

    fn prepare(&mut self) {
        let set = self.models.borrow().clone();
        let meta = &set.champion.meta;
        if self
            .prepared
            .as_ref()
            .is_some_and(|p| p.version == meta.version)
        {
            return;
        }
        let reference = meta.reference.clone().unwrap_or_default();
        let watched =
            |name: &String| self.config.features.is_empty() || self.config.features.contains(name);
        let features = self
            .features
            .iter()
            .enumerate()
            .filter(|(_, name)| watched(name))
            .filter_map(|(i, name)| {
                let d = reference.features.get(name)?;
                Some((i, Baseline::new(&d.sample)?))
            })
            .collect();
        self.prepared = Some(Prepared {
            version: meta.version,
            features,
            score: reference
                .score
                .as_ref()
                .and_then(|d| Baseline::new(&d.sample)),
            // The predicted positive rate is judged against the model's own mean score
            // on the reference rows (its label rate would mix in calibration, which
            // is model quality, not drift); without a score sample, the label rate.
            positive_rate: reference
                .score
                .as_ref()
                .filter(|d| !d.sample.is_empty())
                .map(|d| d.sample.iter().sum::<f64>() / d.sample.len() as f64)
                .or(reference.positive_rate),
            threshold: meta.threshold,
        });
    }

    fn add_rows(&mut self, partition: i32, rows: &[f64], scores: &[f64], max_ts: i64) {
        let stride = self.features.len();
        let limit = self.config.window;
        self.prepare();
        let prepared = self.prepared.as_ref().expect("prepared above");
        for (i, _) in &prepared.features {
            let window = &mut self.windows[*i];
            for row in rows.chunks_exact(stride) {
                if window.len() == limit {
                    window.pop_front();
                }
                window.push_back(row[*i]);
            }
        }
        for &s in scores {
            if self.score_window.len() == limit {
                self.score_window.pop_front();
            }
            self.score_window.push_back(s);
        }
        self.rows_since_check += scores.len();
        self.rows_seen += scores.len() as u64;
        let newest = self.partition_ts.entry(partition).or_insert(max_ts);
        *newest = (*newest).max(max_ts);
    }

    fn add_labels(&mut self, labels: &[Labeled]) {
        for l in labels {
            let window = self.labels.entry((l.version, l.arm)).or_default();
            if window.len() == self.config.label_window {
                window.pop_front();
            }
            window.push_back((l.score, l.label));
        }
    }

    /// Tests every window and moves the alarms.
    fn check(&mut self) {
        self.prepare();
        let Some(prepared) = self.prepared.take() else {
            return;
        };
        let model = self.models.borrow().champion.meta.name.clone();
        for (i, baseline) in &prepared.features {
            let name = self.features[*i].clone();
            let window = std::mem::take(&mut self.windows[*i]);
            self.drift("feature_drift", &name, &window, baseline);
            self.windows[*i] = window;
        }
        if let Some(baseline) = &prepared.score {
            let window = std::mem::take(&mut self.score_window);
            self.drift("prediction_drift", "score", &window, baseline);
            self.score_window = window;
        }
        if let (Some(reference), true) = (
            prepared.positive_rate,
            self.score_window.len() >= self.config.min_samples,
        ) {
            let mean = self.score_window.iter().sum::<f64>() / self.score_window.len() as f64;
            metrics::gauge!(m::DRIFT_POSITIVE_RATE).set(mean);
            metrics::gauge!(m::DRIFT_REFERENCE_POSITIVE_RATE).set(reference);
            let tolerance = self.config.positive_rate_tolerance;
            let bad = (mean - reference).abs() > tolerance * reference;
            let details = serde_json::json!({
                "mean_score": mean, "reference_positive_rate": reference,
                "tolerance": tolerance, "window": self.score_window.len(),
            });
            let message = format!(
                "mean score {mean:.4} vs reference {reference:.4} (±{:.0}%)",
                tolerance * 100.0
            );
            self.judge("positive_rate", model.clone(), bad, message, details);
        }
        self.quality(&model, prepared.threshold);
        self.prepared = Some(prepared);
    }

    fn drift(
        &mut self,
        alert: &'static str,
        name: &str,
        window: &VecDeque<f64>,
        baseline: &Baseline,
    ) {
        if window.len() < self.config.min_samples {
            return;
        }
        self.scratch.clear();
        self.scratch
            .extend(window.iter().copied().filter(|x| !x.is_nan()));
        self.scratch.sort_by(f64::total_cmp);
        let psi = stats::psi(
            &baseline.shares,
            &stats::bin_shares(&self.scratch, &baseline.edges),
        );
        // The exact p-value costs O(n · band), up to O(n · m) under strong drift. It is
        // computed only where it can change the decision: with the PSI past its
        // threshold and the asymptotic p-value not already 100× below the KS
        // threshold. Elsewhere the asymptotic value is exported.
        let asymptotic = stats::ks_2samp_asymptotic(&baseline.sorted, &self.scratch);
        let ks = if psi > self.config.psi && asymptotic.p_value >= self.config.ks_p_value / 100.0 {
            stats::ks_2samp(&baseline.sorted, &self.scratch)
        } else {
            asymptotic
        };
        let labels = [("feature", name.to_owned())];
        metrics::gauge!(m::DRIFT_KS_STATISTIC, &labels).set(ks.statistic);
        metrics::gauge!(m::DRIFT_KS_P_VALUE, &labels).set(ks.p_value);
        metrics::gauge!(m::DRIFT_PSI, &labels).set(psi);
        let bad = ks.p_value < self.config.ks_p_value && psi > self.config.psi;
        let details = serde_json::json!({
            "ks_statistic": ks.statistic, "ks_p_value": ks.p_value, "psi": psi,
            "window": self.scratch.len(), "reference": baseline.sorted.len(),
        });
        let message = format!(
            "{name}: KS {:.4} (p = {:.2e}), PSI {psi:.3} against the training reference",
            ks.statistic, ks.p_value
        );
        self.judge(alert, name.to_owned(), bad, message, details);
    }

    fn quality(&mut self, model: &str, threshold: f64) {
        let mut keys: Vec<(u32, u8)> = self.labels.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let window = &self.labels[&key];
            let variant = self
                .variants
                .get(key.1 as usize)
                .cloned()
                .unwrap_or_else(|| key.1.to_string());
            let labels = [
                ("model", model.to_owned()),
                ("version", key.0.to_string()),
                ("variant", variant.clone()),
            ];
            metrics::gauge!(m::QUALITY_LABELS, &labels).set(window.len() as f64);
            if window.len() < self.config.min_labels {
                continue;
            }
            let mut scored: Vec<(f64, bool)> = window.iter().copied().collect();
            let log_loss = stats::log_loss(&scored);
            let accuracy = scored
                .iter()
                .filter(|(s, y)| (*s >= threshold) == *y)
                .count() as f64
                / scored.len() as f64;
            let auc = stats::auc(&mut scored);
            metrics::gauge!(m::QUALITY_LOG_LOSS, &labels).set(log_loss);
            metrics::gauge!(m::QUALITY_ACCURACY, &labels).set(accuracy);
            let Some(auc) = auc else {
                continue;
            };
            metrics::gauge!(m::QUALITY_AUC, &labels).set(auc);
            let subject = format!("{model} v{} {variant}", key.0);
            let details = serde_json::json!({
                "auc": auc, "log_loss": log_loss, "accuracy": accuracy,
                "labels": scored.len(), "auc_floor": self.config.auc_floor,
            });
            let message = format!(
                "{subject}: rolling AUC {auc:.3} (floor {}), log loss {log_loss:.4}",
                self.config.auc_floor
            );
            self.judge(
                "model_quality",
                subject,
                auc < self.config.auc_floor,
                message,
                details,
            );
        }
    }

    /// Moves one alarm: fire after `raise_after` bad checks in a row (unless cooling
    /// down), resolve after `clear_after` good ones.
    fn judge(
        &mut self,
        alert: &'static str,
        subject: String,
        bad: bool,
        message: String,
        mut details: serde_json::Value,
    ) {
        let now = Instant::now();
        let (raise_after, clear_after, cooldown) = (
            self.config.raise_after,
            self.config.clear_after,
            self.cooldown,
        );
        let alarm = self.alarms.entry((alert, subject.clone())).or_default();
        if bad {
            alarm.bad += 1;
            alarm.good = 0;
        } else {
            alarm.good += 1;
            alarm.bad = 0;
        }
        let change = if !alarm.firing
            && alarm.bad >= raise_after
            && alarm.quiet_until.is_none_or(|t| now >= t)
        {
            alarm.firing = true;
            Some(true)
        } else if alarm.firing && alarm.good >= clear_after {
            alarm.firing = false;
            alarm.quiet_until = Some(now + cooldown);
            Some(false)
        } else {
            None
        };
        if let Some(firing) = change {
            let newest = self.partition_ts.values().copied().max();
            details["event_ts"] = serde_json::json!(newest.unwrap_or(i64::MIN));
            details["partition_event_ts"] = serde_json::json!(self.partition_ts);
            details["rows_seen"] = serde_json::json!(self.rows_seen);
            self.alerts.set(alert, &subject, firing, &message, details);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_stream_is_checked_every_check_every_rows() {
        let just_now = Some(Duration::from_millis(1));
        assert!(check_due(false, true, 2_000, 2_000, just_now));
        assert!(check_due(false, true, 2_256, 2_000, None));
        assert!(!check_due(false, true, 1_999, 2_000, just_now));
    }

    #[test]
    fn a_stopped_stream_is_judged_on_what_arrived_after_the_idle_wait() {
        let (soon, late) = (Some(Duration::from_secs(1)), Some(IDLE_CHECK));
        assert!(!check_due(true, true, 10, 2_000, soon));
        assert!(check_due(true, true, 10, 2_000, late));
        assert!(check_due(true, true, 10, 2_000, None));
        // Nothing new since the last check: nothing to judge.
        assert!(!check_due(true, false, 0, 2_000, late));
    }
}
