//! The offline side: the same state and feature functions as the stream, replayed over
//! recorded events. `backfill` writes point-in-time training data with labels,
//! `skew_report` checks logged online features against it, `score` is batch prediction.
//! No Kafka here except as an input; nothing in this module runs on the stream's path.

pub mod input;
pub mod labels;
mod output;
mod score;
mod skew;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub use input::{EventInput, InputError, Location};
pub use output::{OutputError, RowWriter};
pub use score::{score, ScoreSummary};
pub use skew::{skew_report, LoggedSource, SkewReport};

use crate::codec::{Event, Reason, Rejection, TypeMask};
use crate::features::{FeatureSet, Scratch};
use crate::state::UserState;
use labels::UserLabels;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Other(String),
}

/// One output row: an event's point-in-time features and, for scored events, its label.
#[derive(Debug, Clone)]
pub struct Row {
    pub event_id: String,
    pub user_id: String,
    pub ts: i64,
    pub features: Box<[f64]>,
    /// `None` for events that are not scored (written with `--all-events`).
    pub label: Option<bool>,
}

struct UserReplay {
    state: UserState,
    labels: UserLabels<Row>,
}

/// Replays events through the stream's feature functions, per user in arrival order.
pub struct Replay<'f> {
    features: &'f FeatureSet,
    scored: TypeMask,
    all_events: bool,
    users: HashMap<String, UserReplay>,
    scratch: Scratch,
    values: Vec<f64>,
}

impl<'f> Replay<'f> {
    pub fn new(features: &'f FeatureSet, scored: TypeMask, all_events: bool) -> Self {
        Replay {
            features,
            scored,
            all_events,
            users: HashMap::new(),
            scratch: Scratch::default(),
            values: vec![0.0; features.len()],
        }
    }

    /// Applies one event; finished rows (unscored ones at once, scored ones when their
    /// label is settled) go to `out`. A late event is refused, as in the stream.
    pub fn apply(&mut self, mut event: Event, mut out: impl FnMut(Row)) -> Result<(), Rejection> {
        let user = match self.users.get_mut(&event.user_id) {
            Some(user) => user,
            None => self
                .users
                .entry(event.user_id.clone())
                .or_insert_with(|| UserReplay {
                    state: self.features.new_state(),
                    labels: UserLabels::default(),
                }),
        };
        if let Err(late) =
            self.features
                .apply_event(&mut user.state, &event, &mut self.values, &mut self.scratch)
        {
            return Err(Rejection::new(
                Reason::Late,
                format!(
                    "event ts {} is {} ms behind the user's newest event",
                    event.ts, late.behind_ms
                ),
            ));
        }
        let scored = self.scored.contains(event.kind);
        if scored || self.all_events {
            // The row takes the event's ids: labels only need its item, type and time.
            let row = Row {
                event_id: std::mem::take(&mut event.event_id),
                user_id: std::mem::take(&mut event.user_id),
                ts: event.ts,
                features: self.values.clone().into_boxed_slice(),
                label: None,
            };
            if scored {
                user.labels.observe(&event, Some(row));
            } else {
                user.labels.observe(&event, None);
                out(row);
            }
        } else {
            user.labels.observe(&event, None);
        }
        let horizon = user.state.max_ts - self.features.lateness_ms();
        user.labels.settle(horizon, |mut row, label| {
            row.label = Some(label);
            out(row);
        });
        Ok(())
    }

    /// Settles every open label (end of input).
    pub fn finish(&mut self, mut out: impl FnMut(Row)) {
        let mut users: Vec<(&String, &mut UserReplay)> = self
            .users
            .iter_mut()
            .filter(|(_, u)| !u.labels.is_idle())
            .collect();
        users.sort_by(|a, b| a.0.cmp(b.0)); // deterministic output order
        for (_, user) in users {
            user.labels.settle_all(|mut row, label| {
                row.label = Some(label);
                out(row);
            });
        }
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Replays every record of `input`, then settles the open labels. Bad and late
    /// records are refused into `rejections`; every finished row goes to `on_row`.
    /// Returns the number of input records.
    pub fn run(
        &mut self,
        input: &EventInput,
        rejections: &mut Rejections,
        mut progress: Option<&mut Progress>,
        mut on_row: impl FnMut(Row),
    ) -> Result<u64, InputError> {
        let source = input.describe();
        let size = input.size_hint();
        let mut events = 0u64;
        input.for_each(crate::codec::now_ms(), |decoded, location| {
            events += 1;
            if let Err(rejection) = decoded.and_then(|event| self.apply(event, &mut on_row)) {
                rejections.record(&source, &location, &rejection);
            }
            if let Some(progress) = progress.as_deref_mut() {
                progress.tick(events, self.users(), location.fraction(size));
            }
        })?;
        self.finish(on_row);
        Ok(events)
    }
}

/// Input records refused, by reason, with the first few kept for the report.
#[derive(Debug, Default)]
pub struct Rejections {
    pub by_reason: BTreeMap<&'static str, u64>,
    pub examples: Vec<String>,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl Rejections {
    /// Also writes every rejection as a JSON line to `path`.
    pub fn with_file(path: &Path) -> std::io::Result<Rejections> {
        Ok(Rejections {
            file: Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
            ..Default::default()
        })
    }

    pub fn record(&mut self, source: &str, location: &Location, rejection: &Rejection) {
        *self.by_reason.entry(rejection.reason.as_str()).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples
                .push(format!("{source} {location}: {rejection}"));
        }
        if let Some(file) = &mut self.file {
            let line = serde_json::json!({
                "source": source, "location": location.to_string(),
                "reason": rejection.reason.as_str(), "error": rejection.detail,
            });
            let _ = writeln!(file, "{line}");
        }
    }

    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }

    /// One line per reason and the first examples, for the end of a run.
    pub fn report(&self) -> String {
        if self.by_reason.is_empty() {
            return "no input records refused".into();
        }
        let mut text = format!("{} input records refused:", self.total());
        for (reason, n) in &self.by_reason {
            text += &format!(" {reason}={n}");
        }
        for example in &self.examples {
            text += &format!("\n  e.g. {example}");
        }
        text
    }
}

/// A progress line on stderr, at most once a second.
pub struct Progress {
    label: &'static str,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    pub fn new(label: &'static str) -> Progress {
        use std::io::IsTerminal;
        let now = Instant::now();
        Progress {
            label,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// `fraction`: how much of the input is read, when the input's size is known.
    pub fn tick(&mut self, events: u64, users: usize, fraction: Option<f64>) {
        if events % 65_536 != 0 || self.last.elapsed().as_secs_f64() < 1.0 {
            return;
        }
        self.last = Instant::now();
        let rate = events as f64 / self.started.elapsed().as_secs_f64();
        let bar = match fraction {
            Some(f) => {
                let filled = (f.clamp(0.0, 1.0) * 30.0) as usize;
                format!(
                    "[{}{}] {:>3.0}% ",
                    "#".repeat(filled),
                    ".".repeat(30 - filled),
                    f * 100.0
                )
            }
            None => String::new(),
        };
        let line = format!(
            "{}: {bar}{events} events, {users} users, {rate:.0} events/s",
            self.label
        );
        if self.tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }

    pub fn done(&self, events: u64) -> f64 {
        if self.tty {
            eprintln!();
        }
        events as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// What a backfill did.
#[derive(Debug)]
pub struct BackfillSummary {
    pub events: u64,
    pub rows: u64,
    pub users: usize,
    pub events_per_second: f64,
    pub rejections: Rejections,
}

/// Replays `input` and writes rows to `out` (`.parquet` or `.csv`).
pub fn backfill(
    features: &FeatureSet,
    scored: TypeMask,
    input: &EventInput,
    out: &Path,
    all_events: bool,
    mut rejections: Rejections,
) -> Result<BackfillSummary, OfflineError> {
    let mut writer = output::create(out, features.names())?;
    let mut replay = Replay::new(features, scored, all_events);
    let mut progress = Progress::new("backfill");
    let mut rows = 0u64;
    let mut write_error = None;
    let events = replay.run(input, &mut rejections, Some(&mut progress), |row| {
        rows += 1;
        if let Err(e) = writer.write(&row) {
            write_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    writer.finish()?;
    Ok(BackfillSummary {
        events,
        rows,
        users: replay.users(),
        events_per_second: progress.done(events),
        rejections,
    })
}
