//! One input partition's task: it owns the partition's users, applies events, scores
//! them in batches, emits predictions and dead letters, and checkpoints. Nothing on
//! this path is shared with other partitions, so it takes no locks.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{ExperimentMode, PartitionError, Shared};
use crate::codec::{decode_event, now_ms, Event, EventType, Reason, Rejection};
use crate::features::Scratch;
use crate::metrics as m;
use crate::monitor::{Labeled, MonitorInput};
use crate::online_store::FeatureUpdate;
use crate::serving::experiment::{decode_pending, encode_pending, Bandit, ClickJoin, Posteriors};
use crate::serving::shadow::{
    score_batch, ShadowBatch, ShadowEvent, ShadowOutput, ShadowRecord, ShadowScratch,
};
use crate::serving::ModelSet;
use crate::sink::{
    dead_letter_headers, encode_prediction, OutputProducer, PartitionTransactions,
    PendingDeliveries, Prediction,
};
use crate::source::InputRecord;
use crate::state::store::BanditChanges;
use crate::state::store::PartitionStore;
use crate::state::UserState;
use crate::util::now_us;

/// What the consumer thread tells a partition task, beside its records. These travel on
/// their own channel, so a task whose record queue is full still hears them at once.
pub enum Control {
    /// Checkpoint what was processed, then stop; the reply carries the committed next
    /// offset, if any. Records still queued are not processed: the partition's next
    /// owner fetches them again from that offset.
    Stop(std::sync::mpsc::Sender<Option<i64>>),
    /// Stop at once without checkpointing, because the state store failed: nothing
    /// since the last checkpoint is kept, and the partition later resumes from it.
    Abandon(std::sync::mpsc::Sender<Option<i64>>),
}

/// Most unacknowledged outputs a partition keeps before it waits for acks.
const MAX_PENDING: usize = 50_000;
/// Most impressions waiting for a quality label per partition.
const MAX_PENDING_LABELS: usize = 1_000_000;

/// Pipeline stages timed per batch (decode, state and features on every 8th record).
const STAGES: [&str; 5] = ["decode", "state", "features", "score", "produce"];
const DECODE: usize = 0;
const STATE: usize = 1;
const FEATURES: usize = 2;
const SCORE: usize = 3;
const PRODUCE: usize = 4;
const SAMPLE_EVERY: u32 = 8;

struct HotUser {
    state: UserState,
    /// Its share of the hot-state budget (id and state), as of its last checkpoint.
    bytes: usize,
    dirty: bool,
    touched: Instant,
    /// The latest event's features and version, kept for the online-store mirror.
    last: Option<FeatureUpdate>,
}

/// A checkpoint being written while the partition goes on: its outputs' acknowledgements
/// awaited, then its sled batch written, then its offset handed over for commit.
struct InFlight {
    handle: tokio::task::JoinHandle<Result<(), PartitionError>>,
    next_offset: i64,
}

/// A scored event waiting for its model call.
struct Scored {
    event: Event,
    input_ts: i64,
    received_us: i64,
    polled_us: i64,
    offset: i64,
    /// The experiment arm that scores it (0 without an experiment).
    arm: usize,
}

pub struct PartitionTask {
    shared: Arc<Shared>,
    partition: i32,
    store: PartitionStore,
    /// User ids come from producers: foldhash is fast and seeded per process.
    users: HashMap<String, HotUser, foldhash::fast::RandomState>,
    /// The sum of the hot users' `bytes`.
    hot_bytes: usize,
    dirty: Vec<String>,
    /// Next offset to process; None until known (no checkpoint and no record yet).
    next_offset: Option<i64>,
    checkpointed: Option<i64>,
    /// The checkpoint being written, if any (at most one at a time).
    in_flight: Option<InFlight>,
    /// Where this partition's outputs go: the worker's shared producer, or with
    /// `delivery: exactly_once` the partition's transactional one.
    output: OutputProducer,
    /// `delivery: exactly_once`: the partition's transactional producer and whether a
    /// transaction is open.
    txn: Option<PartitionTransactions>,
    /// Shadow scoring on this task (exactly_once only).
    shadow_scratch: ShadowScratch,
    shadow_records: Vec<ShadowRecord>,
    pending: PendingDeliveries,
    scratch: Scratch,
    values: Vec<f64>,
    rows: Vec<f64>,
    scored: Vec<Scored>,
    scores: Vec<f64>,
    model_input: Vec<f32>,
    buffer: Vec<u8>,
    last_eviction: Instant,
    /// When the current batch began: the time a user is marked as touched (eviction
    /// works in seconds; one clock read per batch instead of one per event).
    batch_started: Instant,
    /// When the last checkpoint began.
    checkpoint_started: Instant,
    /// The broker timestamp (ms) of the newest record taken, to tell how far behind
    /// the partition is.
    newest_input_ms: Option<i64>,
    postponed_counter: metrics::Counter,
    /// Updates the mirror's full queue handed back, offered again at the next checkpoint.
    unmirrored: Vec<FeatureUpdate>,
    /// The model set the last batch used.
    models: Arc<ModelSet>,
    bandit: Option<Bandit>,
    /// The label join for quality monitoring: (model version, arm, score) per impression.
    quality: Option<ClickJoin<(u32, u8, f32)>>,
    /// This batch's clicks (offset, user, item, ts), joined after scoring.
    batch_clicks: Vec<(i64, String, String, i64)>,
    batch_max_ts: i64,
    /// Nanoseconds per stage in this batch, and whether this record is timed.
    stage_ns: [u64; 5],
    stage_histograms: Vec<metrics::Histogram>,
    timed: bool,
    records_seen: u32,
    hot_bytes_gauge: metrics::Gauge,
    /// Row indices of each arm in the current batch, and their scores (reused).
    arm_rows: Vec<Vec<usize>>,
    arm_input: Vec<f64>,
    arm_scores: Vec<f64>,
    events_counter: metrics::Counter,
    /// Prediction counters by (model version, arm).
    prediction_counters: HashMap<(u32, usize), metrics::Counter>,
    e2e_histogram: metrics::Histogram,
    batch_histogram: metrics::Histogram,
    checkpoint_histogram: metrics::Histogram,
    hot_users_gauge: metrics::Gauge,
}

impl PartitionTask {
    pub fn new(
        shared: Arc<Shared>,
        partition: i32,
        store: PartitionStore,
        next_offset: Option<i64>,
        txn: Option<PartitionTransactions>,
    ) -> Result<Self, PartitionError> {
        let topic = shared.topic.clone();
        let p = partition.to_string();
        let width = shared.features.len();
        let bandit = match &shared.experiment {
            Some(e) => match e.mode {
                ExperimentMode::Bandit { max_pending, .. } => Some(restore_bandit(
                    &store,
                    partition,
                    e.arms.len(),
                    shared.features.lateness_ms(),
                    max_pending,
                )?),
                ExperimentMode::Split(_) => None,
            },
            None => None,
        };
        let arms = shared.experiment.as_ref().map_or(1, |e| e.arms.len());
        let models = shared.models.borrow().clone();
        let output = match &txn {
            Some(txn) => txn.producer().clone(),
            None => shared.producer.clone(),
        };
        Ok(PartitionTask {
            events_counter: metrics::counter!(m::SOURCE_EVENTS, "topic" => topic.clone(), "partition" => p.clone()),
            prediction_counters: HashMap::new(),
            e2e_histogram: metrics::histogram!(m::E2E_LATENCY),
            batch_histogram: metrics::histogram!(m::BATCH_ROWS),
            checkpoint_histogram: metrics::histogram!(m::CHECKPOINT_SECONDS, "partition" => p.clone()),
            hot_users_gauge: metrics::gauge!(m::HOT_USERS, "partition" => p.clone()),
            hot_bytes_gauge: metrics::gauge!(m::HOT_STATE_BYTES, "partition" => p),
            quality: shared
                .monitor
                .is_some()
                .then(|| ClickJoin::in_memory(shared.features.lateness_ms(), MAX_PENDING_LABELS)),
            batch_clicks: Vec::new(),
            batch_max_ts: i64::MIN,
            stage_ns: [0; 5],
            stage_histograms: STAGES
                .iter()
                .map(|stage| metrics::histogram!(m::STAGE_SECONDS, "stage" => *stage))
                .collect(),
            timed: false,
            records_seen: 0,
            models,
            bandit,
            arm_rows: vec![Vec::new(); arms],
            arm_input: Vec::new(),
            arm_scores: Vec::new(),
            shared,
            partition,
            store,
            users: HashMap::default(),
            hot_bytes: 0,
            dirty: Vec::new(),
            next_offset,
            checkpointed: next_offset,
            in_flight: None,
            output,
            txn,
            shadow_scratch: ShadowScratch::default(),
            shadow_records: Vec::new(),
            pending: PendingDeliveries::default(),
            scratch: Scratch::default(),
            values: vec![0.0; width],
            rows: Vec::new(),
            scored: Vec::new(),
            scores: Vec::new(),
            model_input: Vec::new(),
            buffer: Vec::new(),
            last_eviction: Instant::now(),
            batch_started: Instant::now(),
            checkpoint_started: Instant::now(),
            newest_input_ms: None,
            postponed_counter: metrics::counter!(m::CHECKPOINTS_POSTPONED, "partition" => partition.to_string()),
            unmirrored: Vec::new(),
        })
    }

    /// Runs until told to stop or until an error that forbids going on (an output not
    /// acknowledged, a state store failure, a failed transaction); such an error is
    /// reported to the worker.
    pub async fn run(
        mut self,
        mut records: mpsc::Receiver<Vec<InputRecord>>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut tick = tokio::time::interval(self.shared.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let outcome = tokio::select! {
                biased;
                command = control.recv() => {
                    match command {
                        Some(Control::Stop(reply)) => {
                            let next = self.finish().await;
                            let _ = reply.send(next);
                        }
                        Some(Control::Abandon(reply)) => {
                            self.close().await;
                            drop(self);
                            let _ = reply.send(None);
                        }
                        // The source is gone (the worker is stopping).
                        None => {
                            self.finish().await;
                        }
                    }
                    return;
                }
                _ = tick.tick() => {
                    if self.postpone_checkpoint(records.len()) {
                        Ok(())
                    } else {
                        self.checkpoint().await
                    }
                }
                batch = records.recv() => match batch {
                    Some(batch) => self.process(batch).await,
                    None => {
                        self.finish().await;
                        return;
                    }
                },
            };
            if let Err(e) = outcome {
                self.close().await;
                self.fail(e);
                return;
            }
        }
    }

    /// The final checkpoint, then the transactional producer (if any) is released;
    /// returns the committed next offset, or None when the checkpoint failed (the error
    /// is reported).
    async fn finish(&mut self) -> Option<i64> {
        let result = match self.checkpoint().await {
            Ok(()) => self.settle().await,
            Err(e) => Err(e),
        };
        self.close().await;
        match result {
            Ok(()) => self.checkpointed,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// A state store failure pauses the worker's partitions until the store works again
    /// (the source reopens it); any other error stops the worker.
    fn fail(&self, error: PartitionError) {
        match error {
            PartitionError::Store(e) => self.shared.report_store_fault(self.partition, e),
            other => self.shared.report_fatal(other),
        }
    }

    /// Stops a checkpoint still being written (the partition resumes from an earlier
    /// one), and with exactly_once aborts a transaction left open by an error and
    /// releases the transactional producer.
    async fn close(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.handle.abort();
            let _ = in_flight.handle.await;
        }
        if let Some(txn) = self.txn.take() {
            txn.close().await;
        }
    }

    /// exactly_once: begins a transaction unless one is open (before any output).
    async fn begin(&mut self) -> Result<(), PartitionError> {
        if let Some(txn) = &mut self.txn {
            txn.begin().await?;
        }
        Ok(())
    }

    /// Waits until every output sent so far is acknowledged. With exactly_once a
    /// failure aborts the open transaction.
    async fn wait_outputs(&mut self) -> Result<(), PartitionError> {
        let Err(e) = self.pending.wait_all().await else {
            return Ok(());
        };
        match &mut self.txn {
            Some(txn) => {
                let operation = format!("delivering a {} record", e.output);
                Err(txn.fail(&operation, e.source).await.into())
            }
            None => Err(e.into()),
        }
    }

    /// Offsets `next..offset` never arrived. On Kafka that is a transaction marker (one
    /// offset) or records removed by compaction or retention; tansu 0.6 also skips the
    /// rest of a record batch when a fetch starts inside it. Counted, and logged when
    /// more than a marker is missing, so that nothing is skipped silently.
    #[cold]
    fn offset_gap(&self, next: i64, offset: i64) {
        let missing = (offset - next) as u64;
        metrics::counter!(m::SKIPPED_OFFSETS, "partition" => self.partition.to_string())
            .increment(missing);
        if missing > 1 {
            tracing::warn!(
                topic = %self.shared.topic,
                partition = self.partition,
                expected = next,
                got = offset,
                missing,
                "input offsets skipped: the broker returned no records for them"
            );
        }
    }

    async fn process(&mut self, records: Vec<InputRecord>) -> Result<(), PartitionError> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.handle.is_finished())
        {
            self.settle().await?;
        }
        let now = now_ms();
        self.batch_started = Instant::now();
        let mut taken = 0u64;
        for record in &records {
            let offset = record.offset();
            match self.next_offset {
                Some(next) if offset < next => continue, // applied before a restart or seek
                Some(next) if offset > next => self.offset_gap(next, offset),
                _ => {}
            }
            self.next_offset = Some(offset + 1);
            taken += 1;
            let received_us = now_us();
            self.records_seen = self.records_seen.wrapping_add(1);
            self.timed = self.records_seen % SAMPLE_EVERY == 0;
            let started = self.timed.then(Instant::now);
            let decoded = self.decode(record, now);
            if let Some(t) = started {
                self.stage_ns[DECODE] += t.elapsed().as_nanos() as u64 * u64::from(SAMPLE_EVERY);
            }
            match decoded {
                Ok(event) => self.apply(event, record, received_us).await?,
                Err(rejection) => self.dead_letter(record, &rejection).await?,
            }
        }
        self.events_counter.increment(taken);
        self.shared.stats.events.fetch_add(taken, Relaxed);
        if let Some(ms) = records.last().and_then(|r| r.timestamp().to_millis()) {
            self.newest_input_ms = Some(ms);
        }
        self.score_and_emit().await?;
        for (ns, histogram) in self.stage_ns.iter_mut().zip(&self.stage_histograms) {
            if *ns > 0 {
                histogram.record(*ns as f64 / 1e9);
                *ns = 0;
            }
        }
        if self.pending.len() > MAX_PENDING {
            self.wait_outputs().await?;
        }
        if self.hot_bytes > self.budget_share() {
            // New users arrive faster than the ticks make room: checkpoint now (after
            // the one in flight is written), so that the users it wrote can leave
            // memory. Under that pressure the budget, not the interval, paces
            // checkpoints, and the partition waits for sled rather than outgrow it.
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Whether this tick's checkpoint waits: the partition is behind (more batches are
    /// queued, and its newest record was written to the broker more than one
    /// `state.checkpoint_interval` ago) and the last checkpoint began less than
    /// `state.backlog_checkpoint_interval` ago. A backlog makes most of its users dirty
    /// at every tick, so each checkpoint rewrites nearly all of them; spacing them
    /// while behind writes each user once per the longer interval. A live partition
    /// with a batch momentarily queued is not behind: larger checkpoints there hold
    /// sled's write lock longer and lengthen the tail (20k/s runs in BENCHMARKS.md).
    fn postpone_checkpoint(&self, queued_batches: usize) -> bool {
        let postpone = is_behind(
            queued_batches,
            self.newest_input_ms,
            now_ms(),
            self.shared.checkpoint_interval,
        ) && self.checkpoint_started.elapsed()
            < self.shared.backlog_checkpoint_interval;
        if postpone {
            self.postponed_counter.increment(1);
        }
        postpone
    }

    /// This partition's share of the worker's hot-state budget.
    fn budget_share(&self) -> usize {
        self.shared.max_hot_bytes / self.shared.assigned.load(Relaxed).max(1)
    }

    fn decode(&self, record: &InputRecord, now: i64) -> Result<Event, Rejection> {
        let payload = record.payload().unwrap_or_default();
        if payload.len() > self.shared.max_message_bytes {
            return Err(Rejection::new(
                Reason::Oversized,
                format!(
                    "record of {} bytes exceeds source.max_message_bytes ({})",
                    payload.len(),
                    self.shared.max_message_bytes
                ),
            ));
        }
        let key = record.key().unwrap_or_default();
        if key.is_empty() {
            return Err(Rejection::new(
                Reason::EmptyKey,
                "record has no key (expected the user_id)",
            ));
        }
        let event = decode_event(self.shared.codec, payload, now)?;
        if key != event.user_id.as_bytes() {
            return Err(Rejection::new(
                Reason::KeyMismatch,
                format!(
                    "record key {:?} differs from user_id {:?}",
                    String::from_utf8_lossy(key),
                    event.user_id
                ),
            ));
        }
        Ok(event)
    }

    async fn apply(
        &mut self,
        event: Event,
        record: &InputRecord,
        received_us: i64,
    ) -> Result<(), PartitionError> {
        let started = self.timed.then(Instant::now);
        // One lookup for a user already in memory (nearly every event of a stream).
        let user = match self.users.get_mut(&event.user_id) {
            Some(user) => user,
            None => {
                self.load_user(&event.user_id)?;
                self.users.get_mut(&event.user_id).expect("loaded above")
            }
        };
        user.touched = self.batch_started;
        let loaded = self.timed.then(Instant::now);
        let applied = self.shared.features.apply_event(
            &mut user.state,
            &event,
            &mut self.values,
            &mut self.scratch,
        );
        if let (Some(started), Some(loaded)) = (started, loaded) {
            let scale = u64::from(SAMPLE_EVERY);
            self.stage_ns[STATE] += (loaded - started).as_nanos() as u64 * scale;
            self.stage_ns[FEATURES] += loaded.elapsed().as_nanos() as u64 * scale;
        }
        if let Err(late) = applied {
            let detail = format!(
                "event ts {} is {} ms behind the user's newest event (allowed lateness {} ms)",
                event.ts,
                late.behind_ms,
                self.shared.features.lateness_ms()
            );
            return self
                .dead_letter(record, &Rejection::new(Reason::Late, detail))
                .await;
        }
        if self.shared.mirror.is_some() {
            match &mut user.last {
                Some(last) => {
                    last.offset = record.offset();
                    last.ts = event.ts;
                    last.values.copy_from_slice(&self.values);
                }
                None => {
                    user.last = Some(FeatureUpdate {
                        user_id: event.user_id.clone(),
                        partition: self.partition,
                        offset: record.offset(),
                        ts: event.ts,
                        values: self.values.clone().into_boxed_slice(),
                    })
                }
            }
        }
        if !user.dirty {
            user.dirty = true;
            self.dirty.push(event.user_id.clone());
        }
        self.batch_max_ts = self.batch_max_ts.max(event.ts);
        if self.quality.is_some() && event.kind == EventType::Click {
            self.batch_clicks.push((
                record.offset(),
                event.user_id.clone(),
                event.item_id.clone(),
                event.ts,
            ));
        }
        if let Some(bandit) = &mut self.bandit {
            let expired = bandit.advance(event.ts);
            let clicked = if event.kind == EventType::Click {
                bandit.click(&event.user_id, &event.item_id, event.ts)
            } else {
                0
            };
            if expired + clicked > 0 {
                self.publish_bandit();
            }
        }
        if self.shared.scored_types.contains(event.kind) {
            let arm = self.choose_arm(&event, record.offset());
            self.rows.extend_from_slice(&self.values);
            let input_ts = record.timestamp().to_millis().unwrap_or(event.ts);
            self.scored.push(Scored {
                event,
                input_ts,
                received_us,
                polled_us: record.polled_us(),
                offset: record.offset(),
                arm,
            });
        }
        Ok(())
    }

    /// Brings a user into the hot map: its checkpointed state, or a new one.
    fn load_user(&mut self, user_id: &str) -> Result<(), PartitionError> {
        let state = match self.store.load_user(user_id)? {
            Some(state) if self.shared.features.fits(&state) => state,
            Some(_) => {
                return Err(PartitionError::StateShape {
                    partition: self.partition,
                    user: user_id.to_owned(),
                })
            }
            None => self.shared.features.new_state(),
        };
        let bytes = user_id.len() + state.approx_bytes();
        self.hot_bytes += bytes;
        self.users.insert(
            user_id.to_owned(),
            HotUser {
                state,
                bytes,
                dirty: false,
                touched: self.batch_started,
                last: None,
            },
        );
        Ok(())
    }

    /// The arm that scores this event: sticky by user for a split; for the bandit, a
    /// Thompson draw seeded by the partition and offset (so a replay draws the same),
    /// and the impression starts waiting for its reward.
    fn choose_arm(&mut self, event: &Event, offset: i64) -> usize {
        let Some(experiment) = &self.shared.experiment else {
            return 0;
        };
        match &experiment.mode {
            ExperimentMode::Split(split) => split.arm(&experiment.name, &event.user_id),
            ExperimentMode::Bandit { seed, .. } => {
                let bandit = self.bandit.as_mut().expect("bandit mode has a bandit");
                let draw_seed = seed ^ ((self.partition as u64) << 48) ^ offset as u64;
                let arm = bandit.posteriors.choose(draw_seed);
                if event.kind == EventType::Impression
                    && !bandit.impression(&event.user_id, &event.item_id, event.ts, arm)
                {
                    metrics::counter!(m::BANDIT_UNTRACKED, "partition" => self.partition.to_string())
                        .increment(1);
                }
                arm
            }
        }
    }

    fn publish_bandit(&self) {
        let (Some(bandit), Some(experiment)) = (&self.bandit, &self.shared.experiment) else {
            return;
        };
        let p = self.partition.to_string();
        let posteriors = &bandit.posteriors;
        for (arm, name) in experiment.arms.iter().enumerate() {
            metrics::gauge!(m::BANDIT_POSTERIOR_MEAN, "arm" => name.clone(), "partition" => p.clone())
                .set(posteriors.mean(arm));
            // The posteriors' counts are the partition's settled rewards so far.
            for (reward, count) in [
                ("1", posteriors.successes[arm]),
                ("0", posteriors.failures[arm]),
            ] {
                metrics::counter!(m::BANDIT_REWARDS, "arm" => name.clone(), "reward" => reward,
                    "partition" => p.clone())
                .absolute(count);
            }
        }
        metrics::gauge!(m::BANDIT_PENDING, "partition" => p).set(bandit.pending() as f64);
    }

    async fn dead_letter(
        &mut self,
        record: &InputRecord,
        rejection: &Rejection,
    ) -> Result<(), PartitionError> {
        self.begin().await?;
        let shared = &self.shared;
        metrics::counter!(m::DEAD_LETTERS, "reason" => rejection.reason.as_str()).increment(1);
        shared.stats.dead_letters.fetch_add(1, Relaxed);
        let headers = dead_letter_headers(
            record.headers(),
            rejection.reason.as_str(),
            &rejection.detail,
            &shared.topic,
            self.partition,
            record.offset(),
        );
        tracing::debug!(partition = self.partition, offset = record.offset(), reason = %rejection.reason,
            detail = %rejection.detail, "dead-lettered");
        self.output
            .send(
                &shared.dead_letter_topic,
                record.key(),
                record.payload().unwrap_or_default(),
                Some(headers),
                &mut self.pending,
                "dead_letter",
            )
            .await;
        Ok(())
    }

    async fn score_and_emit(&mut self) -> Result<(), PartitionError> {
        if self.scored.is_empty() {
            self.join_labels(None);
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        // One snapshot per batch: a promotion lands between batches, never inside one.
        let models = shared.models.borrow().clone();
        if models.generation != self.models.generation {
            tracing::info!(
                partition = self.partition,
                offset = self.scored[0].offset,
                from = self.models.champion.meta.version,
                to = models.champion.meta.version,
                generation = models.generation,
                "partition switched models"
            );
            self.models = Arc::clone(&models);
        }
        let stride = shared.features.len();
        self.scores.clear();
        let scoring = Instant::now();
        if self.arm_rows.len() == 1 {
            for chunk in self.rows.chunks(shared.max_batch * stride) {
                self.batch_histogram.record((chunk.len() / stride) as f64);
                models
                    .scorer(0)
                    .score(chunk, stride, &mut self.model_input, &mut self.scores)?;
            }
        } else {
            self.score_by_arm(&models, stride)?;
        }
        self.stage_ns[SCORE] += scoring.elapsed().as_nanos() as u64;
        self.begin().await?;
        let producing = Instant::now();
        let variants: Vec<&str> = match &shared.experiment {
            Some(e) => e.arms.iter().map(String::as_str).collect(),
            None => vec!["champion"],
        };
        let mut runs: Vec<((u32, usize), u64)> = Vec::new();
        for (i, scored) in self.scored.iter().enumerate() {
            let meta = &models.scorer(scored.arm).meta;
            let produced_us = now_us();
            let features = shared.log_features.then(|| {
                (
                    shared.features.names(),
                    &self.rows[i * stride..(i + 1) * stride],
                )
            });
            self.buffer.clear();
            encode_prediction(
                shared.predictions_codec,
                &Prediction {
                    event: &scored.event,
                    model: &meta.name,
                    version: meta.version,
                    variant: variants[scored.arm],
                    score: self.scores[i],
                    features,
                    input_ts: scored.input_ts,
                    received_us: scored.received_us,
                    polled_us: scored.polled_us,
                    produced_us,
                },
                &mut self.buffer,
            );
            self.output
                .send(
                    &shared.predictions_topic,
                    Some(scored.event.user_id.as_bytes()),
                    &self.buffer,
                    None,
                    &mut self.pending,
                    "prediction",
                )
                .await;
            let latency_us = (produced_us - scored.input_ts * 1000).max(0) as u64;
            self.e2e_histogram.record(latency_us as f64 / 1e6);
            shared.stats.e2e_latency.record_us(latency_us);
            // Counted per run of equal (version, arm), nearly always the whole batch.
            match runs.last_mut() {
                Some((key, n)) if *key == (meta.version, scored.arm) => *n += 1,
                _ => runs.push(((meta.version, scored.arm), 1)),
            }
        }
        for ((version, arm), n) in runs {
            let meta = &models.scorer(arm).meta;
            self.prediction_counters
                .entry((version, arm))
                .or_insert_with(|| {
                    metrics::counter!(m::PREDICTIONS, "model" => meta.name.clone(),
                        "version" => version.to_string(), "variant" => variants[arm].to_owned(),
                        "topic" => shared.predictions_topic.clone(), "partition" => self.partition.to_string())
                })
                .increment(n);
        }
        self.stage_ns[PRODUCE] += producing.elapsed().as_nanos() as u64;
        let n = self.scored.len() as u64;
        shared.stats.predictions.fetch_add(n, Relaxed);
        if let Some(monitor) = &shared.monitor {
            monitor.offer(MonitorInput::Rows {
                partition: self.partition,
                rows: self.rows.clone(),
                scores: self.scores.clone(),
                max_ts: self.batch_max_ts,
            });
        }
        self.join_labels(Some(&models));
        if let Some(shadow) = &shared.shadow {
            if !models.shadows.is_empty() {
                let served = self
                    .scored
                    .iter()
                    .zip(&self.scores)
                    .map(|(s, score)| (*score, models.scorer(s.arm).meta.threshold))
                    .collect();
                let events = self
                    .scored
                    .drain(..)
                    .map(|s| ShadowEvent {
                        event: s.event,
                        input_ts: s.input_ts,
                        received_us: s.received_us,
                        polled_us: s.polled_us,
                    })
                    .collect();
                let batch = ShadowBatch {
                    set: Arc::clone(&models),
                    stride,
                    rows: std::mem::take(&mut self.rows),
                    served,
                    events,
                };
                match shadow {
                    ShadowOutput::Queue(queue) => queue.offer(batch),
                    ShadowOutput::Inline { topic, codec } => {
                        self.shadow_records.clear();
                        score_batch(
                            &batch,
                            *codec,
                            &mut self.shadow_scratch,
                            &mut self.shadow_records,
                        );
                        for record in &self.shadow_records {
                            let key = batch.events[record.event].event.user_id.as_bytes();
                            self.output
                                .send(
                                    topic,
                                    Some(key),
                                    &record.bytes,
                                    None,
                                    &mut self.pending,
                                    "shadow_prediction",
                                )
                                .await;
                        }
                    }
                }
            }
        }
        self.scored.clear();
        self.rows.clear();
        Ok(())
    }

    /// The quality label join, in offset order over this batch: impressions wait with
    /// their score; clicks and the advancing event time settle them; settled labels go
    /// to the monitor. Kept in memory only: after a restart, impressions that were
    /// waiting are not labelled.
    fn join_labels(&mut self, models: Option<&ModelSet>) {
        let Some(join) = self.quality.as_mut() else {
            return;
        };
        let mut labeled = Vec::new();
        let mut settle = |p: &(u32, u8, f32), label: bool| {
            labeled.push(Labeled {
                version: p.0,
                arm: p.1,
                score: f64::from(p.2),
                label,
            })
        };
        let mut clicks = self.batch_clicks.drain(..).peekable();
        if let Some(models) = models {
            for (s, score) in self.scored.iter().zip(&self.scores) {
                while let Some((_, user, item, ts)) = clicks.next_if(|c| c.0 < s.offset) {
                    join.click(&user, &item, ts, &mut settle);
                }
                if s.event.kind == EventType::Impression {
                    let version = models.scorer(s.arm).meta.version;
                    let payload = (version, s.arm as u8, *score as f32);
                    join.impression(&s.event.user_id, &s.event.item_id, s.event.ts, payload);
                }
            }
        }
        for (_, user, item, ts) in clicks {
            join.click(&user, &item, ts, &mut settle);
        }
        join.advance(self.batch_max_ts, &mut settle);
        if let (false, Some(monitor)) = (labeled.is_empty(), &self.shared.monitor) {
            monitor.offer(MonitorInput::Labels(labeled));
        }
    }

    /// Scores each arm's rows with the arm's model, then puts the scores back in row
    /// order.
    fn score_by_arm(&mut self, models: &ModelSet, stride: usize) -> Result<(), PartitionError> {
        for rows in &mut self.arm_rows {
            rows.clear();
        }
        for (i, s) in self.scored.iter().enumerate() {
            self.arm_rows[s.arm].push(i);
        }
        self.scores.resize(self.scored.len(), 0.0);
        let max_batch = self.shared.max_batch;
        for (arm, rows) in self.arm_rows.iter().enumerate() {
            for chunk in rows.chunks(max_batch) {
                self.arm_input.clear();
                for &i in chunk {
                    self.arm_input
                        .extend_from_slice(&self.rows[i * stride..(i + 1) * stride]);
                }
                self.batch_histogram.record(chunk.len() as f64);
                self.arm_scores.clear();
                models.scorer(arm).score(
                    &self.arm_input,
                    stride,
                    &mut self.model_input,
                    &mut self.arm_scores,
                )?;
                for (&i, &score) in chunk.iter().zip(&self.arm_scores) {
                    self.scores[i] = score;
                }
            }
        }
        Ok(())
    }

    /// Outputs acknowledged → changed users and next offset in one sled batch → offset
    /// handed to the consumer for commit.
    ///
    /// The partition does not stop for it: the changed users are encoded here and
    /// marked clean, and the rest (waiting for the outputs' acknowledgements, sled's
    /// atomic batch and flush, the commit request) runs as its own task while records
    /// go on being processed. One checkpoint is written at a time: the next tick first
    /// waits for the previous one ([`PartitionTask::settle`]), so sled's checkpoints
    /// stay in offset order, and only then do idle, clean users leave the hot map (a
    /// user marked clean is not in sled until its checkpoint is written, so evicting
    /// it earlier would reload an older state).
    ///
    /// With `delivery: exactly_once` it is sequential: changelog records sent →
    /// outputs acknowledged → next offset added to the transaction and the transaction
    /// committed → sled batch; the consumer commits nothing (the transaction did).
    ///
    /// Why sled and the transaction agree: sled is written only after the commit
    /// returned, so sled is never ahead of the committed transactions. It is behind in
    /// one window: the commit succeeded (or succeeded on the broker though the call
    /// failed, e.g. timed out) and the process died, or the sled write failed, before
    /// the sled batch. The restart then finds the group's committed offset (written by
    /// the transaction) past the sled offset, and restores the partition from the
    /// changelog, read with read_committed, whose last marker is that same committed
    /// offset (`source::SourceContext::assign`); resuming from sled would emit the
    /// window's outputs twice. A failure before the commit aborts the transaction (or
    /// leaves it to the broker to abort): nothing of it is visible to read_committed
    /// readers, sled still holds the previous checkpoint, and the restart resumes there.
    async fn checkpoint(&mut self) -> Result<(), PartitionError> {
        self.settle().await?;
        for user in &self.dirty {
            if let Some(hot) = self.users.get_mut(user) {
                let bytes = user.len() + hot.state.approx_bytes();
                self.hot_bytes = self.hot_bytes - hot.bytes + bytes;
                hot.bytes = bytes;
            }
        }
        self.evict_idle();
        self.enforce_budget();
        self.hot_users_gauge.set(self.users.len() as f64);
        self.hot_bytes_gauge.set(self.hot_bytes as f64);
        let Some(next_offset) = self.next_offset else {
            return Ok(());
        };
        if self.checkpointed == Some(next_offset)
            && self.dirty.is_empty()
            && self.pending.is_empty()
            && !self.txn.as_ref().is_some_and(|t| t.is_open())
        {
            return Ok(());
        }
        let started = Instant::now();
        self.checkpoint_started = started;
        self.write_changelog(next_offset).await?;
        if self.txn.is_some() {
            self.wait_outputs().await?;
            if let Some(txn) = &mut self.txn {
                txn.commit(next_offset).await?;
            }
        }
        let users = &self.users;
        let dirty = self
            .dirty
            .iter()
            .filter_map(|u| users.get(u).map(|h| (u.as_str(), &h.state)));
        let bandit = self.bandit.as_mut().map(|bandit| {
            let (users, posteriors_changed) = bandit.take_changes();
            let mut changes = BanditChanges::default();
            if posteriors_changed {
                let mut bytes = Vec::new();
                bandit.posteriors.encode(&mut bytes);
                changes.posteriors = Some(bytes);
            }
            for (user, list) in users {
                let value = (!list.is_empty()).then(|| {
                    let mut bytes = Vec::new();
                    encode_pending(&list, &mut bytes);
                    bytes
                });
                changes.pending.push((user, value));
            }
            changes
        });
        let batch = self.store.prepare(dirty, bandit, next_offset);
        self.publish_bandit();
        let mut changed = std::mem::take(&mut self.unmirrored);
        for user in self.dirty.drain(..) {
            if let Some(hot) = self.users.get_mut(&user) {
                hot.dirty = false;
                if let Some(last) = &hot.last {
                    changed.push(last.clone());
                }
            }
        }
        if let Some(mirror) = &self.shared.mirror {
            // Never waits: what the full queue hands back is offered again next time.
            self.unmirrored = mirror.offer(changed);
        }
        let mut pending = std::mem::take(&mut self.pending);
        let writer = self.store.writer();
        let shared = Arc::clone(&self.shared);
        let partition = self.partition;
        let histogram = self.checkpoint_histogram.clone();
        let commit = self.txn.is_none();
        let handle = tokio::spawn(async move {
            pending.wait_all().await?;
            writer.write(batch).await?;
            if commit {
                shared.request_commit(partition, next_offset);
            }
            histogram.record(started.elapsed().as_secs_f64());
            Ok(())
        });
        self.in_flight = Some(InFlight {
            handle,
            next_offset,
        });
        if self.txn.is_some() {
            self.settle().await?;
        }
        Ok(())
    }

    /// Waits for the checkpoint being written, if any; once it is, its offset is the
    /// partition's checkpoint.
    async fn settle(&mut self) -> Result<(), PartitionError> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        match in_flight.handle.await {
            Ok(Ok(())) => {
                self.checkpointed = Some(in_flight.next_offset);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(join) => Err(PartitionError::Checkpoint {
                partition: self.partition,
                message: join.to_string(),
            }),
        }
    }

    /// Keeps the hot map within this partition's share of `state.max_hot_bytes`: clean
    /// users are in sled (the previous checkpoint was written), so the least recently
    /// touched of them leave memory until the map is at 80% of the share.
    fn enforce_budget(&mut self) {
        let share = self.budget_share();
        if self.hot_bytes <= share {
            return;
        }
        let mut by_age: Vec<(Instant, usize, String)> = self
            .users
            .iter()
            .filter(|(_, u)| !u.dirty)
            .map(|(id, u)| (u.touched, u.bytes, id.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(touched, _, _)| *touched);
        let target = share / 10 * 8;
        let mut evicted = 0usize;
        for (_, bytes, id) in by_age {
            if self.hot_bytes <= target {
                break;
            }
            self.users.remove(&id);
            self.hot_bytes -= bytes;
            evicted += 1;
        }
        metrics::counter!(m::BUDGET_EVICTIONS, "partition" => self.partition.to_string())
            .increment(evicted as u64);
        tracing::debug!(
            partition = self.partition,
            evicted,
            kept = self.hot_bytes,
            share,
            "hot state over its budget: least recent users left memory"
        );
    }

    /// Each changed user's state, then the marker with the offset they are valid at;
    /// acknowledged with the other outputs before the checkpoint reaches sled (with
    /// exactly_once, in the partition's transaction).
    async fn write_changelog(&mut self, next_offset: i64) -> Result<(), PartitionError> {
        let Some((topic, _)) = &self.shared.changelog else {
            return Ok(());
        };
        let topic = topic.clone();
        self.begin().await?;
        let topic = topic.as_str();
        for user in &self.dirty {
            let Some(hot) = self.users.get(user) else {
                continue;
            };
            self.buffer.clear();
            crate::state::encode_user_state(&hot.state, &mut self.buffer);
            self.output
                .send_to(
                    topic,
                    Some(self.partition),
                    Some(user.as_bytes()),
                    &self.buffer,
                    None,
                    &mut self.pending,
                    "changelog",
                )
                .await;
        }
        let offset = next_offset.to_string();
        let marker = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: crate::state::changelog::OFFSET_HEADER,
            value: Some(offset.as_str()),
        });
        self.output
            .send_to(
                topic,
                Some(self.partition),
                None,
                b"",
                Some(marker),
                &mut self.pending,
                "changelog",
            )
            .await;
        Ok(())
    }

    fn evict_idle(&mut self) {
        let idle_after = self.shared.idle_after;
        if self.last_eviction.elapsed() < idle_after / 4 {
            return;
        }
        self.last_eviction = Instant::now();
        let before = self.users.len();
        let hot_bytes = &mut self.hot_bytes;
        self.users.retain(|_, u| {
            let keep = u.dirty || u.touched.elapsed() < idle_after;
            if !keep {
                *hot_bytes -= u.bytes;
            }
            keep
        });
        let evicted = before - self.users.len();
        if evicted > 0 {
            tracing::debug!(
                partition = self.partition,
                evicted,
                "idle users left the hot map"
            );
        }
    }
}

/// The partition's bandit as last checkpointed: posteriors and pending rewards. State
/// written for a different number of arms starts over (and says so).
/// A partition is behind when more batches are queued for it and its newest record
/// reached the broker more than one checkpoint interval before `now_ms`.
fn is_behind(
    queued_batches: usize,
    newest_input_ms: Option<i64>,
    now_ms: i64,
    checkpoint_interval: Duration,
) -> bool {
    queued_batches > 0
        && newest_input_ms
            .is_some_and(|ms| now_ms.saturating_sub(ms) > checkpoint_interval.as_millis() as i64)
}

fn restore_bandit(
    store: &PartitionStore,
    partition: i32,
    arms: usize,
    lateness_ms: i64,
    max_pending: usize,
) -> Result<Bandit, PartitionError> {
    let mut bandit = Bandit::new(arms, lateness_ms, max_pending);
    let (posteriors, pending) = store.bandit()?;
    if let Some(bytes) = posteriors {
        match Posteriors::decode(&bytes, arms) {
            Some(p) => bandit.posteriors = p,
            None => tracing::warn!(
                partition,
                arms,
                "stored bandit posteriors are for another experiment; starting from Beta(1,1)"
            ),
        }
    }
    let mut restored = 0;
    for (user, bytes) in pending {
        match decode_pending(&bytes) {
            Some(list) if list.iter().all(|r| (r.payload as usize) < arms) => {
                restored += list.len();
                bandit.restore_user(user, list);
            }
            _ => tracing::warn!(partition, user, "dropping unreadable pending rewards"),
        }
    }
    tracing::info!(partition, restored, "bandit restored");
    Ok(bandit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);
    const NOW: i64 = 1_767_225_600_000;

    #[test]
    fn behind_needs_a_queued_batch_and_a_newest_record_older_than_one_interval() {
        // A drain of an old backlog: more batches queued, records minutes old.
        assert!(is_behind(3, Some(NOW - 120_000), NOW, INTERVAL));
        // Live at a high rate: a batch is queued, but the newest record is fresh.
        assert!(!is_behind(3, Some(NOW - 30), NOW, INTERVAL));
        assert!(!is_behind(1, Some(NOW - 1_000), NOW, INTERVAL));
        assert!(is_behind(1, Some(NOW - 1_001), NOW, INTERVAL));
        // Old records but nothing more queued: caught up with what the broker has.
        assert!(!is_behind(0, Some(NOW - 120_000), NOW, INTERVAL));
        // No record with a timestamp taken yet.
        assert!(!is_behind(3, None, NOW, INTERVAL));
    }
}
