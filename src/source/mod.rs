//! The Kafka source: one consumer per worker, polled on its own thread, that hands each
//! assigned partition's records to that partition's task. Rebalances are handled here:
//! an assigned partition resumes from the offset stored with its state in sled; a
//! revoked one checkpoints and commits before it is let go.
//!
//! With `delivery: exactly_once` each assigned partition also gets its transactional
//! producer here (initialized before the partition's state is chosen, so that a
//! previous owner's open transaction is aborted first), the consumer commits no offsets
//! (each transaction commits its partition's), and a partition whose sled state is
//! behind its last committed transaction is restored from the changelog.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::metrics as m;
use crate::pipeline::{PartitionError, PartitionInput, PartitionTask, Shared};
use crate::sink::PartitionTransactions;
use crate::state::store::StateStore;

/// Records handed to a partition task per message, at most.
const MAX_BATCH: usize = 1024;
/// Batches queued per partition before the consumer thread waits (backpressure).
const PARTITION_QUEUE: usize = 8;
/// How long a revoked partition may take to checkpoint.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long reading the group's committed offsets may take (exactly_once assignment).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Source {
    thread: std::thread::JoinHandle<()>,
}

impl Source {
    /// Subscribes and starts the polling thread.
    pub fn start(
        config: ClientConfig,
        shared: Arc<Shared>,
        store: StateStore,
        commits: std::sync::mpsc::Receiver<(i32, i64)>,
        stop: Arc<AtomicBool>,
        ready: Arc<AtomicBool>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Source, KafkaError> {
        let context = SourceContext {
            shared: Arc::clone(&shared),
            store,
            runtime,
            tasks: Mutex::default(),
            ready,
        };
        let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
        consumer.subscribe(&[&shared.topic])?;
        let thread = std::thread::Builder::new()
            .name("augur-source".into())
            .spawn(move || poll_loop(consumer, commits, stop))
            .expect("spawning a thread");
        Ok(Source { thread })
    }

    /// Waits for the polling thread, which checkpoints and commits every partition
    /// before it returns.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

struct SourceContext {
    shared: Arc<Shared>,
    store: StateStore,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<HashMap<i32, mpsc::Sender<PartitionInput>>>,
    /// True once this worker holds an assignment whose partitions are all restored
    /// (their state opened and start offsets read); false during a rebalance.
    ready: Arc<AtomicBool>,
}

impl ClientContext for SourceContext {
    /// Consumer lag per partition, from librdkafka's statistics (every 5 s).
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (name, topic) in &statistics.topics {
            for (partition, p) in &topic.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(m::CONSUMER_LAG, "topic" => name.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke_all(consumer),
            other => {
                tracing::error!(error = ?other, "rebalance error; releasing all partitions");
                self.revoke_all(consumer);
            }
        }
    }
}

impl SourceContext {
    /// Starts a task per assigned partition, each resuming from its sled offset.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let topic = self.shared.topic.clone();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        // delivery: exactly_once: this generation's group metadata (for the offsets in
        // each transaction) and the offsets the transactions committed.
        let exactly_once = match &self.shared.transactions {
            None => None,
            Some(_) => match self.exactly_once_context(consumer, &topic, &partitions) {
                Ok(context) => Some(context),
                Err(error) => {
                    self.shared.report_fatal(error);
                    return;
                }
            },
        };
        let mut tasks = self.tasks.lock().expect("tasks lock");
        for partition in partitions {
            let started = self.store.partition(&topic, partition).and_then(|store| {
                let next = store.next_offset()?;
                Ok((store, next))
            });
            let (mut store, mut next_offset) = match started {
                Ok(x) => x,
                Err(e) => {
                    self.shared.report_fatal(PartitionError::Store(e));
                    continue;
                }
            };
            let mut transactions = None;
            let mut behind = false;
            if let (Some(settings), Some((metadata, committed))) =
                (&self.shared.transactions, &exactly_once)
            {
                // Before the state is chosen: a previous owner's open transaction is
                // aborted by now, so the changelog reads up to the last committed one.
                match PartitionTransactions::start(
                    settings,
                    &topic,
                    partition,
                    Arc::clone(metadata),
                ) {
                    Ok(t) => transactions = Some(t),
                    Err(e) => {
                        self.shared.report_fatal(e.into());
                        continue;
                    }
                }
                // Sled is written only after a transaction commits, so it can be behind
                // the last committed transaction (a crash between the two, or an older
                // copy of this partition's state), never ahead. Resuming from a sled
                // offset behind it would emit that stretch's outputs a second time.
                if let Some(&committed) = committed.get(&partition) {
                    if next_offset.is_some_and(|sled| sled < committed) {
                        tracing::warn!(partition, sled = next_offset, committed,
                            "local state is behind the last committed transaction: restoring the partition from the changelog");
                        behind = true;
                    }
                }
            }
            if next_offset.is_none() || behind {
                match self.restore(partition, &mut store, next_offset) {
                    Ok(restored) => next_offset = restored,
                    Err(e) => {
                        self.shared.report_fatal(e);
                        continue;
                    }
                }
            }
            let offset = match next_offset {
                Some(o) => Offset::Offset(o),
                None => {
                    tracing::info!(partition, "no local state for partition: replaying it from the beginning to rebuild state");
                    Offset::Beginning
                }
            };
            if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                tracing::error!(partition, error = %e, "cannot set start offset");
            }
            tracing::info!(partition, ?offset, "partition assigned");
            let (tx, rx) = mpsc::channel(PARTITION_QUEUE);
            let task = match PartitionTask::new(
                Arc::clone(&self.shared),
                partition,
                store,
                next_offset,
                transactions,
            ) {
                Ok(task) => task,
                Err(e) => {
                    self.shared.report_fatal(e);
                    continue;
                }
            };
            self.runtime.spawn(task.run(rx));
            tasks.insert(partition, tx);
        }
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(tasks.len() as f64);
        self.shared.assigned.store(tasks.len(), Ordering::SeqCst);
        drop(tasks);
        match consumer.assign(tpl) {
            Ok(()) => self.ready.store(true, Ordering::SeqCst),
            Err(e) => tracing::error!(error = %e, "assign failed"),
        }
    }

    /// The consumer's group metadata for this generation, and the next offsets the
    /// group has committed for `partitions` (with exactly_once, by the transactions).
    fn exactly_once_context(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partitions: &[i32],
    ) -> Result<(Arc<ConsumerGroupMetadata>, HashMap<i32, i64>), PartitionError> {
        let first = partitions.first().copied().unwrap_or(-1);
        let metadata = consumer
            .group_metadata()
            .ok_or_else(|| PartitionError::ExactlyOnce {
                partition: first,
                message: "the consumer has no group metadata for the transactions".into(),
            })?;
        let mut list = TopicPartitionList::new();
        for &partition in partitions {
            let _ = list.add_partition(topic, partition);
        }
        let committed = consumer
            .committed_offsets(list, COMMITTED_TIMEOUT)
            .map_err(|e| PartitionError::ExactlyOnce {
                partition: first,
                message: format!(
                    "cannot read the group's committed offsets, so cannot tell whether local \
                     state is behind the last committed transaction: {e}"
                ),
            })?;
        let offsets = committed
            .elements_for_topic(topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        Ok((Arc::new(metadata), offsets))
    }

    /// Restores a partition from the changelog into sled when the changelog's last
    /// checkpoint is past `local` (the sled offset; None: no local state); returns the
    /// offset to resume at (None: nothing anywhere, replay the input).
    fn restore(
        &self,
        partition: i32,
        store: &mut crate::state::store::PartitionStore,
        local: Option<i64>,
    ) -> Result<Option<i64>, PartitionError> {
        let Some((topic, config)) = &self.shared.changelog else {
            return Ok(local);
        };
        let started = std::time::Instant::now();
        let p = partition.to_string();
        metrics::gauge!(m::RESTORING, "partition" => p.clone()).set(1.0);
        let restored = crate::state::changelog::restore(
            config.clone(),
            topic,
            partition,
            Duration::from_millis(500),
        );
        metrics::gauge!(m::RESTORING, "partition" => p.clone()).set(0.0);
        let restored = restored.map_err(|source| PartitionError::Restore {
            topic: topic.clone(),
            partition,
            source,
        })?;
        let Some(next_offset) = restored
            .next_offset
            .filter(|&n| local.is_none_or(|l| n > l))
        else {
            if local.is_some() {
                tracing::warn!(
                    partition,
                    local,
                    changelog = restored.next_offset,
                    "the changelog holds no checkpoint past local state; keeping local state"
                );
            }
            return Ok(local);
        };
        let users = restored.users.len();
        store.restore(restored.users.into_iter(), next_offset)?;
        let took = started.elapsed();
        metrics::counter!(m::RESTORED_USERS, "partition" => p.clone()).increment(users as u64);
        metrics::histogram!(m::RESTORE_SECONDS, "partition" => p).record(took.as_secs_f64());
        tracing::info!(
            partition,
            users,
            records = restored.records,
            next_offset,
            took_ms = took.as_millis() as u64,
            "partition restored from the changelog"
        );
        Ok(Some(next_offset))
    }

    /// Stops every partition task after its final checkpoint, commits, and unassigns.
    fn revoke_all(&self, consumer: &BaseConsumer<Self>) {
        self.ready.store(false, Ordering::SeqCst);
        let tasks: Vec<(i32, mpsc::Sender<PartitionInput>)> =
            self.tasks.lock().expect("tasks lock").drain().collect();
        let mut replies = Vec::new();
        for (partition, tx) in tasks {
            let (reply_tx, reply_rx) = std::sync::mpsc::channel();
            if tx.blocking_send(PartitionInput::Stop(reply_tx)).is_ok() {
                replies.push((partition, reply_rx));
            }
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, reply) in replies {
            match reply.recv_timeout(REVOKE_TIMEOUT) {
                Ok(Some(next)) => {
                    let _ = offsets.add_partition_offset(
                        &self.shared.topic,
                        partition,
                        Offset::Offset(next),
                    );
                }
                Ok(None) => {}
                Err(_) => tracing::warn!(partition, "partition did not checkpoint in time"),
            }
        }
        // With exactly_once the offsets were committed in each partition's transaction.
        if offsets.count() > 0 && self.shared.transactions.is_none() {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed (state and offsets are safe in sled)");
            }
        }
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(0.0);
        self.shared.assigned.store(0, Ordering::SeqCst);
        if let Err(e) = consumer.unassign() {
            tracing::warn!(error = %e, "unassign failed");
        }
    }

    fn dispatch(&self, partition: i32, records: Vec<OwnedMessage>) {
        let tx = self
            .tasks
            .lock()
            .expect("tasks lock")
            .get(&partition)
            .cloned();
        match tx {
            // A closed channel means the task failed; the worker is stopping and the
            // records stay uncommitted.
            Some(tx) => {
                let _ = tx.blocking_send(PartitionInput::Records(records));
            }
            None => tracing::debug!(
                partition,
                n = records.len(),
                "records for a partition no longer owned"
            ),
        }
    }
}

fn poll_loop(
    consumer: BaseConsumer<SourceContext>,
    commits: std::sync::mpsc::Receiver<(i32, i64)>,
    stop: Arc<AtomicBool>,
) {
    let mut batches: HashMap<i32, Vec<OwnedMessage>> = HashMap::new();
    let topic = consumer.context().shared.topic.clone();
    while !stop.load(Ordering::SeqCst) {
        commit_requested(&consumer, &commits, &topic);
        let mut polled = 0;
        let mut wait = Duration::from_millis(100);
        while polled < MAX_BATCH {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(message)) => {
                    polled += 1;
                    batches
                        .entry(message.partition())
                        .or_default()
                        .push(message.detach());
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        for (partition, records) in batches.drain() {
            consumer.context().dispatch(partition, records);
        }
    }
    // Final checkpoints; each partition's final offset is committed synchronously there.
    consumer.context().revoke_all(&consumer);
    consumer.unsubscribe();
}

/// Commits the newest offset each partition task asked for since the last call.
fn commit_requested(
    consumer: &BaseConsumer<SourceContext>,
    commits: &std::sync::mpsc::Receiver<(i32, i64)>,
    topic: &str,
) {
    let mut latest: HashMap<i32, i64> = HashMap::new();
    while let Ok((partition, offset)) = commits.try_recv() {
        latest.insert(partition, offset);
    }
    if latest.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in latest {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "async commit failed; the next checkpoint commits again");
    }
}
