//! The online store, against a real Redis started per test: after the golden stream
//! every user's hash equals that user's last golden row, with a TTL on every key; a
//! stale writer cannot go back in time; a Redis outage never stops predictions and
//! Redis converges once it is back.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use augur::online_store::{FeatureUpdate, Layout, OnlineStore};
use common::*;

/// A private redis-server on a free port. `start` keeps an append-only file fsynced on
/// every write, so that a SIGKILL and restart keeps what was acknowledged.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Listen with TLS on `port` (and no plain port).
    tls: bool,
    extra: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(false, &["--appendonly", "yes", "--appendfsync", "always"])
    }

    fn start_with(tls: bool, extra: &[&str]) -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let listen = if self.tls {
            vec!["--port", "0", "--tls-port", &port]
        } else {
            vec!["--port", &port]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(listen)
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Each user's last golden row (file order) and last event time.
fn final_rows() -> HashMap<String, (Vec<f64>, i64)> {
    let (_, rows) = golden_features();
    let mut last = HashMap::new();
    for (user, line) in golden_events() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let id = v["event_id"].as_str().unwrap();
        last.insert(user, (rows[id].clone(), v["ts"].as_i64().unwrap()));
    }
    last
}

/// Users whose hash does not (yet) equal their final golden row.
fn mismatched_users(redis: &Redis, names: &[String]) -> Vec<String> {
    let mut con = redis.connection();
    let mut bad = Vec::new();
    for (user, (values, ts)) in final_rows() {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("augur:ctr:user:{user}"))
            .query(&mut con)
            .unwrap();
        let ok = fields.get("_ts").map(String::as_str) == Some(ts.to_string().as_str())
            && names.iter().zip(&values).all(|(name, want)| {
                fields
                    .get(name)
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|got| (got - want).abs() <= 1e-9 * want.abs().max(1e-12))
            });
        if !ok {
            bad.push(user);
        }
    }
    bad.sort();
    bad
}

fn wait_until_converged(redis: &Redis, names: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let bad = mismatched_users(redis, names);
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} users never matched their final golden row, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn topology_with_store(dir: &Path, topics: &Topics, url: &str, admin_port: u16) -> PathBuf {
    let url_line = format!("url: \"{url}\"");
    let listen = format!("listen: 127.0.0.1:{admin_port}");
    write_topology_with(
        dir,
        topics,
        "json",
        &[
            ("url: \"\"", url_line.as_str()),
            ("ttl: 7d", "ttl: 1d"),
            ("listen: 127.0.0.1:0", listen.as_str()),
        ],
    )
}

fn names() -> Vec<String> {
    golden_features().0
}

#[test]
fn redis_holds_every_users_final_features_with_a_ttl() {
    let redis = Redis::start();
    let broker = Broker::start();
    let topics = Topics::create(&broker, 4);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let topology = topology_with_store(dir.path(), &topics, &redis.url(), admin);
    produce_keyed(&broker.producer(), &topics.events, &golden_events());
    let engine = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        &unique("i"),
        &dir.path().join("state"),
    );
    broker.read_topic(&topics.predictions, 4, Duration::from_secs(180), |m| {
        predictions_by_event(m).len() >= 12_454
    });
    wait_until_converged(&redis, &names(), Duration::from_secs(60));

    let mut con = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("augur:ctr:user:*")
        .query(&mut con)
        .unwrap();
    assert_eq!(keys.len(), final_rows().len(), "one hash per user");
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
        assert!(ttl > 0 && ttl <= 86_400_000, "{key}: TTL {ttl} ms");
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(key).query(&mut con).unwrap();
        assert!(
            fields.contains_key("_partition") && fields.contains_key("_offset"),
            "{key}: version fields"
        );
    }

    // The same values through the admin endpoint and the CLI. (The golden data has no
    // non-ASCII user id; percent-decoding of one is unit-tested in admin.rs.)
    let (values, _) = final_rows()["u-7"].clone();
    let response = http_get(admin, "/v1/features/u-7");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body: serde_json::Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body["features"]["events_total"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap(),
        values[11]
    );
    let cli = Command::new(augur_bin())
        .args(["features", "get", "--topology"])
        .arg(&topology)
        .arg("u-7")
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(printed["features"], body["features"]);
    assert!(engine.terminate(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_stale_writer_cannot_overwrite_a_newer_version() {
    let redis = Redis::start();
    let layout = Layout {
        prefix: "t:".into(),
        names: vec!["x".into()],
        ttl: Duration::from_secs(60),
    };
    let mut store = OnlineStore::open(&redis.url(), layout).unwrap();
    let update = |partition, offset, ts, x: f64| FeatureUpdate {
        user_id: "u".into(),
        partition,
        offset,
        ts,
        values: vec![x].into_boxed_slice(),
    };
    assert_eq!(store.write(&[update(3, 10, 1_000, 1.0)]).await.unwrap(), 1);
    // Same partition, lower offset: refused.
    assert_eq!(store.write(&[update(3, 9, 2_000, 2.0)]).await.unwrap(), 0);
    // Another partition (a worker that lost it) with an older event: refused.
    assert_eq!(store.write(&[update(5, 99, 999, 3.0)]).await.unwrap(), 0);
    let fields = store.read("u").await.unwrap().unwrap();
    assert_eq!(
        (fields["x"].as_str(), fields["_offset"].as_str()),
        ("1", "10")
    );
    // Newer versions win.
    assert_eq!(store.write(&[update(3, 11, 1_500, 4.0)]).await.unwrap(), 1);
    assert_eq!(store.read("u").await.unwrap().unwrap()["x"], "4");
}

#[test]
fn a_redis_outage_never_stops_predictions_and_redis_converges() {
    let mut redis = Redis::start();
    let broker = Broker::start();
    let topics = Topics::create(&broker, 4);
    let dir = tempfile::tempdir().unwrap();
    let topology = topology_with_store(dir.path(), &topics, &redis.url(), free_port());
    let events = golden_events();
    let slices: Vec<&[(String, String)]> = events.chunks(events.len() / 6 + 1).collect();
    let impressions_in = |n: usize| {
        slices[..n]
            .iter()
            .flat_map(|s| s.iter())
            .filter(|(_, l)| l.contains("impression"))
            .count()
    };
    let producer = broker.producer();
    let engine = Augur::start(
        &topology,
        &broker.brokers,
        &unique("g"),
        &unique("i"),
        &dir.path().join("state"),
    );

    produce_keyed(&producer, &topics.events, slices[0]);
    broker.read_topic(&topics.predictions, 4, Duration::from_secs(120), |m| {
        predictions_by_event(m).len() >= impressions_in(1)
    });
    std::thread::sleep(Duration::from_secs(2)); // a checkpoint mirrors slice 0

    redis.kill();
    let down = Instant::now();
    // While Redis is down, each new slice is fully scored: predictions never stop.
    for n in 2..=4 {
        produce_keyed(&producer, &topics.events, slices[n - 1]);
        let got = broker.read_topic(&topics.predictions, 4, Duration::from_secs(30), |m| {
            predictions_by_event(m).len() >= impressions_in(n)
        });
        assert!(
            predictions_by_event(&got).len() >= impressions_in(n),
            "slice {n} was not scored while Redis was down ({:?} into the outage)",
            down.elapsed()
        );
        eprintln!(
            "slice {n} scored {:?} into the Redis outage",
            down.elapsed()
        );
    }
    // Redis stays down at least 10 s, and in any case until the slices above were
    // scored, so they were scored while it was down.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    eprintln!("restarting Redis {:?} into the outage", down.elapsed());
    redis.spawn();

    for slice in &slices[4..] {
        produce_keyed(&producer, &topics.events, slice);
    }
    broker.read_topic(&topics.predictions, 4, Duration::from_secs(120), |m| {
        predictions_by_event(m).len() >= 12_454
    });
    wait_until_converged(&redis, &names(), Duration::from_secs(60));
    assert!(engine.terminate(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_password_in_the_url_is_used_and_never_shown() {
    let redis = Redis::start_with(false, &["--requirepass", "s3cret-pw"]);
    let port = redis.port;
    let layout = Layout {
        prefix: "p:".into(),
        names: vec!["x".into()],
        ttl: Duration::from_secs(60),
    };
    let update = FeatureUpdate {
        user_id: "u".into(),
        partition: 0,
        offset: 1,
        ts: 1,
        values: vec![2.5].into_boxed_slice(),
    };
    let mut good = OnlineStore::open(
        &format!("redis://:s3cret-pw@127.0.0.1:{port}"),
        layout.clone(),
    )
    .unwrap();
    assert_eq!(good.write(std::slice::from_ref(&update)).await.unwrap(), 1);
    assert_eq!(good.read("u").await.unwrap().unwrap()["x"], "2.5");
    let mut bad =
        OnlineStore::open(&format!("redis://:wrong-pw@127.0.0.1:{port}"), layout).unwrap();
    let err = bad.write(&[update]).await.unwrap_err().to_string();
    assert!(
        !err.contains("wrong-pw") && err.contains("redis://***@127.0.0.1"),
        "{err}"
    );
}

#[tokio::test]
async fn rediss_urls_connect_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(made.success());
    let (cert, key, ca) = (
        cert.display().to_string(),
        key.display().to_string(),
        cert.display().to_string(),
    );
    let redis = Redis::start_with(
        true,
        &[
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "tls-pw",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
        ],
    );
    let port = redis.port;
    let layout = Layout {
        prefix: "tls:".into(),
        names: vec!["x".into()],
        ttl: Duration::from_secs(60),
    };
    // The self-signed test certificate is not in the system store: skip verification.
    let url = format!("rediss://:tls-pw@127.0.0.1:{port}/#insecure");
    let mut store = OnlineStore::open(&url, layout).unwrap();
    let update = FeatureUpdate {
        user_id: "u".into(),
        partition: 0,
        offset: 1,
        ts: 1,
        values: vec![7.0].into_boxed_slice(),
    };
    assert_eq!(store.write(&[update]).await.unwrap(), 1);
    assert_eq!(store.read("u").await.unwrap().unwrap()["x"], "7");
}
