//! Shadow scoring. Partition tasks hand each scored batch to a dedicated thread and
//! never wait for it: when the thread falls behind, the batch is dropped for the shadows
//! (and counted), so a slow or failing shadow never delays the champion's output.
//! Shadow predictions go to the shadow-predictions topic only, with variant `shadow`.
//! With `delivery: exactly_once` the partition task scores its shadows itself instead
//! ([`ShadowOutput::Inline`]), so that their predictions are in its transaction; the
//! shadows then take time on the partition's path.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use super::ModelSet;
use crate::codec::{Codec, Event};
use crate::metrics as m;
use crate::sink::{encode_prediction, OutputProducer, PendingDeliveries, Prediction};
use crate::util::now_us;

/// Batches waiting for the shadow thread, at most.
const QUEUE: usize = 64;
/// Unacknowledged shadow outputs before the thread waits for acks.
const MAX_PENDING: usize = 20_000;

/// One scored batch, as the partition served it.
pub struct ShadowBatch {
    pub set: Arc<ModelSet>,
    pub stride: usize,
    /// Feature rows in topology order.
    pub rows: Vec<f64>,
    /// The served score and the threshold of the model that served it, per row.
    pub served: Vec<(f64, f64)>,
    pub events: Vec<ShadowEvent>,
}

pub struct ShadowEvent {
    pub event: Event,
    pub input_ts: i64,
    pub received_us: i64,
    pub polled_us: i64,
}

/// Where partitions offer batches. Cheap to clone.
#[derive(Clone)]
pub struct ShadowQueue {
    sender: SyncSender<ShadowBatch>,
    dropped: metrics::Counter,
}

impl ShadowQueue {
    /// Never blocks: a full queue drops the batch for the shadows.
    pub fn offer(&self, batch: ShadowBatch) {
        match self.sender.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(batch)) => self.dropped.increment(batch.events.len() as u64),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Starts the shadow thread; it ends when every queue handle is dropped.
pub fn start(
    producer: OutputProducer,
    topic: String,
    codec: Codec,
    runtime: tokio::runtime::Handle,
) -> (ShadowQueue, std::thread::JoinHandle<()>) {
    let (sender, receiver) = sync_channel(QUEUE);
    let thread = std::thread::Builder::new()
        .name("augur-shadow".into())
        .spawn(move || run(receiver, producer, topic, codec, runtime))
        .expect("spawning a thread");
    let queue = ShadowQueue {
        sender,
        dropped: metrics::counter!(m::SHADOW_DROPPED),
    };
    (queue, thread)
}

/// Where a worker's partitions send scored batches for the shadow models.
pub enum ShadowOutput {
    /// To the shadow thread, best effort (`delivery: at_least_once`).
    Queue(ShadowQueue),
    /// Scored by the partition task itself, its shadow predictions sent in the
    /// partition's transaction (`delivery: exactly_once`).
    Inline { topic: String, codec: Codec },
}

/// Buffers reused between batches.
#[derive(Default)]
pub struct ShadowScratch {
    input: Vec<f32>,
    scores: Vec<f64>,
    buffer: Vec<u8>,
}

/// One encoded shadow prediction.
pub struct ShadowRecord {
    /// Index of the shadow in `batch.set.shadows`.
    pub shadow: usize,
    /// Index of its event in `batch.events`.
    pub event: usize,
    pub bytes: Vec<u8>,
}

/// Scores `batch` with each shadow of its model set and appends its predictions to
/// `out`, shadow after shadow. A shadow that fails to score is counted and skipped; the
/// champion is unaffected.
pub fn score_batch(
    batch: &ShadowBatch,
    codec: Codec,
    scratch: &mut ShadowScratch,
    out: &mut Vec<ShadowRecord>,
) {
    for (index, shadow) in batch.set.shadows.iter().enumerate() {
        let meta = &shadow.meta;
        let labels = [
            ("model", meta.name.clone()),
            ("version", meta.version.to_string()),
        ];
        scratch.scores.clear();
        let started = Instant::now();
        if let Err(e) = shadow.score(
            &batch.rows,
            batch.stride,
            &mut scratch.input,
            &mut scratch.scores,
        ) {
            metrics::counter!(m::SHADOW_FAILURES, &labels).increment(1);
            tracing::warn!(error = %e, "shadow scoring failed; the champion is unaffected");
            continue;
        }
        metrics::histogram!(m::SHADOW_SCORE_SECONDS, &labels)
            .record(started.elapsed().as_secs_f64());
        let delta = metrics::histogram!(m::SHADOW_ABS_DELTA, &labels);
        let mut disagreements = 0u64;
        for (i, shadow_event) in batch.events.iter().enumerate() {
            let (served, threshold) = batch.served[i];
            let score = scratch.scores[i];
            delta.record((score - served).abs());
            if (score >= meta.threshold) != (served >= threshold) {
                disagreements += 1;
            }
            scratch.buffer.clear();
            encode_prediction(
                codec,
                &Prediction {
                    event: &shadow_event.event,
                    model: &meta.name,
                    version: meta.version,
                    variant: "shadow",
                    score,
                    features: None,
                    input_ts: shadow_event.input_ts,
                    received_us: shadow_event.received_us,
                    polled_us: shadow_event.polled_us,
                    produced_us: now_us(),
                },
                &mut scratch.buffer,
            );
            out.push(ShadowRecord {
                shadow: index,
                event: i,
                bytes: scratch.buffer.clone(),
            });
        }
        metrics::counter!(m::SHADOW_PREDICTIONS, &labels).increment(scratch.scores.len() as u64);
        metrics::counter!(m::SHADOW_DISAGREEMENTS, &labels).increment(disagreements);
    }
}

fn run(
    batches: Receiver<ShadowBatch>,
    producer: OutputProducer,
    topic: String,
    codec: Codec,
    runtime: tokio::runtime::Handle,
) {
    let mut pending = PendingDeliveries::default();
    let mut scratch = ShadowScratch::default();
    let mut records: Vec<ShadowRecord> = Vec::new();
    for batch in batches {
        records.clear();
        score_batch(&batch, codec, &mut scratch, &mut records);
        runtime.block_on(async {
            // Shadow after shadow, as scored; a delivery failure is counted for the
            // shadow whose records were last sent.
            for (n, record) in records.iter().enumerate() {
                producer
                    .send(
                        &topic,
                        Some(batch.events[record.event].event.user_id.as_bytes()),
                        &record.bytes,
                        None,
                        &mut pending,
                        "shadow_prediction",
                    )
                    .await;
                let last_of_shadow = records
                    .get(n + 1)
                    .is_none_or(|next| next.shadow != record.shadow);
                if last_of_shadow && pending.len() > MAX_PENDING {
                    if let Err(e) = pending.wait_all().await {
                        let meta = &batch.set.shadows[record.shadow].meta;
                        metrics::counter!(m::SHADOW_FAILURES, "model" => meta.name.clone(),
                            "version" => meta.version.to_string())
                        .increment(1);
                        tracing::warn!(error = %e, "shadow predictions not acknowledged");
                    }
                }
            }
        });
    }
    if let Err(e) = runtime.block_on(pending.wait_all()) {
        tracing::warn!(error = %e, "shadow predictions not acknowledged");
    }
}
