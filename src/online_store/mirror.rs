//! The side worker that mirrors changed users to the online store. Partition tasks hand
//! it their changed users after each checkpoint; it never blocks them. Its queue is
//! bounded by users and coalesces per user, so the latest value wins; when the store is
//! down or slow it retries with capped backoff and catches up when the store returns.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{FeatureUpdate, OnlineStore};
use crate::metrics as m;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Queued {
    update: FeatureUpdate,
    /// When the user was first queued (the wait the gauge reports).
    since: Instant,
    /// Its entry in [`Queue::order`]; entries with another number are stale.
    seq: u64,
}

/// Users waiting, written oldest first: the latest update per user, and the users in
/// the order they were queued. A user moved to the front (a failed batch put back)
/// leaves a stale entry behind, skipped when it comes up.
#[derive(Default)]
struct Queue {
    users: HashMap<String, Queued>,
    order: VecDeque<(u64, String)>,
    next_seq: u64,
}

impl Queue {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// The user at the front and its entry, after dropping stale entries there.
    fn front(&mut self) -> Option<&Queued> {
        while let Some((seq, user)) = self.order.front() {
            match self.users.get(user) {
                Some(queued) if queued.seq == *seq => break,
                _ => {
                    self.order.pop_front();
                }
            }
        }
        let (_, user) = self.order.front()?;
        self.users.get(user)
    }

    /// Takes the user at the front out of the queue.
    fn pop_front(&mut self) -> Option<Queued> {
        self.front()?;
        let (_, user) = self.order.pop_front()?;
        self.users.remove(&user)
    }
}

/// The queue between the partition tasks and the writer.
pub struct Mirror {
    queue: Mutex<Queue>,
    capacity: usize,
    batch: usize,
    wake: tokio::sync::Notify,
}

impl Mirror {
    pub fn new(capacity: usize, batch: usize) -> Mirror {
        Mirror {
            queue: Mutex::default(),
            capacity: capacity.max(1),
            batch: batch.max(1),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("mirror queue lock")
    }

    /// Queues updates without waiting. A user already queued gets the newer value (and
    /// keeps its place). When the queue is full, updates for users not yet queued are
    /// handed back: the caller keeps them and offers them again, so nothing is lost.
    pub fn offer(&self, updates: Vec<FeatureUpdate>) -> Vec<FeatureUpdate> {
        let mut rejected = Vec::new();
        {
            let mut queue = self.lock();
            let now = Instant::now();
            for update in updates {
                if let Some(queued) = queue.users.get_mut(&update.user_id) {
                    if update.is_newer_than(&queued.update) {
                        queued.update = update;
                    }
                } else if queue.users.len() < self.capacity {
                    let seq = queue.seq();
                    queue.order.push_back((seq, update.user_id.clone()));
                    queue.users.insert(
                        update.user_id.clone(),
                        Queued {
                            update,
                            since: now,
                            seq,
                        },
                    );
                } else {
                    rejected.push(update);
                }
            }
        }
        self.wake.notify_one();
        rejected
    }

    /// Users waiting to be written.
    pub fn pending(&self) -> usize {
        self.lock().users.len()
    }

    /// Up to `batch` users, the longest waiting first, with when each was queued.
    fn take_batch(&self) -> (Vec<FeatureUpdate>, Vec<Instant>) {
        let mut queue = self.lock();
        let mut updates = Vec::new();
        let mut since = Vec::new();
        while updates.len() < self.batch {
            let Some(queued) = queue.pop_front() else {
                break;
            };
            updates.push(queued.update);
            since.push(queued.since);
        }
        (updates, since)
    }

    /// Puts a failed batch back at the front, in its order. A user queued again
    /// meanwhile keeps its newer value and moves to the front with the earlier time.
    fn requeue(&self, updates: Vec<FeatureUpdate>, since: Vec<Instant>) {
        let mut queue = self.lock();
        for (update, since) in updates.into_iter().zip(since).rev() {
            let seq = queue.seq();
            queue.order.push_front((seq, update.user_id.clone()));
            match queue.users.get_mut(&update.user_id) {
                Some(queued) => {
                    queued.since = queued.since.min(since);
                    queued.seq = seq;
                }
                None => {
                    queue
                        .users
                        .insert(update.user_id.clone(), Queued { update, since, seq });
                }
            }
        }
    }

    /// When the longest-waiting user was queued.
    fn oldest(&self) -> Option<Instant> {
        self.lock().front().map(|q| q.since)
    }

    /// Writes queued users until `stop` is set and the queue is drained (or, once
    /// stopping, until `drain_timeout` passes).
    pub async fn run(
        self: Arc<Self>,
        mut store: OnlineStore,
        stop: Arc<AtomicBool>,
        drain_timeout: Duration,
    ) {
        let pending_gauge = metrics::gauge!(m::ONLINE_PENDING_USERS);
        let behind_gauge = metrics::gauge!(m::ONLINE_SECONDS_BEHIND);
        let errors = metrics::counter!(m::ONLINE_WRITE_ERRORS);
        let written = metrics::counter!(m::ONLINE_USERS_WRITTEN);
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        let mut stopping_since: Option<Instant> = None;
        loop {
            if stop.load(Ordering::SeqCst) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if self.pending() == 0 || since.elapsed() > drain_timeout {
                    break;
                }
            }
            let (updates, since) = self.take_batch();
            if updates.is_empty() {
                pending_gauge.set(0.0);
                behind_gauge.set(0.0);
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.wake.notified()).await;
                continue;
            }
            match store.write(&updates).await {
                Ok(_) => {
                    written.increment(updates.len() as u64);
                    if failing {
                        tracing::info!("online store reachable again; catching up");
                        failing = false;
                    }
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    errors.increment(1);
                    if !failing {
                        tracing::warn!(error = %e, "online store write failed; retrying with backoff (predictions continue)");
                        failing = true;
                    }
                    self.requeue(updates, since);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            pending_gauge.set(self.pending() as f64);
            behind_gauge.set(self.oldest().map_or(0.0, |t| t.elapsed().as_secs_f64()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(user: &str, offset: i64) -> FeatureUpdate {
        FeatureUpdate {
            user_id: user.into(),
            partition: 0,
            offset,
            ts: offset,
            values: Box::new([offset as f64]),
        }
    }

    #[test]
    fn coalesces_per_user_and_hands_back_what_does_not_fit() {
        let mirror = Mirror::new(2, 10);
        assert!(mirror
            .offer(vec![update("a", 1), update("b", 1)])
            .is_empty());
        assert!(
            mirror
                .offer(vec![update("a", 3), update("a", 2)])
                .is_empty(),
            "queued users always fit"
        );
        let rejected = mirror.offer(vec![update("c", 1)]);
        assert_eq!(rejected, vec![update("c", 1)]);
        let (updates, since) = mirror.take_batch();
        let users: Vec<&str> = updates.iter().map(|u| u.user_id.as_str()).collect();
        assert_eq!(users, ["a", "b"], "oldest first");
        assert_eq!(updates[0].offset, 3, "latest value wins");
        assert_eq!(mirror.pending(), 0);
        mirror.requeue(updates, since);
        assert_eq!(mirror.pending(), 2);
    }

    #[test]
    fn a_failed_batch_goes_back_to_the_front_once_per_user() {
        let mirror = Mirror::new(10, 2);
        mirror.offer(vec![update("a", 1)]);
        let first_queued = mirror.oldest().unwrap();
        mirror.offer(vec![update("b", 1), update("c", 1)]);
        let (updates, since) = mirror.take_batch();
        assert_eq!(updates, vec![update("a", 1), update("b", 1)]);
        // While the batch is being written, "a" changes again and queues behind "c".
        mirror.offer(vec![update("a", 2)]);
        mirror.requeue(updates, since);
        assert_eq!(
            mirror.oldest(),
            Some(first_queued),
            "the requeued users wait longest"
        );
        let (first, _) = mirror.take_batch();
        let (second, _) = mirror.take_batch();
        let (third, _) = mirror.take_batch();
        assert_eq!(
            first,
            vec![update("a", 2), update("b", 1)],
            "newer value, front place"
        );
        assert_eq!(second, vec![update("c", 1)], "a's old place is skipped");
        assert!(third.is_empty());
        assert_eq!(mirror.pending(), 0);
        assert_eq!(mirror.oldest(), None);
    }
}
