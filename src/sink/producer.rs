//! The output producer: idempotent, with every send tracked until acknowledged, so that
//! a checkpoint can wait for all outputs up to an offset before committing it.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

/// An output that was not acknowledged: the partition must not commit past it.
#[derive(Debug, thiserror::Error)]
#[error("{output} record not acknowledged by the broker: {source}")]
pub struct DeliveryError {
    /// Which output: `prediction` or `dead_letter`.
    pub output: &'static str,
    pub source: KafkaError,
}

/// A shared producer. Cheap to clone.
#[derive(Clone)]
pub struct OutputProducer {
    inner: FutureProducer,
}

/// Sends whose acknowledgement is still outstanding.
#[derive(Default)]
pub struct PendingDeliveries {
    futures: Vec<(DeliveryFuture, &'static str)>,
    /// A send refused locally, reported at the next wait.
    failed: Option<DeliveryError>,
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
            inner: config.create()?,
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
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.inner.send_result(record) {
                Ok(future) => {
                    pending.futures.push((future, kind));
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    // Only reachable for locally invalid records (e.g. larger than
                    // message.max.bytes); surface it at the next checkpoint.
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
        let record = FutureRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .payload(b"")
            .headers(headers);
        match tokio::time::timeout(timeout, self.inner.send(record, timeout)).await {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((err, _))) => Err(err),
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
    pub(crate) fn inner(&self) -> &FutureProducer {
        &self.inner
    }

    /// Flushes everything queued, for shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}

impl PendingDeliveries {
    pub fn len(&self) -> usize {
        self.futures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.futures.is_empty() && self.failed.is_none()
    }

    /// Waits until every pending send is acknowledged; the first failure is returned.
    pub async fn wait_all(&mut self) -> Result<(), DeliveryError> {
        if let Some(err) = self.failed.take() {
            self.futures.clear();
            return Err(err);
        }
        let mut first_error = None;
        for (future, kind) in self.futures.drain(..) {
            let outcome = match future.await {
                Ok(Ok(_)) => continue,
                Ok(Err((err, _))) => err,
                Err(_canceled) => KafkaError::Canceled,
            };
            tracing::error!(output = kind, error = %outcome, "output not acknowledged");
            first_error.get_or_insert(DeliveryError {
                output: kind,
                source: outcome,
            });
        }
        first_error.map_or(Ok(()), Err)
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
