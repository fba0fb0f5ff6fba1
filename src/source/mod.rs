//! The Kafka source: one consumer per worker, polled on its own thread, that hands each
//! assigned partition's records to that partition's task. Rebalances are handled here:
//! an assigned partition resumes from the offset stored with its state in sled, or
//! from the changelog's when that is newer; a revoked one checkpoints and commits
//! before it is let go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::metrics as m;
use crate::pipeline::{PartitionError, PartitionInput, PartitionTask, Shared};
use crate::state::store::{PartitionStore, StateStore};

/// Records handed to a partition task per message, at most.
const MAX_BATCH: usize = 1024;
/// Batches queued per partition before the consumer thread waits (backpressure).
const PARTITION_QUEUE: usize = 8;
/// How long a revoked partition may take to checkpoint.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(20);

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
            stopping: Mutex::default(),
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
    /// Released partitions whose task had not finished its final checkpoint in time:
    /// the reply comes when it has.
    stopping: Mutex<HashMap<i32, std::sync::mpsc::Receiver<Option<i64>>>>,
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
    /// Starts a task per assigned partition, each resuming from its sled offset, or
    /// from the changelog's when the changelog is ahead of the local state (no local
    /// state, or state left behind when the partition moved to another worker). The
    /// changelog partitions are read in parallel, so a rebalance takes about as long as
    /// the slowest partition's restore, not their sum.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let topic = self.shared.topic.clone();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let started = std::time::Instant::now();
        self.wait_for_stopping(&partitions);
        let mut opened = Vec::new();
        for partition in partitions {
            let store = self.store.partition(&topic, partition).and_then(|store| {
                let next = store.next_offset()?;
                Ok((store, next))
            });
            match store {
                Ok((store, next)) => opened.push((partition, store, next)),
                Err(e) => self.shared.report_fatal(PartitionError::Store(e)),
            }
        }
        let resumed: Vec<(i32, PartitionStore, Result<Option<i64>, PartitionError>)> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = opened
                    .into_iter()
                    .map(|(partition, mut store, local)| {
                        scope.spawn(move || {
                            let next = self.resume_offset(partition, &mut store, local);
                            (partition, store, next)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("restore thread panicked"))
                    .collect()
            });
        let mut tasks = self.tasks.lock().expect("tasks lock");
        for (partition, store, next_offset) in resumed {
            let next_offset = match next_offset {
                Ok(next) => next,
                Err(e) => {
                    self.shared.report_fatal(e);
                    continue;
                }
            };
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
            let task =
                match PartitionTask::new(Arc::clone(&self.shared), partition, store, next_offset) {
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
        let assigned = tasks.len();
        drop(tasks);
        match consumer.assign(tpl) {
            Ok(()) => self.ready.store(true, Ordering::SeqCst),
            Err(e) => tracing::error!(error = %e, "assign failed"),
        }
        tracing::info!(
            partitions = assigned,
            took_ms = started.elapsed().as_millis() as u64,
            "assignment ready"
        );
    }

    /// Waits until the earlier tasks of these partitions that were released before
    /// their final checkpoint finished have finished it: two tasks of one partition
    /// must never write its state at the same time, and the new one must start from
    /// the old one's last checkpoint.
    fn wait_for_stopping(&self, partitions: &[i32]) {
        let waiting: Vec<(i32, std::sync::mpsc::Receiver<Option<i64>>)> = {
            let mut stopping = self.stopping.lock().expect("stopping lock");
            stopping.retain(|_, reply| {
                !matches!(reply.try_recv(), Ok(_) | Err(TryRecvError::Disconnected))
            });
            partitions
                .iter()
                .filter_map(|p| stopping.remove(p).map(|reply| (*p, reply)))
                .collect()
        };
        for (partition, reply) in waiting {
            tracing::info!(
                partition,
                "waiting for the partition's previous task to finish its final checkpoint"
            );
            let _ = reply.recv();
        }
    }

    /// The offset a newly assigned partition resumes at. Without a changelog: the
    /// local checkpoint's (None: replay the input). With one, whichever is newer: a
    /// worker that held the partition before, then lost it to another, has state that
    /// is consistent but old, and resuming from it would write changelog checkpoints
    /// with an older offset after newer ones, which a later restore would mix up. So
    /// the local state is replaced by the changelog's when the changelog is ahead.
    fn resume_offset(
        &self,
        partition: i32,
        store: &mut PartitionStore,
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
        let Some(next_offset) = restored.next_offset else {
            return Ok(local);
        };
        match local {
            Some(local) if local == next_offset => {
                tracing::debug!(
                    partition,
                    next_offset,
                    "local state is as new as the changelog"
                );
                return Ok(Some(local));
            }
            Some(local) if local > next_offset => {
                tracing::warn!(
                    partition,
                    local,
                    changelog = next_offset,
                    "local state is ahead of the changelog (was the changelog recreated?); resuming from the local state"
                );
                return Ok(Some(local));
            }
            _ => {}
        }
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
            replaced_local = local,
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
        let deadline = std::time::Instant::now() + REVOKE_TIMEOUT;
        for (partition, reply) in replies {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match reply.recv_timeout(left) {
                Ok(Some(next)) => {
                    let _ = offsets.add_partition_offset(
                        &self.shared.topic,
                        partition,
                        Offset::Offset(next),
                    );
                }
                Ok(None) | Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => {
                    // Its final checkpoint waits for acknowledgements (the broker may
                    // be unreachable). The partition is let go without a commit; the
                    // task still finishes its checkpoint, and the partition is not
                    // started again here before it has (see `assign`).
                    tracing::warn!(
                        partition,
                        "partition did not checkpoint within {REVOKE_TIMEOUT:?}; releasing it uncommitted"
                    );
                    self.stopping
                        .lock()
                        .expect("stopping lock")
                        .insert(partition, reply);
                }
            }
        }
        if offsets.count() > 0 {
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
