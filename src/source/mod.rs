//! The Kafka source: one consumer per worker, polled on its own thread, that hands each
//! assigned partition's records to that partition's task. Rebalances are handled here:
//! an assigned partition resumes from the offset stored with its state in sled; a
//! revoked one checkpoints and commits before it is let go.
//!
//! Backpressure is per partition: a task whose queue is full has its partition's
//! fetching paused, so a slow partition never holds up the others. A failing state
//! store (a full disk, an I/O error) pauses every partition, raises an alert, and is
//! reopened with backoff; the partitions then resume from their last checkpoints.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::alerts::Alerts;
use crate::metrics as m;
use crate::pipeline::{Control, PartitionError, PartitionTask, Shared, StoreFault};
use crate::state::store::{StateStore, StoreError};

/// Records handed to a partition task per message, at most.
const MAX_BATCH: usize = 1024;
/// Batches queued per partition before its fetching pauses (backpressure).
const PARTITION_QUEUE: usize = 8;
/// How long a revoked partition may take to checkpoint.
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
            flow: Mutex::default(),
            ready,
        };
        let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
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
    records: mpsc::Sender<Vec<OwnedMessage>>,
    control: mpsc::UnboundedSender<Control>,
}

/// Backpressure: records a partition's full queue could not take yet, and the
/// partitions whose fetching is paused meanwhile. A slow partition (a hot user, a
/// failing store) pauses only itself; the polling thread never waits on one.
#[derive(Default)]
struct Flow {
    held: HashMap<i32, Vec<OwnedMessage>>,
    paused: HashSet<i32>,
}

struct SourceContext {
    shared: Arc<Shared>,
    store: Mutex<StoreSlot>,
    alerts: Alerts,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<HashMap<i32, TaskHandle>>,
    flow: Mutex<Flow>,
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
    /// Starts a task per assigned partition, each resuming from its sled offset.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        *self.flow.lock().expect("flow lock") = Flow::default();
        let topic = self.shared.topic.clone();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut waiting = TopicPartitionList::new();
        for partition in partitions {
            match self.start_partition(partition) {
                Ok(offset) => {
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(partition, error = %e, "cannot set start offset");
                    }
                }
                // The store is failing: the partition starts once it works again.
                Err(()) => {
                    let _ = waiting.add_partition(&topic, partition);
                }
            }
        }
        let started = self.tasks.lock().expect("tasks lock").len();
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(tpl.count() as f64);
        self.shared.assigned.store(tpl.count(), Ordering::SeqCst);
        match consumer.assign(tpl) {
            Ok(()) => {
                if waiting.count() > 0 {
                    if let Err(e) = consumer.pause(&waiting) {
                        tracing::warn!(error = %e, "cannot pause partitions waiting for the state store");
                    }
                }
                self.ready.store(started == tpl.count(), Ordering::SeqCst);
            }
            Err(e) => tracing::error!(error = %e, "assign failed"),
        }
    }

    /// Opens a partition's state (restoring it from the changelog when there is none
    /// here) and spawns its task; returns where to start fetching. Err: it cannot start
    /// now (its state store failed, or a fatal error was reported).
    fn start_partition(&self, partition: i32) -> Result<Offset, ()> {
        let topic = &self.shared.topic;
        let opened = {
            let slot = self.store.lock().expect("store lock");
            let Some(store) = &slot.current else {
                return Err(());
            };
            store
                .partition(topic, partition)
                .and_then(|store| Ok((store.next_offset()?, store)))
        };
        let (mut next_offset, mut store) = match opened {
            Ok(x) => x,
            Err(e) => {
                self.shared.report_store_fault(partition, e);
                return Err(());
            }
        };
        if next_offset.is_none() {
            match self.restore(partition, &mut store) {
                Ok(restored) => next_offset = restored,
                Err(PartitionError::Store(e)) => {
                    self.shared.report_store_fault(partition, e);
                    return Err(());
                }
                Err(e) => {
                    self.shared.report_fatal(e);
                    return Err(());
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
        let task = match PartitionTask::new(Arc::clone(&self.shared), partition, store, next_offset)
        {
            Ok(task) => task,
            Err(PartitionError::Store(e)) => {
                self.shared.report_store_fault(partition, e);
                return Err(());
            }
            Err(e) => {
                self.shared.report_fatal(e);
                return Err(());
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
        Ok(offset)
    }

    /// Restores a partition without local state from the changelog into sled; returns
    /// the offset to resume at (None: nothing in the changelog, replay the input).
    fn restore(
        &self,
        partition: i32,
        store: &mut crate::state::store::PartitionStore,
    ) -> Result<Option<i64>, PartitionError> {
        let Some((topic, config)) = &self.shared.changelog else {
            return Ok(None);
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
            return Ok(None);
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
        *self.flow.lock().expect("flow lock") = Flow::default();
        let stopped = self.stop_tasks(Control::Stop);
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in stopped {
            let _ =
                offsets.add_partition_offset(&self.shared.topic, partition, Offset::Offset(next));
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

    /// Tells every task to stop (checkpointing or not, by `command`) and waits for each;
    /// returns the next offsets they checkpointed.
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
        let mut stopped = Vec::new();
        for (partition, reply) in replies {
            match reply.recv_timeout(REVOKE_TIMEOUT) {
                Ok(Some(next)) => stopped.push((partition, next)),
                // Stopped without a checkpoint, or the task had already ended.
                Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!(partition, "partition did not stop in time")
                }
            }
        }
        stopped
    }

    /// Hands records to their partition's task without waiting. A full queue pauses the
    /// partition's fetching and keeps the records until the task catches up.
    fn dispatch(&self, consumer: &BaseConsumer<Self>, partition: i32, records: Vec<OwnedMessage>) {
        let mut flow = self.flow.lock().expect("flow lock");
        if let Some(held) = flow.held.get_mut(&partition) {
            // Fetched before the pause took effect: they queue behind the held ones.
            held.extend(records);
            return;
        }
        let sent = {
            let tasks = self.tasks.lock().expect("tasks lock");
            match tasks.get(&partition) {
                Some(task) => task.records.try_send(records),
                None => {
                    tracing::debug!(
                        partition,
                        n = records.len(),
                        "records for a partition no longer owned"
                    );
                    return;
                }
            }
        };
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(records)) => {
                flow.held.insert(partition, records);
                if flow.paused.insert(partition) {
                    set_paused(consumer, &self.shared.topic, partition, true);
                }
            }
            // A closed queue means the task ended (failed or abandoned); its records
            // stay uncommitted and are fetched again when it restarts.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Offers held records again, and resumes a paused partition once its task has
    /// drained half its queue (so one pause costs one refetch, not one per batch).
    fn relieve(&self, consumer: &BaseConsumer<Self>) {
        let mut flow = self.flow.lock().expect("flow lock");
        if flow.paused.is_empty() {
            return;
        }
        let tasks = self.tasks.lock().expect("tasks lock");
        let Flow { held, paused } = &mut *flow;
        paused.retain(|&partition| {
            let Some(task) = tasks.get(&partition) else {
                held.remove(&partition);
                return true; // not running (store failing): stays paused
            };
            if let Some(records) = held.remove(&partition) {
                match task.records.try_send(records) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(records)) => {
                        held.insert(partition, records);
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return true,
                }
            }
            if task.records.capacity() * 2 < PARTITION_QUEUE {
                return true;
            }
            set_paused(consumer, &self.shared.topic, partition, false);
            false
        });
        metrics::gauge!(m::PAUSED_PARTITIONS).set(paused.len() as f64);
    }

    fn is_backlogged(&self) -> bool {
        !self.flow.lock().expect("flow lock").paused.is_empty()
    }

    /// The state store failed: every partition pauses and its task stops without a
    /// checkpoint (nothing since the last one is kept; the outputs already sent are
    /// re-emitted identically later), and the store is closed until it works again.
    fn begin_recovery(&self, consumer: &BaseConsumer<Self>, fault: &StoreFault) {
        self.ready.store(false, Ordering::SeqCst);
        metrics::counter!(m::STORE_FAULTS).increment(1);
        self.alerts.set(
            STORE_ALERT,
            &self.store.lock().expect("store lock").path.display().to_string(),
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
            let mut flow = self.flow.lock().expect("flow lock");
            flow.held.clear();
            flow.paused = assigned
                .elements_for_topic(&self.shared.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
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
        let mut restart = TopicPartitionList::new();
        for element in assigned.elements_for_topic(&topic) {
            let partition = element.partition();
            let Ok(offset) = self.start_partition(partition) else {
                // Failed again: the fault is reported and recovery starts over.
                self.stop_tasks(Control::Abandon);
                return false;
            };
            let _ = restart.add_partition_offset(&topic, partition, offset);
        }
        // Assigning again sets every start offset; fetching resumes from there.
        if let Err(e) = consumer.assign(&restart) {
            tracing::error!(error = %e, "re-assign after the store recovered failed");
            self.stop_tasks(Control::Abandon);
            return false;
        }
        let _ = consumer.resume(&restart);
        *self.flow.lock().expect("flow lock") = Flow::default();
        metrics::gauge!(m::PAUSED_PARTITIONS).set(0.0);
        self.ready.store(true, Ordering::SeqCst);
        self.alerts.set(
            STORE_ALERT,
            &self
                .store
                .lock()
                .expect("store lock")
                .path
                .display()
                .to_string(),
            false,
            "state store works again; partitions resumed from their last checkpoints",
            serde_json::Value::Null,
        );
        true
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

fn poll_loop(consumer: BaseConsumer<SourceContext>, feedback: Feedback, stop: Arc<AtomicBool>) {
    let context = consumer.context();
    // Alerts raised here are published by tasks on the worker's runtime.
    let _runtime = context.runtime.enter();
    let mut batches: HashMap<i32, Vec<OwnedMessage>> = HashMap::new();
    let topic = context.shared.topic.clone();
    let mut recovery: Option<Recovery> = None;
    // A store that fails again soon after recovering keeps its backoff.
    let mut last_recovered: Option<(Instant, Duration)> = None;
    let mut next_disk_sample = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        commit_requested(&consumer, &feedback.commits, &topic);
        let fault = feedback.store_faults.try_iter().last();
        if let (Some(fault), None) = (&fault, &recovery) {
            context.begin_recovery(&consumer, fault);
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
        context.relieve(&consumer);
        let mut polled = 0;
        // Paused partitions are checked again soon; otherwise poll may wait.
        let mut wait = if context.is_backlogged() || recovery.is_some() {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(100)
        };
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
            context.dispatch(&consumer, partition, records);
        }
        if Instant::now() >= next_disk_sample {
            context.sample_disk();
            next_disk_sample = Instant::now() + Duration::from_secs(10);
        }
    }
    // Final checkpoints; each partition's final offset is committed synchronously there.
    context.revoke_all(&consumer);
    consumer.unsubscribe();
}

/// Pauses or resumes fetching one partition (a partition no longer assigned is ignored).
fn set_paused(consumer: &BaseConsumer<SourceContext>, topic: &str, partition: i32, paused: bool) {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let result = if paused {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    if let Err(e) = result {
        tracing::debug!(partition, paused, error = %e, "pause/resume refused");
    }
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
