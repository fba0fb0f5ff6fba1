//! The output producer: idempotent, with every send tracked until acknowledged, so that
//! a checkpoint can wait for all outputs up to an offset before committing it.
//!
//! Sends are tracked by count, not one future each: every record of a
//! [`PendingDeliveries`] carries the same shared [`Acks`] as its delivery opaque (an
//! `Arc` clone, no allocation), and librdkafka's delivery callback counts it down. A
//! wait ends when the count reaches zero.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

/// An output that was not acknowledged: the partition must not commit past it.
#[derive(Debug, thiserror::Error)]
#[error("{output} record not acknowledged by the broker: {source}")]
pub struct DeliveryError {
    /// Which output: `prediction`, `dead_letter`, `changelog`, ...
    pub output: &'static str,
    pub source: KafkaError,
}

/// The producer's context: a delivery report counts down the [`Acks`] its record was
/// sent with.
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        acks.settle(result);
    }
}

/// The acknowledgements outstanding for one group of sends.
#[derive(Default)]
pub struct Acks {
    outstanding: AtomicUsize,
    failures: AtomicUsize,
    /// The first failure: the record's topic and the error.
    first_failure: Mutex<Option<(String, KafkaError)>>,
    /// The highest offset acknowledged.
    last_offset: AtomicI64,
    settled: tokio::sync::Notify,
}

impl Acks {
    fn settle(&self, result: &DeliveryResult<'_>) {
        match result {
            Ok(message) => {
                self.last_offset
                    .fetch_max(message.offset(), Ordering::Relaxed);
            }
            Err((error, message)) => self.failed(message.topic(), error),
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A stored permit if nobody waits yet; the waiter re-checks the count.
            self.settled.notify_one();
        }
    }

    #[cold]
    fn failed(&self, topic: &str, error: &KafkaError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_failure.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| (topic.to_owned(), error.clone()));
    }

    async fn wait(&self) {
        while self.outstanding.load(Ordering::Acquire) > 0 {
            self.settled.notified().await;
        }
    }
}

/// A shared producer. Cheap to clone.
#[derive(Clone)]
pub struct OutputProducer {
    inner: ThreadedProducer<AckContext>,
}

/// Sends whose acknowledgement is still outstanding.
pub struct PendingDeliveries {
    acks: Arc<Acks>,
    /// The output kind of each topic sent to, to name a failure.
    kinds: Vec<(String, &'static str)>,
    /// A send refused locally, reported at the next wait.
    failed: Option<DeliveryError>,
}

impl Default for PendingDeliveries {
    fn default() -> Self {
        PendingDeliveries {
            acks: Arc::new(Acks {
                last_offset: AtomicI64::new(-1),
                ..Acks::default()
            }),
            kinds: Vec::new(),
            failed: None,
        }
    }
}

impl OutputProducer {
    /// Builds the producer from the client settings; idempotence is always on.
    pub fn create(config: ClientConfig) -> Result<OutputProducer, KafkaError> {
        Self::create_with(config, None)
    }

    /// Like [`OutputProducer::create`], with a `transactional.id` when given (see
    /// [`super::transaction`]).
    pub(crate) fn create_with(
        mut config: ClientConfig,
        transactional_id: Option<&str>,
    ) -> Result<OutputProducer, KafkaError> {
        config.set("enable.idempotence", "true");
        if let Some(id) = transactional_id {
            config.set("transactional.id", id);
        }
        if config.get("message.max.bytes").is_none() {
            // Dead letters carry the original (possibly oversized) record.
            config.set("message.max.bytes", "67108864");
        }
        if config.get("linger.ms").is_none() {
            config.set("linger.ms", "5");
        }
        Ok(OutputProducer {
            inner: config.create_with_context(AckContext)?,
        })
    }

    /// Queues one record; waits (asynchronously) while the local queue is full, which is
    /// the backpressure that slows the partition instead of buffering without limit.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        pending: &mut PendingDeliveries,
        kind: &'static str,
    ) {
        self.send_to(topic, None, key, payload, headers, pending, kind)
            .await
    }

    /// Like [`OutputProducer::send`], to a given partition (None: by key).
    #[allow(clippy::too_many_arguments)]
    pub async fn send_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        pending: &mut PendingDeliveries,
        kind: &'static str,
    ) {
        pending.note_kind(topic, kind);
        let mut record =
            BaseRecord::<[u8], [u8], Arc<Acks>>::with_opaque_to(topic, Arc::clone(&pending.acks))
                .payload(payload);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        // Counted before the send: the delivery report may come before send returns.
        pending.acks.outstanding.fetch_add(1, Ordering::AcqRel);
        loop {
            match self.inner.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    // Only reachable for locally invalid records (e.g. larger than
                    // message.max.bytes); surface it at the next checkpoint.
                    pending.acks.outstanding.fetch_sub(1, Ordering::AcqRel);
                    tracing::error!(topic, error = %err, "producer refused a record");
                    pending.failed.get_or_insert(DeliveryError {
                        output: kind,
                        source: err,
                    });
                    return;
                }
            }
        }
    }

    /// Appends a fence to `topic`'s `partition`: an empty record with no key and the
    /// [`FENCE_HEADER`](crate::state::changelog::FENCE_HEADER) header. Returns its offset
    /// once acknowledged; every record acknowledged before the call has a lower one, so a
    /// reader that has read everything below it has read the partition to its end
    /// without trusting the broker's high watermark.
    pub async fn fence(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<i64, KafkaError> {
        let headers = OwnedHeaders::new().insert(Header {
            key: crate::state::changelog::FENCE_HEADER,
            value: Some(b"".as_slice()),
        });
        let deadline = Instant::now() + timeout;
        let mut pending = PendingDeliveries::default();
        let acks = Arc::clone(&pending.acks);
        let sent = async {
            self.send_to(
                topic,
                Some(partition),
                None,
                b"",
                Some(headers),
                &mut pending,
                "fence",
            )
            .await;
            pending.wait_all().await
        };
        match tokio::time::timeout_at(deadline.into(), sent).await {
            Ok(Ok(())) => Ok(acks.last_offset.load(Ordering::Relaxed)),
            Ok(Err(e)) => Err(e.source),
            Err(_elapsed) => Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )),
        }
    }

    /// Whether the broker knows `topic`.
    pub fn has_topic(&self, topic: &str, timeout: Duration) -> bool {
        self.inner
            .client()
            .fetch_metadata(Some(topic), timeout)
            .ok()
            .is_some_and(|md| {
                md.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
    }

    /// The underlying producer, for the transaction calls.
    pub(crate) fn inner(&self) -> &ThreadedProducer<AckContext> {
        &self.inner
    }

    /// Flushes everything queued, for shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}

impl PendingDeliveries {
    /// Sends not yet acknowledged (or failed).
    pub fn len(&self) -> usize {
        self.acks.outstanding.load(Ordering::Acquire)
    }

    /// Nothing outstanding and no failure to report.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.failed.is_none() && self.acks.failures.load(Ordering::Acquire) == 0
    }

    fn note_kind(&mut self, topic: &str, kind: &'static str) {
        if !self.kinds.iter().any(|(t, _)| t == topic) {
            self.kinds.push((topic.to_owned(), kind));
        }
    }

    /// Waits until every pending send is acknowledged; the first failure is returned.
    pub async fn wait_all(&mut self) -> Result<(), DeliveryError> {
        self.acks.wait().await;
        if let Some(err) = self.failed.take() {
            self.reset_failures();
            return Err(err);
        }
        let failures = self.acks.failures.load(Ordering::Acquire);
        if failures == 0 {
            return Ok(());
        }
        let (topic, source) = self
            .acks
            .first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("a failure was counted");
        self.reset_failures();
        let output = self
            .kinds
            .iter()
            .find(|(t, _)| *t == topic)
            .map_or("output", |(_, kind)| *kind);
        tracing::error!(output, topic, failures, error = %source, "outputs not acknowledged");
        Err(DeliveryError { output, source })
    }

    fn reset_failures(&mut self) {
        self.acks.failures.store(0, Ordering::Release);
        *self
            .acks
            .first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Builds dead-letter headers: the original ones, then augur's.
pub fn dead_letter_headers(
    original: Option<&rdkafka::message::OwnedHeaders>,
    reason: &str,
    detail: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    use rdkafka::message::Headers;
    let mut headers = OwnedHeaders::new();
    if let Some(original) = original {
        for h in original.iter() {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = partition.to_string();
    let offset = offset.to_string();
    for (key, value) in [
        (super::headers::REASON, reason),
        (super::headers::ERROR, detail),
        (super::headers::SOURCE_TOPIC, topic),
        (super::headers::SOURCE_PARTITION, partition.as_str()),
        (super::headers::SOURCE_OFFSET, offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}
