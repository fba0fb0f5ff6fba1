//! The side worker that mirrors changed users to the online store. Partition tasks hand
//! it their changed users after each checkpoint; it never blocks them. Its queue is
//! bounded by users and coalesces per user, so the latest value wins; when the store is
//! down or slow it retries with capped backoff and catches up when the store returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{FeatureUpdate, OnlineStore};
use crate::metrics as m;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Queued {
    update: FeatureUpdate,
    since: Instant,
}

/// The queue between the partition tasks and the writer.
pub struct Mirror {
    queue: Mutex<HashMap<String, Queued>>,
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

    /// Queues updates without waiting. A user already queued gets the newer value. When
    /// the queue is full, updates for users not yet queued are handed back: the caller
    /// keeps them and offers them again, so nothing is lost.
    pub fn offer(&self, updates: Vec<FeatureUpdate>) -> Vec<FeatureUpdate> {
        let mut rejected = Vec::new();
        {
            let mut queue = self.queue.lock().expect("mirror queue lock");
            for update in updates {
                if let Some(queued) = queue.get_mut(&update.user_id) {
                    if update.is_newer_than(&queued.update) {
                        queued.update = update;
                    }
                } else if queue.len() < self.capacity {
                    queue.insert(
                        update.user_id.clone(),
                        Queued {
                            update,
                            since: Instant::now(),
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
        self.queue.lock().expect("mirror queue lock").len()
    }

    fn take_batch(&self) -> Vec<(FeatureUpdate, Instant)> {
        let mut queue = self.queue.lock().expect("mirror queue lock");
        let users: Vec<String> = queue.keys().take(self.batch).cloned().collect();
        users
            .into_iter()
            .filter_map(|u| queue.remove(&u))
            .map(|q| (q.update, q.since))
            .collect()
    }

    /// Puts a failed batch back, unless a newer value came in meanwhile.
    fn requeue(&self, batch: Vec<(FeatureUpdate, Instant)>) {
        let mut queue = self.queue.lock().expect("mirror queue lock");
        for (update, since) in batch {
            match queue.get_mut(&update.user_id) {
                Some(queued) => queued.since = queued.since.min(since),
                None => {
                    queue.insert(update.user_id.clone(), Queued { update, since });
                }
            }
        }
    }

    fn oldest(&self) -> Option<Instant> {
        self.queue
            .lock()
            .expect("mirror queue lock")
            .values()
            .map(|q| q.since)
            .min()
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
            let batch = self.take_batch();
            if batch.is_empty() {
                pending_gauge.set(0.0);
                behind_gauge.set(0.0);
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.wake.notified()).await;
                continue;
            }
            let updates: Vec<FeatureUpdate> = batch.iter().map(|(u, _)| u.clone()).collect();
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
                    self.requeue(batch);
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
        let batch = mirror.take_batch();
        let a = batch.iter().find(|(u, _)| u.user_id == "a").unwrap();
        assert_eq!(a.0.offset, 3, "latest value wins");
        assert_eq!(mirror.pending(), 0);
        mirror.requeue(batch);
        assert_eq!(mirror.pending(), 2);
    }
}
