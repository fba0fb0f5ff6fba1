//! Durable state in sled: one tree per input partition holding its users' states and,
//! in the same tree, the partition's next input offset. A checkpoint writes both in one
//! atomic batch, so after a crash the state and the offset always agree: every event
//! is applied to state exactly once.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use super::{decode_user_state, encode_user_state, StateDecodeError, UserState};

/// Key of the partition's next offset; user keys start with `USER_PREFIX`, so they
/// cannot collide with it.
const OFFSET_KEY: &[u8] = b"\0offset";
const USER_PREFIX: u8 = b'u';
/// A user's impressions waiting for a bandit reward.
const REWARD_PREFIX: u8 = b'r';
/// The partition's bandit posteriors.
const BANDIT_KEY: &[u8] = b"\0bandit";
const STATE_HASH_KEY: &[u8] = b"state_hash";
const PROBE_KEY: &[u8] = b"probe";
/// sled's page cache when the topology does not say (`state.store_cache_bytes`).
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("state store {path}: user {user:?}: {source}")]
    Corrupt {
        path: PathBuf,
        user: String,
        source: StateDecodeError,
    },
    #[error(
        "state store {path} was written by a topology with different features or lateness \
         (state hash {found:016x}, this topology {expected:016x}); use another state dir or remove it"
    )]
    Incompatible {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// The sled database of one worker.
#[derive(Clone)]
pub struct StateStore {
    db: sled::Db,
    path: PathBuf,
}

impl StateStore {
    /// Opens (or creates) the store and checks that it was written for the same feature
    /// definitions.
    pub fn open(path: &Path, state_hash: u64) -> Result<StateStore, StoreError> {
        Self::open_with_cache(path, state_hash, DEFAULT_CACHE_BYTES)
    }

    /// Like [`StateStore::open`], with sled's page cache bounded to `cache_bytes`.
    pub fn open_with_cache(
        path: &Path,
        state_hash: u64,
        cache_bytes: u64,
    ) -> Result<StateStore, StoreError> {
        let sled_err = |source| StoreError::Sled {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(path).map_err(|e| sled_err(sled::Error::Io(e)))?;
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(sled_err)?;
        match db.get(STATE_HASH_KEY).map_err(sled_err)? {
            Some(found) => {
                let found = u64::from_be_bytes(found.as_ref().try_into().unwrap_or_default());
                if found != state_hash {
                    return Err(StoreError::Incompatible {
                        path: path.to_owned(),
                        found,
                        expected: state_hash,
                    });
                }
            }
            None => {
                db.insert(STATE_HASH_KEY, &state_hash.to_be_bytes())
                    .map_err(sled_err)?;
                db.flush().map_err(sled_err)?;
            }
        }
        Ok(StateStore {
            db,
            path: path.to_owned(),
        })
    }

    /// Writes `bytes` and makes them durable, then removes them: whether the store
    /// takes writes again after a failure (a disk that filled up, say).
    pub fn probe_write(&self, bytes: usize) -> Result<(), StoreError> {
        let sled_err = |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        };
        self.db
            .insert(PROBE_KEY, vec![0x5a; bytes])
            .map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        self.db.remove(PROBE_KEY).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    /// Bytes the database takes on disk, if sled can tell.
    pub fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }

    /// The store of one input partition.
    pub fn partition(&self, topic: &str, partition: i32) -> Result<PartitionStore, StoreError> {
        let tree = self
            .db
            .open_tree(format!("p/{topic}/{partition}"))
            .map_err(|source| StoreError::Sled {
                path: self.path.clone(),
                source,
            })?;
        Ok(PartitionStore {
            tree,
            db: self.db.clone(),
            path: self.path.clone(),
            buffer: Vec::new(),
            stored: None,
        })
    }
}

/// The users a partition has in sled, by a 64-bit hash of their id. A user not in it
/// was never written, so its first event needs no sled lookup; that matters beyond the
/// lookup itself, because sled makes every lookup wait while any checkpoint batch is
/// being written (its batches take a process-wide write lock). A hash shared with a
/// stored user only costs a lookup. Built by [`PartitionStore::scan_stored_users`]
/// (a scan of the partition's keys, about 45 ms per 100k users); until then every
/// lookup goes to sled.
type StoredUsers = HashSet<u64, foldhash::fast::RandomState>;

fn user_hash(user: &[u8]) -> u64 {
    foldhash::fast::FixedState::with_seed(0x0061_7567_7572).hash_one(user)
}

/// Durable state of one input partition.
pub struct PartitionStore {
    tree: sled::Tree,
    db: sled::Db,
    path: PathBuf,
    buffer: Vec<u8>,
    stored: Option<StoredUsers>,
}

impl PartitionStore {
    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Learns which users this partition has in sled, so that users it never wrote
    /// are not looked up (see [`StoredUsers`]). The worker calls it on the partition's
    /// own restore thread when the partition is assigned.
    pub fn scan_stored_users(&mut self) -> Result<(), StoreError> {
        let mut stored = StoredUsers::default();
        for key in self.tree.scan_prefix([USER_PREFIX]).keys() {
            let key = key.map_err(|e| self.sled_err(e))?;
            stored.insert(user_hash(&key[1..]));
        }
        self.stored = Some(stored);
        Ok(())
    }

    fn mark_stored(&mut self, user: &str) {
        if let Some(stored) = &mut self.stored {
            stored.insert(user_hash(user.as_bytes()));
        }
    }

    /// The next input offset to process, if this partition was ever checkpointed here.
    pub fn next_offset(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .tree
            .get(OFFSET_KEY)
            .map_err(|e| self.sled_err(e))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    /// A user's checkpointed state.
    pub fn load_user(&self, user: &str) -> Result<Option<UserState>, StoreError> {
        if let Some(stored) = &self.stored {
            if !stored.contains(&user_hash(user.as_bytes())) {
                return Ok(None);
            }
        }
        let key = user_key(user);
        match self.tree.get(key).map_err(|e| self.sled_err(e))? {
            None => Ok(None),
            Some(bytes) => {
                decode_user_state(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        path: self.path.clone(),
                        user: user.to_owned(),
                        source,
                    })
            }
        }
    }

    /// The bandit's checkpointed posteriors and pending rewards (raw bytes).
    pub fn bandit(&self) -> Result<StoredBandit, StoreError> {
        let posteriors = self
            .tree
            .get(BANDIT_KEY)
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec());
        let mut pending = Vec::new();
        for item in self.tree.scan_prefix([REWARD_PREFIX]) {
            let (key, value) = item.map_err(|e| self.sled_err(e))?;
            pending.push((
                String::from_utf8_lossy(&key[1..]).into_owned(),
                value.to_vec(),
            ));
        }
        Ok((posteriors, pending))
    }

    /// Writes the changed users, the bandit's changes and the next offset in one atomic
    /// batch, then makes it durable: [`PartitionStore::prepare`], then
    /// [`StoreWriter::write`].
    pub async fn checkpoint<'a>(
        &mut self,
        dirty: impl Iterator<Item = (&'a str, &'a UserState)>,
        bandit: Option<BanditChanges>,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let batch = self.prepare(dirty, bandit, next_offset);
        self.writer().write(batch).await
    }

    /// Encodes a checkpoint: the changed users, the bandit's changes and the next
    /// offset, as one sled batch to write with [`StoreWriter::write`].
    pub fn prepare<'a>(
        &mut self,
        dirty: impl Iterator<Item = (&'a str, &'a UserState)>,
        bandit: Option<BanditChanges>,
        next_offset: i64,
    ) -> CheckpointBatch {
        let mut batch = sled::Batch::default();
        let mut users = 0;
        for (user, state) in dirty {
            self.buffer.clear();
            encode_user_state(state, &mut self.buffer);
            batch.insert(user_key(user), self.buffer.as_slice());
            // Before the write is durable: a user marked stored too early only costs a
            // lookup that finds nothing.
            self.mark_stored(user);
            users += 1;
        }
        if let Some(changes) = bandit {
            if let Some(posteriors) = changes.posteriors {
                batch.insert(BANDIT_KEY, posteriors);
            }
            for (user, value) in changes.pending {
                let key = prefixed(REWARD_PREFIX, &user);
                match value {
                    Some(bytes) => batch.insert(key, bytes),
                    None => batch.remove(key),
                }
            }
        }
        batch.insert(OFFSET_KEY, &next_offset.to_be_bytes());
        CheckpointBatch {
            batch,
            next_offset,
            users,
        }
    }

    /// A handle that writes this partition's prepared checkpoints, from any task.
    pub fn writer(&self) -> StoreWriter {
        StoreWriter {
            tree: self.tree.clone(),
            db: self.db.clone(),
            path: self.path.clone(),
        }
    }

    /// Writes users restored from the changelog (already encoded), then the offset they
    /// are valid at, and makes them durable. The partition's old offset is removed
    /// first, so until the new one is written the partition reads as having no local
    /// state: a crash in between restores it again instead of pairing an old offset with
    /// new states. The users are written by several threads (sled takes concurrent
    /// inserts), each a contiguous range of keys.
    pub fn restore(
        &mut self,
        users: impl Iterator<Item = (String, Vec<u8>)>,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        for (user, bytes) in users {
            decode_user_state(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                user: user.clone(),
                source,
            })?;
            self.mark_stored(&user);
            writes.push((user_key(&user), bytes));
        }
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.tree
            .remove(OFFSET_KEY)
            .and_then(|_| self.db.flush())
            .map_err(|e| self.sled_err(e))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let chunk = writes.len().div_ceil(threads).max(1);
        let tree = &self.tree;
        std::thread::scope(|scope| {
            let writers: Vec<_> = writes
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter().try_for_each(|(key, bytes)| {
                            tree.insert(key, bytes.as_slice()).map(drop)
                        })
                    })
                })
                .collect();
            writers
                .into_iter()
                .try_for_each(|w| w.join().expect("restore writer panicked"))
        })
        .and_then(|()| tree.insert(OFFSET_KEY, &next_offset.to_be_bytes()))
        .and_then(|_| self.db.flush())
        .map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// Every stored user and its state, for tools and tests.
    pub fn users(&self) -> impl Iterator<Item = Result<(String, UserState), StoreError>> + '_ {
        self.tree.scan_prefix([USER_PREFIX]).map(move |item| {
            let (key, value) = item.map_err(|e| self.sled_err(e))?;
            let user = String::from_utf8_lossy(&key[1..]).into_owned();
            let state = decode_user_state(&value).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                user: user.clone(),
                source,
            })?;
            Ok((user, state))
        })
    }
}

/// One checkpoint, encoded and not yet written.
pub struct CheckpointBatch {
    batch: sled::Batch,
    next_offset: i64,
    users: usize,
}

impl CheckpointBatch {
    /// The input offset the checkpoint resumes from.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// How many users' states it writes.
    pub fn users(&self) -> usize {
        self.users
    }
}

/// Writes one partition's checkpoints; cheap to make, and usable from another task
/// than the partition's while it goes on processing.
pub struct StoreWriter {
    tree: sled::Tree,
    db: sled::Db,
    path: PathBuf,
}

impl StoreWriter {
    /// Applies the batch atomically, then makes it durable.
    pub async fn write(&self, checkpoint: CheckpointBatch) -> Result<(), StoreError> {
        let sled_err = |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        };
        // sled's batch is CPU work of several µs per user: on a blocking thread, so
        // that the partition tasks sharing the runtime's workers are not held up by it.
        let tree = self.tree.clone();
        tokio::task::spawn_blocking(move || tree.apply_batch(checkpoint.batch))
            .await
            .unwrap_or_else(|join| {
                Err(sled::Error::ReportableBug(format!(
                    "writing a checkpoint: {join}"
                )))
            })
            .map_err(sled_err)?;
        self.db.flush_async().await.map_err(sled_err)?;
        Ok(())
    }
}

/// The bandit's posteriors, if any, and each user's pending rewards, undecoded.
pub type StoredBandit = (Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// What a checkpoint writes for the bandit: the posteriors when they changed, and each
/// changed user's pending rewards (None: the user has none left).
#[derive(Debug, Default)]
pub struct BanditChanges {
    pub posteriors: Option<Vec<u8>>,
    pub pending: Vec<(String, Option<Vec<u8>>)>,
}

fn user_key(user: &str) -> Vec<u8> {
    prefixed(USER_PREFIX, user)
}

fn prefixed(prefix: u8, user: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(user.len() + 1);
    key.push(prefix);
    key.extend_from_slice(user.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AggState;

    fn state(count: u64) -> UserState {
        UserState {
            max_ts: 1_767_225_703_544,
            aggs: vec![AggState::Lifetime(count)],
        }
    }

    fn encoded(count: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_user_state(&state(count), &mut bytes);
        bytes
    }

    #[tokio::test]
    async fn users_written_by_a_checkpoint_or_a_restore_are_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 7).unwrap();
        let mut partition = store.partition("events", 0).unwrap();
        partition.scan_stored_users().unwrap();
        assert_eq!(partition.load_user("u1").unwrap(), None);
        let written = state(3);
        partition
            .checkpoint([("u1", &written)].into_iter(), None, 10)
            .await
            .unwrap();
        assert_eq!(partition.load_user("u1").unwrap(), Some(state(3)));
        assert_eq!(partition.load_user("u2").unwrap(), None);

        // A partition opened again finds them before its scan (by lookups), and after
        // it (the scan learns them from sled).
        let mut reopened = store.partition("events", 0).unwrap();
        assert_eq!(reopened.load_user("u1").unwrap(), Some(state(3)));
        reopened.scan_stored_users().unwrap();
        assert_eq!(reopened.load_user("u1").unwrap(), Some(state(3)));
        assert_eq!(reopened.next_offset().unwrap(), Some(10));

        // A restore replaces states and the offset, and adds new users.
        let users = (0..1000).map(|i| (format!("r{i}"), encoded(i)));
        reopened
            .restore(users.chain([("u1".to_owned(), encoded(9))]), 42)
            .unwrap();
        assert_eq!(reopened.next_offset().unwrap(), Some(42));
        assert_eq!(reopened.load_user("u1").unwrap(), Some(state(9)));
        assert_eq!(reopened.load_user("r999").unwrap(), Some(state(999)));
        let mut again = store.partition("events", 0).unwrap();
        again.scan_stored_users().unwrap();
        assert_eq!(again.users().count(), 1001);
        assert_eq!(again.load_user("r0").unwrap(), Some(state(0)));
    }

    #[test]
    fn a_corrupt_restored_state_is_refused_and_the_old_offset_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 7).unwrap();
        let mut partition = store.partition("events", 0).unwrap();
        partition
            .restore([("a".to_owned(), encoded(1))].into_iter(), 5)
            .unwrap();
        let err = partition
            .restore([("b".to_owned(), vec![0xff])].into_iter(), 9)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref user, .. } if user == "b"),
            "{err}"
        );
        assert_eq!(partition.next_offset().unwrap(), Some(5));
    }
}
