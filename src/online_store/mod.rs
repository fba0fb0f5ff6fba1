//! The online store: every user's latest feature vector, for real-time serving by other
//! services. Backends are picked by URL: `redis://` / `rediss://` (Redis, with password
//! in the URL) or `memory://` (in-process, for the demo and tests). The [`mirror`] side
//! worker feeds it without ever blocking the stream.
//!
//! Redis layout: one hash per user at `<prefix><user_id>` holding each feature by name,
//! plus `_partition`, `_offset` (the input record that produced the values) and `_ts`
//! (its event time). Writes are monotonic: a Lua script refuses a version older than the
//! stored one, so a stale writer (a worker that lost the partition) cannot go back in
//! time. Every key has a TTL, the feature-freshness limit.

pub mod mirror;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use mirror::Mirror;

/// Refuses versions older than the stored one (same partition: lower offset; another
/// partition: older event time), then writes all fields and the TTL.
/// KEYS[1] = hash; ARGV = partition, offset, ts, ttl_ms, then field/value pairs.
const WRITE_SCRIPT: &str = r#"
local p = redis.call('HGET', KEYS[1], '_partition')
if p then
  if p == ARGV[1] then
    if tonumber(redis.call('HGET', KEYS[1], '_offset')) >= tonumber(ARGV[2]) then return 0 end
  elseif tonumber(redis.call('HGET', KEYS[1], '_ts')) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], '_partition', ARGV[1], '_offset', ARGV[2], '_ts', ARGV[3], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

#[derive(Debug, thiserror::Error)]
pub enum OnlineStoreError {
    #[error("online store URL {url:?}: expected redis://, rediss:// or memory://")]
    Scheme { url: String },
    #[error("online store {url}: {message}")]
    Redis { url: String, message: String },
}

/// One user's latest features and the version that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureUpdate {
    pub user_id: String,
    pub partition: i32,
    pub offset: i64,
    pub ts: i64,
    pub values: Box<[f64]>,
}

impl FeatureUpdate {
    /// Whether this update supersedes `other` for the same user.
    pub fn is_newer_than(&self, other: &FeatureUpdate) -> bool {
        if self.partition == other.partition {
            self.offset > other.offset
        } else {
            self.ts >= other.ts
        }
    }
}

/// What the store needs to know about the values it holds.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub names: Vec<String>,
    pub ttl: Duration,
}

/// An online store backend, chosen by URL.
pub enum OnlineStore {
    Redis(Box<RedisStore>),
    Memory(MemoryStore),
}

impl OnlineStore {
    pub fn open(url: &str, layout: Layout) -> Result<OnlineStore, OnlineStoreError> {
        if url.starts_with("memory://") {
            Ok(OnlineStore::Memory(MemoryStore {
                layout,
                map: Arc::default(),
            }))
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            let client = redis::Client::open(url).map_err(|e| OnlineStoreError::Redis {
                url: redact(url),
                message: e.to_string(),
            })?;
            Ok(OnlineStore::Redis(Box::new(RedisStore {
                client,
                url: redact(url),
                layout,
                conn: None,
                script: None,
            })))
        } else {
            Err(OnlineStoreError::Scheme { url: redact(url) })
        }
    }

    /// A second handle on the same store (its own connection for Redis).
    pub fn reopen(&self) -> OnlineStore {
        match self {
            OnlineStore::Redis(r) => OnlineStore::Redis(Box::new(RedisStore {
                client: r.client.clone(),
                url: r.url.clone(),
                layout: r.layout.clone(),
                conn: None,
                script: None,
            })),
            OnlineStore::Memory(m) => OnlineStore::Memory(MemoryStore {
                layout: m.layout.clone(),
                map: Arc::clone(&m.map),
            }),
        }
    }

    /// Writes a batch; returns how many were applied (stale versions are skipped).
    pub async fn write(&mut self, batch: &[FeatureUpdate]) -> Result<usize, OnlineStoreError> {
        match self {
            OnlineStore::Redis(r) => r.write(batch).await,
            OnlineStore::Memory(m) => Ok(m.write(batch)),
        }
    }

    /// A user's stored fields, or None.
    pub async fn read(
        &mut self,
        user_id: &str,
    ) -> Result<Option<BTreeMap<String, String>>, OnlineStoreError> {
        match self {
            OnlineStore::Redis(r) => r.read(user_id).await,
            OnlineStore::Memory(m) => Ok(m.read(user_id)),
        }
    }
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn format_value(v: f64) -> String {
    format!("{v}")
}

pub struct RedisStore {
    client: redis::Client,
    url: String,
    layout: Layout,
    conn: Option<redis::aio::MultiplexedConnection>,
    script: Option<String>,
}

impl RedisStore {
    fn error(&self, e: impl std::fmt::Display) -> OnlineStoreError {
        OnlineStoreError::Redis {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    /// The connection and the loaded script's hash, (re)established as needed.
    async fn connection(
        &mut self,
    ) -> Result<(redis::aio::MultiplexedConnection, String), OnlineStoreError> {
        if let (Some(conn), Some(sha)) = (&self.conn, &self.script) {
            return Ok((conn.clone(), sha.clone()));
        }
        let connect = self.client.get_multiplexed_async_connection();
        let mut conn = tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .map_err(|_| self.error("connect timed out after 2 s"))?
            .map_err(|e| self.error(e))?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(WRITE_SCRIPT)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        self.conn = Some(conn.clone());
        self.script = Some(sha.clone());
        Ok((conn, sha))
    }

    async fn write(&mut self, batch: &[FeatureUpdate]) -> Result<usize, OnlineStoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let (mut conn, sha) = self.connection().await?;
        let ttl_ms = self.layout.ttl.as_millis() as u64;
        let mut pipe = redis::pipe();
        for u in batch {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(&sha)
                .arg(1)
                .arg(format!("{}{}", self.layout.prefix, u.user_id))
                .arg(u.partition)
                .arg(u.offset)
                .arg(u.ts)
                .arg(ttl_ms);
            for (name, value) in self.layout.names.iter().zip(u.values.iter()) {
                cmd.arg(name).arg(format_value(*value));
            }
        }
        let result: Result<Vec<i64>, _> =
            match tokio::time::timeout(Duration::from_secs(5), pipe.query_async(&mut conn)).await {
                Ok(r) => r.map_err(|e| self.error(e)),
                Err(_) => Err(self.error("write timed out after 5 s")),
            };
        match result {
            Ok(applied) => Ok(applied.iter().filter(|a| **a == 1).count()),
            Err(e) => {
                // Reconnect (and reload the script: a restarted Redis has lost it) next time.
                self.conn = None;
                self.script = None;
                Err(e)
            }
        }
    }

    async fn read(
        &mut self,
        user_id: &str,
    ) -> Result<Option<BTreeMap<String, String>>, OnlineStoreError> {
        let (mut conn, _) = self.connection().await?;
        let key = format!("{}{}", self.layout.prefix, user_id);
        let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        Ok((!fields.is_empty()).then_some(fields))
    }
}

/// In-process store with the same semantics (monotonic versions); TTL is not enforced.
pub struct MemoryStore {
    layout: Layout,
    map: Arc<Mutex<HashMap<String, FeatureUpdate>>>,
}

impl MemoryStore {
    fn write(&self, batch: &[FeatureUpdate]) -> usize {
        let mut map = self.map.lock().expect("memory store lock");
        let mut applied = 0;
        for u in batch {
            let newer = map.get(&u.user_id).is_none_or(|old| u.is_newer_than(old));
            if newer {
                map.insert(u.user_id.clone(), u.clone());
                applied += 1;
            }
        }
        applied
    }

    fn read(&self, user_id: &str) -> Option<BTreeMap<String, String>> {
        let map = self.map.lock().expect("memory store lock");
        map.get(user_id).map(|u| {
            let mut fields: BTreeMap<String, String> = self
                .layout
                .names
                .iter()
                .zip(u.values.iter())
                .map(|(n, v)| (n.clone(), format_value(*v)))
                .collect();
            fields.insert("_partition".into(), u.partition.to_string());
            fields.insert("_offset".into(), u.offset.to_string());
            fields.insert("_ts".into(), u.ts.to_string());
            fields
        })
    }

    /// Users held, for the demo's status line.
    pub fn len(&self) -> usize {
        self.map.lock().expect("memory store lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("rediss://user:pw@host"), "rediss://***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn newer_means_higher_offset_in_a_partition_and_later_ts_across() {
        let u = |partition, offset, ts| FeatureUpdate {
            user_id: "u".into(),
            partition,
            offset,
            ts,
            values: Box::new([]),
        };
        assert!(u(1, 10, 0).is_newer_than(&u(1, 9, 5)));
        assert!(!u(1, 9, 9).is_newer_than(&u(1, 10, 0)));
        assert!(u(2, 0, 7).is_newer_than(&u(1, 10, 5)));
        assert!(!u(2, 0, 4).is_newer_than(&u(1, 10, 5)));
    }
}
