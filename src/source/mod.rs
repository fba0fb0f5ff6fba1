//! The Kafka source: one consumer per worker, polled on its own thread, that hands each
//! assigned partition's records to that partition's task. Rebalances are handled here:
//! an assigned partition resumes from the offset stored with its state in sled, or
//! from the changelog's when that is newer; a revoked one checkpoints and commits
//! before it is let go.
//!
//! Backpressure is per partition. Each assigned partition's records arrive on its own
//! librdkafka queue (`split_partition_queue`), and the polling thread reads a queue only
//! while its task has room. A slow partition (a hot user, a producer queue that is
//! full) is simply not read: librdkafka stops fetching it once its prefetch limit is
//! reached, and the other partitions go on. Nothing is paused and refetched, so no
//! fetch restarts in the middle of a record batch (which tansu 0.6 gets wrong).
//!
//! A failing state store (a full disk, an I/O error) pauses every partition, raises an
//! alert, and is reopened with backoff; the partitions then resume from their last
//! checkpoints.
//!
//! With `delivery: exactly_once` each assigned partition also gets its transactional
//! producer here, initialized before the partition's state is chosen (so a previous
//! owner's open transaction is aborted first and the read_committed changelog ends at
//! the last committed checkpoint), and the consumer commits no offsets: each
//! transaction commits its partition's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::alerts::Alerts;
use crate::metrics as m;
use crate::pipeline::{Control, PartitionError, PartitionTask, Shared, StoreFault};
use crate::sink::PartitionTransactions;
use crate::state::changelog::ReadTo;
use crate::state::store::{PartitionStore, StateStore, StoreError};
use crate::util::now_us;

mod record;
pub use record::InputRecord;

/// Records handed to a partition task per message, at most.
const MAX_BATCH: usize = 1024;
/// Batches queued per partition task; while its queue is full, its partition is not
/// read (backpressure).
const PARTITION_QUEUE: usize = 8;
/// How long revoked partitions may take to checkpoint, together.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(20);
/// The write a reopened state store must take before partitions resume on it.
const PROBE_BYTES: usize = 1 << 20;
/// The alert raised while the state store fails.
const STORE_ALERT: &str = "state_store_failed";

pub struct Source {
    thread: std::thread::JoinHandle<()>,
}

/// What the partition tasks tell the polling thread.
pub struct Feedback {
    /// Offsets checkpointed, to commit.
    pub commits: std::sync::mpsc::Receiver<(i32, i64)>,
    /// State store failures.
    pub store_faults: std::sync::mpsc::Receiver<StoreFault>,
}

/// The worker's state store, which the source closes when it fails and reopens once it
/// works again (sled refuses every operation after an I/O error until reopened).
pub struct StoreSlot {
    current: Option<StateStore>,
    path: PathBuf,
    state_hash: u64,
    cache_bytes: u64,
}

impl StoreSlot {
    pub fn new(store: StateStore, path: PathBuf, state_hash: u64, cache_bytes: u64) -> StoreSlot {
        StoreSlot {
            current: Some(store),
            path,
            state_hash,
            cache_bytes,
        }
    }

    /// Opens the store again and checks that it takes a write; on failure it stays closed.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.current = None;
        let store = StateStore::open_with_cache(&self.path, self.state_hash, self.cache_bytes)?;
        store.probe_write(PROBE_BYTES)?;
        self.current = Some(store);
        Ok(())
    }
}

impl Source {
    /// Subscribes and starts the polling thread.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: ClientConfig,
        shared: Arc<Shared>,
        store: StoreSlot,
        alerts: Alerts,
        feedback: Feedback,
        stop: Arc<AtomicBool>,
        ready: Arc<AtomicBool>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Source, KafkaError> {
        let context = SourceContext {
            shared: Arc::clone(&shared),
            store: Mutex::new(store),
            alerts,
            runtime,
            tasks: Mutex::default(),
            stopping: Mutex::default(),
            unsplit: Mutex::default(),
            assignments: AtomicU64::new(0),
            ready,
        };
        let consumer: Arc<BaseConsumer<SourceContext>> =
            Arc::new(config.create_with_context(context)?);
        consumer.subscribe(&[&shared.topic])?;
        let thread = std::thread::Builder::new()
            .name("augur-source".into())
            .spawn(move || poll_loop(consumer, feedback, stop))
            .expect("spawning a thread");
        Ok(Source { thread })
    }

    /// Waits for the polling thread, which checkpoints and commits every partition
    /// before it returns.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// A running partition task's two inboxes.
struct TaskHandle {
    records: mpsc::Sender<Vec<InputRecord>>,
    control: mpsc::UnboundedSender<Control>,
}

struct SourceContext {
    shared: Arc<Shared>,
    store: Mutex<StoreSlot>,
    alerts: Alerts,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<HashMap<i32, TaskHandle>>,
    /// Released partitions whose task had not finished its final checkpoint in time:
    /// the reply comes when it has.
    stopping: Mutex<HashMap<i32, std::sync::mpsc::Receiver<Option<i64>>>>,
    /// Partitions assigned (and paused) whose records still have to be moved to their
    /// own queue before fetching resumes.
    unsplit: Mutex<Vec<i32>>,
    /// Bumped by every assignment change: the polling thread then drops its partition
    /// queues (an assignment deactivates them).
    assignments: AtomicU64,
    /// True once this worker holds an assignment whose partitions are all restored
    /// (their state opened and start offsets read); false during a rebalance and while
    /// the state store is failing.
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
    /// Starts a task per assigned partition (restoring from the changelog where it is
    /// ahead of the local state), assigns them at their start offsets, and pauses them
    /// until the polling thread has given each its own queue.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let started = Instant::now();
        self.assignments.fetch_add(1, Ordering::SeqCst);
        let topic = self.shared.topic.clone();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        self.wait_for_stopping(&partitions);
        let Ok(group) = self.group_metadata(consumer) else {
            return;
        };
        let mut running = Vec::new();
        for (partition, offset) in self.start_partitions(&partitions, group) {
            // Without an offset the partition waits, paused, for the state store.
            if let Some(offset) = offset {
                if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                    tracing::error!(partition, error = %e, "cannot set start offset");
                }
                running.push(partition);
            }
        }
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(tpl.count() as f64);
        self.shared.assigned.store(tpl.count(), Ordering::SeqCst);
        if let Err(e) = consumer.assign(tpl) {
            tracing::error!(error = %e, "assign failed");
            return;
        }
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!(error = %e, "cannot pause the new assignment");
        }
        self.ready
            .store(running.len() == tpl.count(), Ordering::SeqCst);
        tracing::info!(
            partitions = running.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "assignment ready"
        );
        *self.unsplit.lock().expect("unsplit lock") = running;
    }

    /// exactly_once: this generation's group metadata, for the input offsets each
    /// transaction commits (None: at least once). Without it nothing can start.
    #[allow(clippy::result_unit_err)]
    fn group_metadata(
        &self,
        consumer: &BaseConsumer<Self>,
    ) -> Result<Option<Arc<ConsumerGroupMetadata>>, ()> {
        if self.shared.transactions.is_none() {
            return Ok(None);
        }
        match consumer.group_metadata() {
            Some(metadata) => Ok(Some(Arc::new(metadata))),
            None => {
                self.shared.report_fatal(PartitionError::ExactlyOnce {
                    partition: -1,
                    message: "the consumer has no group metadata for the transactions".into(),
                });
                Err(())
            }
        }
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

    /// Opens each partition's state, resumes it from the changelog where that is ahead
    /// (the changelog partitions are read in parallel, so an assignment takes about as
    /// long as its slowest restore), and spawns its task. Returns each partition's
    /// start offset, or None when it cannot start now (its store failed: the fault is
    /// reported; or a fatal error was).
    fn start_partitions(
        &self,
        partitions: &[i32],
        group: Option<Arc<ConsumerGroupMetadata>>,
    ) -> Vec<(i32, Option<Offset>)> {
        let topic = &self.shared.topic;
        let mut opened = Vec::new();
        let mut out = Vec::new();
        {
            let slot = self.store.lock().expect("store lock");
            for &partition in partitions {
                let Some(store) = &slot.current else {
                    out.push((partition, None));
                    continue;
                };
                match store
                    .partition(topic, partition)
                    .and_then(|store| Ok((store.next_offset()?, store)))
                {
                    Ok((local, store)) => opened.push((partition, store, local)),
                    Err(e) => {
                        self.shared.report_store_fault(partition, e);
                        out.push((partition, None));
                    }
                }
            }
        }
        type Resumed = (
            i32,
            PartitionStore,
            Result<(Option<i64>, Option<PartitionTransactions>), PartitionError>,
        );
        let resumed: Vec<Resumed> = std::thread::scope(|scope| {
            let handles: Vec<_> = opened
                .into_iter()
                .map(|(partition, mut store, local)| {
                    let group = group.clone();
                    scope.spawn(move || {
                        // exactly_once: the producer is initialized first, which aborts
                        // a previous owner's open transaction before the changelog is
                        // read (read_committed) to choose the state.
                        let txn = match (&self.shared.transactions, group) {
                            (Some(settings), Some(group)) => {
                                match PartitionTransactions::start(
                                    settings, topic, partition, group,
                                ) {
                                    Ok(txn) => Some(txn),
                                    Err(e) => return (partition, store, Err(e.into())),
                                }
                            }
                            _ => None,
                        };
                        if let Err(e) = store.scan_stored_users() {
                            return (partition, store, Err(e.into()));
                        }
                        let next = self
                            .resume_offset(partition, &mut store, local)
                            .map(|next| (next, txn));
                        (partition, store, next)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("restore thread panicked"))
                .collect()
        });
        for (partition, store, resumed) in resumed {
            let started = resumed.and_then(|(next, txn)| {
                let task =
                    PartitionTask::new(Arc::clone(&self.shared), partition, store, next, txn)?;
                Ok((task, next))
            });
            let (task, next_offset) = match started {
                Ok(x) => x,
                Err(PartitionError::Store(e)) => {
                    self.shared.report_store_fault(partition, e);
                    out.push((partition, None));
                    continue;
                }
                Err(e) => {
                    self.shared.report_fatal(e);
                    out.push((partition, None));
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
            let (records, records_rx) = mpsc::channel(PARTITION_QUEUE);
            let (control, control_rx) = mpsc::unbounded_channel();
            self.runtime.spawn(task.run(records_rx, control_rx));
            self.tasks
                .lock()
                .expect("tasks lock")
                .insert(partition, TaskHandle { records, control });
            tracing::info!(partition, ?offset, "partition started");
            out.push((partition, Some(offset)));
        }
        out
    }

    /// Where the restore of `partition` stops reading `topic`: below a fence appended
    /// now, which is exact and needs no wait; without one (it was not acknowledged),
    /// after the high watermark and half a second of quiet.
    fn changelog_end(&self, topic: &str, partition: i32) -> ReadTo {
        let fence = self.runtime.block_on(self.shared.producer.fence(
            topic,
            partition,
            Duration::from_secs(10),
        ));
        match fence {
            Ok(offset) => ReadTo::Fence(offset),
            Err(e) => {
                tracing::warn!(
                    topic,
                    partition,
                    error = %e,
                    "cannot append a fence to the changelog; reading it until it is quiet instead"
                );
                ReadTo::Quiet(Duration::from_millis(500))
            }
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
            self.changelog_end(topic, partition),
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
        self.assignments.fetch_add(1, Ordering::SeqCst);
        self.unsplit.lock().expect("unsplit lock").clear();
        let stopped = self.stop_tasks(Control::Stop);
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in stopped {
            let _ =
                offsets.add_partition_offset(&self.shared.topic, partition, Offset::Offset(next));
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

    /// Tells every task to stop (checkpointing or not, by `command`) and waits for them,
    /// at most `REVOKE_TIMEOUT` in all; returns the next offsets they checkpointed. A
    /// task still busy then (its final checkpoint waits for acknowledgements from a
    /// broker that may be unreachable) is let go uncommitted; it still finishes, and
    /// its partition is not started again here before it has (`wait_for_stopping`).
    fn stop_tasks(
        &self,
        command: fn(std::sync::mpsc::Sender<Option<i64>>) -> Control,
    ) -> Vec<(i32, i64)> {
        let tasks: Vec<(i32, TaskHandle)> =
            self.tasks.lock().expect("tasks lock").drain().collect();
        let mut replies = Vec::new();
        for (partition, task) in tasks {
            let (reply_tx, reply_rx) = std::sync::mpsc::channel();
            if task.control.send(command(reply_tx)).is_ok() {
                replies.push((partition, reply_rx));
            }
        }
        let deadline = Instant::now() + REVOKE_TIMEOUT;
        let mut stopped = Vec::new();
        for (partition, reply) in replies {
            match reply.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some(next)) => stopped.push((partition, next)),
                // Stopped without a checkpoint, or the task had already ended.
                Ok(None) | Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        partition,
                        "partition did not stop within {REVOKE_TIMEOUT:?}; releasing it uncommitted"
                    );
                    self.stopping
                        .lock()
                        .expect("stopping lock")
                        .insert(partition, reply);
                }
            }
        }
        stopped
    }

    /// Hands records that arrived on the consumer's main queue (before their partition
    /// had its own) to their task, waiting if its queue is full. Rare.
    fn dispatch(&self, partition: i32, records: Vec<InputRecord>) {
        let task = self
            .tasks
            .lock()
            .expect("tasks lock")
            .get(&partition)
            .map(|t| t.records.clone());
        match task {
            // A closed queue means the task ended; its records stay uncommitted and
            // are fetched again when it restarts.
            Some(records_tx) => {
                let _ = records_tx.blocking_send(records);
            }
            None => tracing::debug!(
                partition,
                n = records.len(),
                "records for a partition no longer owned"
            ),
        }
    }

    /// The state store failed: every partition pauses and its task stops without a
    /// checkpoint (nothing since the last one is kept; the outputs already sent are
    /// re-emitted identically later), and the store is closed until it works again.
    fn begin_recovery(&self, consumer: &BaseConsumer<Self>, fault: &StoreFault) {
        self.ready.store(false, Ordering::SeqCst);
        metrics::counter!(m::STORE_FAULTS).increment(1);
        self.alerts.set(
            STORE_ALERT,
            &self.store_path(),
            true,
            &format!(
                "state store failed (partition {}): {}; every partition is paused until it works again",
                fault.partition, fault.error
            ),
            serde_json::json!({ "partition": fault.partition, "error": fault.error.to_string() }),
        );
        if let Ok(assigned) = consumer.assignment() {
            if let Err(e) = consumer.pause(&assigned) {
                tracing::warn!(error = %e, "cannot pause the partitions");
            }
        }
        self.stop_tasks(Control::Abandon);
        self.store.lock().expect("store lock").current = None;
    }

    /// Reopens the store; on success every assigned partition starts again from its
    /// last checkpoint. Returns whether the store works again.
    fn try_recover(&self, consumer: &BaseConsumer<Self>) -> bool {
        let reopened = self.store.lock().expect("store lock").reopen();
        if let Err(e) = reopened {
            tracing::warn!(error = %e, "state store still failing");
            return false;
        }
        let Ok(assigned) = consumer.assignment() else {
            return false;
        };
        let topic = self.shared.topic.clone();
        let partitions: Vec<i32> = assigned
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let Ok(group) = self.group_metadata(consumer) else {
            return false;
        };
        let mut restart = TopicPartitionList::new();
        for (partition, offset) in self.start_partitions(&partitions, group) {
            let Some(offset) = offset else {
                // Failed again: the fault is reported and recovery starts over.
                self.stop_tasks(Control::Abandon);
                return false;
            };
            let _ = restart.add_partition_offset(&topic, partition, offset);
        }
        // Assigning again sets every start offset; the partitions stay paused until
        // the polling thread has given each its own queue again.
        self.assignments.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = consumer.assign(&restart) {
            tracing::error!(error = %e, "re-assign after the store recovered failed");
            self.stop_tasks(Control::Abandon);
            return false;
        }
        let _ = consumer.pause(&restart);
        *self.unsplit.lock().expect("unsplit lock") = partitions;
        self.ready.store(true, Ordering::SeqCst);
        self.alerts.set(
            STORE_ALERT,
            &self.store_path(),
            false,
            "state store works again; partitions resumed from their last checkpoints",
            serde_json::Value::Null,
        );
        true
    }

    /// The state store's directory: the subject of its alert.
    fn store_path(&self) -> String {
        let slot = self.store.lock().expect("store lock");
        slot.path.display().to_string()
    }

    fn sample_disk(&self) {
        let slot = self.store.lock().expect("store lock");
        if let Some(bytes) = slot.current.as_ref().and_then(StateStore::size_on_disk) {
            metrics::gauge!(m::STATE_DISK_BYTES).set(bytes as f64);
        }
    }
}

/// Backoff between attempts to reopen a failed state store.
struct Recovery {
    next_try: Instant,
    delay: Duration,
}

impl Recovery {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn failed_again(&mut self) {
        self.delay = (self.delay * 2).min(Self::MAX);
        self.next_try = Instant::now() + self.delay;
    }
}

/// The polling thread's partition queues: each assigned partition's records arrive
/// on its own, read only while the partition's task has room.
struct Queues {
    queues: HashMap<i32, PartitionQueue<SourceContext>>,
    /// The assignment these queues belong to.
    assignment: u64,
    waker: std::thread::Thread,
}

impl Queues {
    /// Drops queues of an earlier assignment, and gives newly assigned partitions
    /// their own queue before resuming their fetching.
    fn refresh(&mut self, consumer: &Arc<BaseConsumer<SourceContext>>) {
        let context = consumer.context();
        let now = context.assignments.load(Ordering::SeqCst);
        if now != self.assignment {
            self.queues.clear();
            self.assignment = now;
        }
        let unsplit = std::mem::take(&mut *context.unsplit.lock().expect("unsplit lock"));
        if unsplit.is_empty() {
            return;
        }
        let topic = &context.shared.topic;
        let mut resume = TopicPartitionList::new();
        for partition in unsplit {
            match consumer.split_partition_queue(topic, partition) {
                Some(mut queue) => {
                    let waker = self.waker.clone();
                    queue.set_nonempty_callback(move || waker.unpark());
                    self.queues.insert(partition, queue);
                }
                // Its records then come through the main queue.
                None => tracing::warn!(partition, "cannot give the partition its own queue"),
            }
            resume.add_partition(topic, partition);
        }
        if let Err(e) = consumer.resume(&resume) {
            tracing::error!(error = %e, "cannot resume the new assignment");
        }
    }

    /// Moves records from each queue whose task has room into that task; returns the
    /// records moved and the partitions left unread because their task is full.
    fn drain(&self, context: &SourceContext) -> (usize, usize) {
        let tasks = context.tasks.lock().expect("tasks lock");
        let (mut moved, mut full) = (0, 0);
        for (partition, queue) in &self.queues {
            let Some(task) = tasks.get(partition) else {
                continue;
            };
            if task.records.capacity() == 0 {
                full += 1;
                continue;
            }
            let mut batch = Vec::new();
            let polled_us = now_us();
            while batch.len() < MAX_BATCH {
                match queue.poll(Duration::ZERO) {
                    Some(Ok(message)) => batch.push(InputRecord::copy_of(&message, polled_us)),
                    Some(Err(e)) => {
                        tracing::warn!(partition, error = %e, "consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            moved += batch.len();
            // This thread is the queue's only sender and saw room, so this cannot be
            // full; a closed queue means the task ended, and its records are fetched
            // again when it restarts.
            if let Err(mpsc::error::TrySendError::Full(_)) = task.records.try_send(batch) {
                unreachable!("a partition queue with room refused a batch");
            }
        }
        (moved, full)
    }
}

fn poll_loop(
    consumer: Arc<BaseConsumer<SourceContext>>,
    feedback: Feedback,
    stop: Arc<AtomicBool>,
) {
    let context = consumer.context();
    // Alerts raised here are published by tasks on the worker's runtime.
    let _runtime = context.runtime.enter();
    let topic = context.shared.topic.clone();
    let mut queues = Queues {
        queues: HashMap::new(),
        assignment: context.assignments.load(Ordering::SeqCst),
        waker: std::thread::current(),
    };
    let paused_gauge = metrics::gauge!(m::PAUSED_PARTITIONS);
    let mut recovery: Option<Recovery> = None;
    // A store that fails again soon after recovering keeps its backoff.
    let mut last_recovered: Option<(Instant, Duration)> = None;
    let mut next_disk_sample = Instant::now();
    let mut early: HashMap<i32, Vec<InputRecord>> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        commit_requested(&consumer, &feedback.commits, &topic);
        if let (Some(fault), None) = (feedback.store_faults.try_iter().last(), &recovery) {
            context.begin_recovery(&consumer, &fault);
            let delay = match last_recovered {
                Some((at, delay)) if at.elapsed() < Duration::from_secs(60) => delay,
                _ => Recovery::FIRST,
            };
            recovery = Some(Recovery {
                next_try: Instant::now() + delay,
                delay,
            });
        }
        if let Some(r) = &mut recovery {
            if Instant::now() >= r.next_try {
                if context.try_recover(&consumer) {
                    // Faults reported by the tasks that were stopped are stale now.
                    feedback.store_faults.try_iter().for_each(drop);
                    last_recovered = Some((Instant::now(), (r.delay * 2).min(Recovery::MAX)));
                    recovery = None;
                } else {
                    r.failed_again();
                }
            }
        }
        // Rebalances and statistics are served here; records arrive here only for a
        // partition that has no queue of its own yet. All of them are handed on before
        // its own queue is read, so its records stay in order.
        let mut polled = 0;
        loop {
            match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    polled += 1;
                    early
                        .entry(message.partition())
                        .or_default()
                        .push(InputRecord::copy_of(&message, now_us()));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
            }
        }
        for (partition, records) in early.drain() {
            context.dispatch(partition, records);
        }
        queues.refresh(&consumer);
        let (moved, full) = queues.drain(context);
        paused_gauge.set(full as f64);
        if Instant::now() >= next_disk_sample {
            context.sample_disk();
            next_disk_sample = Instant::now() + Duration::from_secs(10);
        }
        if moved == 0 && polled == 0 {
            // A queue that fills wakes this thread; a full task is looked at again soon.
            let wait = if full > 0 || recovery.is_some() {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(20)
            };
            std::thread::park_timeout(wait);
        }
    }
    // Final checkpoints; each partition's final offset is committed synchronously there.
    drop(queues);
    context.revoke_all(&consumer);
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
