//! Shadow scoring. Partition tasks hand each scored batch to a dedicated thread and
//! never wait for it: when the thread falls behind, the batch is dropped for the shadows
//! (and counted), so a slow or failing shadow never delays the champion's output.
//! Shadow predictions go to the shadow-predictions topic only, with variant `shadow`.

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

fn run(
    batches: Receiver<ShadowBatch>,
    producer: OutputProducer,
    topic: String,
    codec: Codec,
    runtime: tokio::runtime::Handle,
) {
    let mut pending = PendingDeliveries::default();
    let (mut input, mut scores, mut buffer) = (Vec::new(), Vec::new(), Vec::new());
    let mut records: Vec<Vec<u8>> = Vec::new();
    for batch in batches {
        for shadow in &batch.set.shadows {
            let meta = &shadow.meta;
            let labels = [
                ("model", meta.name.clone()),
                ("version", meta.version.to_string()),
            ];
            scores.clear();
            let started = Instant::now();
            if let Err(e) = shadow.score(&batch.rows, batch.stride, &mut input, &mut scores) {
                metrics::counter!(m::SHADOW_FAILURES, &labels).increment(1);
                tracing::warn!(error = %e, "shadow scoring failed; the champion is unaffected");
                continue;
            }
            metrics::histogram!(m::SHADOW_SCORE_SECONDS, &labels)
                .record(started.elapsed().as_secs_f64());
            let delta = metrics::histogram!(m::SHADOW_ABS_DELTA, &labels);
            let mut disagreements = 0u64;
            records.clear();
            for (i, shadow_event) in batch.events.iter().enumerate() {
                let (served, threshold) = batch.served[i];
                let score = scores[i];
                delta.record((score - served).abs());
                if (score >= meta.threshold) != (served >= threshold) {
                    disagreements += 1;
                }
                buffer.clear();
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
                        produced_us: now_us(),
                    },
                    &mut buffer,
                );
                records.push(buffer.clone());
            }
            metrics::counter!(m::SHADOW_PREDICTIONS, &labels).increment(scores.len() as u64);
            metrics::counter!(m::SHADOW_DISAGREEMENTS, &labels).increment(disagreements);
            runtime.block_on(async {
                for (record, e) in records.iter().zip(&batch.events) {
                    producer
                        .send(
                            &topic,
                            Some(e.event.user_id.as_bytes()),
                            record,
                            None,
                            &mut pending,
                            "shadow_prediction",
                        )
                        .await;
                }
                if pending.len() > MAX_PENDING {
                    if let Err(e) = pending.wait_all().await {
                        metrics::counter!(m::SHADOW_FAILURES, &labels).increment(1);
                        tracing::warn!(error = %e, "shadow predictions not acknowledged");
                    }
                }
            });
        }
    }
    if let Err(e) = runtime.block_on(pending.wait_all()) {
        tracing::warn!(error = %e, "shadow predictions not acknowledged");
    }
}
