//! Transactional delivery (`delivery: exactly_once`), in the style of Kafka Streams'
//! exactly-once "per task": each input partition's task owns a transactional producer
//! whose id, `<group>-<topic>-<partition>`, is the same on every worker and across
//! restarts. A new owner's `init_transactions` therefore fences the previous owner (a
//! zombie that still thinks it owns the partition) and has the broker abort its open
//! transaction.
//!
//! A transaction begins at the first output after a checkpoint and ends at the next
//! checkpoint: the partition's predictions, shadow predictions, dead letters and
//! changelog records, and its next input offset (`send_offsets_to_transaction` with the
//! consumer's group metadata), commit together or not at all.
//!
//! librdkafka's transaction calls block (network round trips to the coordinators); they
//! run on tokio's blocking pool here, never on a worker thread of the runtime, except
//! [`PartitionTransactions::start`], which the consumer thread calls.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::OutputProducer;
use crate::metrics as m;

/// The transactional id of an input partition's producer: stable across restarts and
/// workers, so that the next owner fences the previous one.
pub fn transactional_id(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}-{topic}-{partition}")
}

/// What became of the open transaction when a transaction call or an output failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No transaction was open.
    NoneOpen,
    /// It was aborted: none of its records become visible to read_committed readers.
    Aborted,
    /// Aborting failed too (the broker aborts it when it times out, or when the next
    /// producer with this id starts).
    AbortFailed(String),
    /// The producer is in a fatal state (fenced, or another fatal error) and cannot
    /// abort; the broker aborts the transaction (at the latest when it times out).
    Fatal,
}

/// A transaction call or an output inside a transaction failed; the partition stops.
#[derive(Debug)]
pub struct TransactionError {
    pub transactional_id: String,
    pub partition: i32,
    /// What failed: `init_transactions`, `commit_transaction`, `delivering a prediction
    /// record`, ...
    pub operation: String,
    /// Another producer with the same transactional id took over.
    pub fenced: bool,
    pub outcome: Outcome,
    pub source: KafkaError,
}

impl fmt::Display for TransactionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, partition, operation) = (&self.transactional_id, self.partition, &self.operation);
        if self.fenced {
            return write!(
                f,
                "partition {partition}: transactional id \"{id}\" was fenced ({operation}): a \
                 newer producer with this id took over (another worker owns the partition now, \
                 or a restarted one does); this partition stops and its open transaction is \
                 discarded ({})",
                self.source
            );
        }
        write!(
            f,
            "partition {partition}: transactional id \"{id}\": {operation} failed: {}; ",
            self.source
        )?;
        match &self.outcome {
            Outcome::NoneOpen => write!(f, "no transaction was open"),
            Outcome::Aborted => write!(f, "the transaction was aborted"),
            Outcome::AbortFailed(e) => write!(
                f,
                "aborting the transaction failed too ({e}); the broker aborts it when it times \
                 out or when the next producer with this id starts"
            ),
            Outcome::Fatal => write!(
                f,
                "the producer is in a fatal state; the broker aborts the open transaction when \
                 it times out or when the next producer with this id starts"
            ),
        }
    }
}

impl std::error::Error for TransactionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// What a worker needs to start its partitions' transactional producers.
#[derive(Clone)]
pub struct TransactionSettings {
    /// The producer settings (`kafka.producer` and the brokers).
    pub producer: ClientConfig,
    /// The consumer group, the first part of every transactional id.
    pub group: String,
    /// How long one transaction call may take.
    pub timeout: Duration,
}

/// One input partition's transactional producer and its open transaction, if any.
pub struct PartitionTransactions {
    producer: OutputProducer,
    id: String,
    topic: String,
    partition: i32,
    group: Arc<ConsumerGroupMetadata>,
    timeout: Duration,
    open: bool,
    committed: metrics::Counter,
    aborted: metrics::Counter,
    failed: metrics::Counter,
    commit_seconds: metrics::Histogram,
}

impl PartitionTransactions {
    /// Creates the partition's transactional producer and initializes it, which fences
    /// any older producer with the same id and waits until the broker has aborted that
    /// producer's open transaction. Blocks: call it off the runtime's worker threads.
    pub fn start(
        settings: &TransactionSettings,
        topic: &str,
        partition: i32,
        group: Arc<ConsumerGroupMetadata>,
    ) -> Result<PartitionTransactions, Box<TransactionError>> {
        let id = transactional_id(&settings.group, topic, partition);
        let error = |operation: &str, source: KafkaError| {
            Box::new(TransactionError {
                transactional_id: id.clone(),
                partition,
                operation: operation.to_owned(),
                fenced: is_fenced(&source),
                outcome: Outcome::NoneOpen,
                source,
            })
        };
        let producer = OutputProducer::create_with(settings.producer.clone(), Some(&id))
            .map_err(|e| error("creating the transactional producer", e))?;
        producer
            .inner()
            .init_transactions(settings.timeout)
            .map_err(|e| error("init_transactions", e))?;
        let p = partition.to_string();
        let outcome = |outcome: &'static str| metrics::counter!(m::TRANSACTIONS, "outcome" => outcome, "partition" => p.clone());
        tracing::debug!(partition, transactional_id = %id, "transactional producer ready");
        Ok(PartitionTransactions {
            committed: outcome("committed"),
            aborted: outcome("aborted"),
            failed: outcome("failed"),
            commit_seconds: metrics::histogram!(m::TRANSACTION_COMMIT_SECONDS, "partition" => p.clone()),
            producer,
            id,
            topic: topic.to_owned(),
            partition,
            group,
            timeout: settings.timeout,
            open: false,
        })
    }

    /// The producer every output of this partition goes through.
    pub fn producer(&self) -> &OutputProducer {
        &self.producer
    }

    pub fn transactional_id(&self) -> &str {
        &self.id
    }

    /// Whether a transaction is open (begun, not yet committed or aborted).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Begins a transaction unless one is open.
    pub async fn begin(&mut self) -> Result<(), Box<TransactionError>> {
        if self.open {
            return Ok(());
        }
        let producer = self.producer.clone();
        match blocking(move || producer.inner().begin_transaction())
            .await
            .and_then(|r| r)
        {
            Ok(()) => {
                self.open = true;
                Ok(())
            }
            Err(e) => Err(self.fail("begin_transaction", e).await),
        }
    }

    /// Adds `next_offset` of the input partition to the open transaction and commits it
    /// (flushing its records first). On failure the transaction is aborted if it can be.
    pub async fn commit(&mut self, next_offset: i64) -> Result<(), Box<TransactionError>> {
        if !self.open {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, self.partition, Offset::Offset(next_offset))
            .expect("a valid offset");
        let (producer, group, timeout) =
            (self.producer.clone(), Arc::clone(&self.group), self.timeout);
        let started = Instant::now();
        let result = blocking(move || {
            let inner = producer.inner();
            inner
                .send_offsets_to_transaction(&offsets, &group, timeout)
                .map_err(|e| ("send_offsets_to_transaction", e))?;
            inner
                .commit_transaction(timeout)
                .map_err(|e| ("commit_transaction", e))
        })
        .await
        .unwrap_or_else(|e| Err(("commit_transaction", e)));
        match result {
            Ok(()) => {
                self.open = false;
                self.committed.increment(1);
                self.commit_seconds.record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err((operation, e)) => Err(self.fail(operation, e).await),
        }
    }

    /// Something failed while the transaction was open (a transaction call, or an
    /// output that was not acknowledged): aborts the transaction if the producer can,
    /// and says what happened.
    pub async fn fail(&mut self, operation: &str, source: KafkaError) -> Box<TransactionError> {
        let fatal = self.producer.inner().client().fatal_error();
        let fenced = is_fenced(&source)
            || fatal
                .as_ref()
                .is_some_and(|(code, _)| is_fenced_code(*code));
        let outcome = if !self.open {
            Outcome::NoneOpen
        } else if fenced || fatal.is_some() {
            self.open = false;
            self.failed.increment(1);
            Outcome::Fatal
        } else {
            match self.abort().await {
                Ok(()) => Outcome::Aborted,
                Err(e) => {
                    self.failed.increment(1);
                    Outcome::AbortFailed(e.to_string())
                }
            }
        };
        Box::new(TransactionError {
            transactional_id: self.id.clone(),
            partition: self.partition,
            operation: operation.to_owned(),
            fenced,
            outcome,
            source,
        })
    }

    async fn abort(&mut self) -> Result<(), KafkaError> {
        let (producer, timeout) = (self.producer.clone(), self.timeout);
        let result = blocking(move || producer.inner().abort_transaction(timeout))
            .await
            .and_then(|r| r);
        self.open = false;
        if result.is_ok() {
            self.aborted.increment(1);
            tracing::warn!(
                partition = self.partition,
                transactional_id = %self.id,
                "transaction aborted"
            );
        }
        result
    }

    /// Aborts a transaction still open (the partition stopped on an error outside the
    /// transaction calls) and destroys the producer, off the runtime's worker threads.
    pub async fn close(mut self) {
        if self.open {
            match self.abort().await {
                Ok(()) => {}
                Err(e) => {
                    self.failed.increment(1);
                    tracing::warn!(partition = self.partition, transactional_id = %self.id,
                        error = %e, "could not abort the open transaction; the broker aborts it when it times out");
                }
            }
        }
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|_| KafkaError::Canceled)
}

fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// Whether an error says that a newer producer with the same transactional id exists.
pub fn is_fenced(error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(is_fenced_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transactional_id_is_stable_and_names_the_partition() {
        assert_eq!(
            transactional_id("ctr", "user-events", 3),
            "ctr-user-events-3"
        );
    }

    #[test]
    fn fencing_is_recognized_and_named_in_the_message() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::Fenced);
        assert!(is_fenced(&fenced));
        assert!(is_fenced(&KafkaError::MessageProduction(
            RDKafkaErrorCode::ProducerFenced
        )));
        assert!(!is_fenced(&KafkaError::MessageProduction(
            RDKafkaErrorCode::GroupAuthorizationFailed
        )));
        let error = TransactionError {
            transactional_id: "ctr-user-events-3".into(),
            partition: 3,
            operation: "commit_transaction".into(),
            fenced: true,
            outcome: Outcome::Fatal,
            source: fenced,
        };
        let text = error.to_string();
        assert!(
            text.contains("transactional id \"ctr-user-events-3\" was fenced"),
            "{text}"
        );
        assert!(text.starts_with("partition 3: "), "{text}");
    }
}
