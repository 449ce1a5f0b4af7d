//! Helpers of `etcd_routing.rs`: a TCP proxy the test can cut and heal (the project's way
//! to break one connection without touching etcd), routing entries, and comparisons of a
//! table with etcd restricted to one namespace (tests share one etcd and its fixed prefix).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, GetOptions};
use ferry_api::crd::Durability;
use ferry_api::routing::*;
use ferry_sidecar::routing::etcd::{EtcdOptions, EtcdSource, SourceStatus};
use ferry_sidecar::routing::{RoutingSource, fixtures};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A userspace TCP proxy in front of etcd. `cut` closes every open connection and
/// refuses new ones until `heal`.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct ProxyState {
    /// `(cut, token of the connections opened since the last cut)`, under one lock so that
    /// a connection accepted during a cut never gets a live token.
    gate: Mutex<(bool, CancellationToken)>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            gate: Mutex::new((false, CancellationToken::new())),
        });
        let gate = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let live = {
                    let g = gate.gate.lock().unwrap_or_else(PoisonError::into_inner);
                    (!g.0).then(|| g.1.clone())
                };
                let Some(token) = live else { continue };
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut downstream, &mut up) => {}
                    }
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The URL a client dials.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Breaks every connection and refuses new ones.
    pub fn cut(&self) {
        let mut g = self
            .state
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.0 = true;
        let old = std::mem::replace(&mut g.1, CancellationToken::new());
        old.cancel();
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// `host:port` of an `http://host:port` endpoint.
pub fn socket_addr(endpoint: &str) -> Result<SocketAddr> {
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("endpoint {endpoint:?}"))
}

/// A running [`EtcdSource`] with fast test timings, and every revision it published.
#[derive(Debug)]
pub struct Follower {
    pub rx: watch::Receiver<Arc<RoutingTable>>,
    pub status: Arc<SourceStatus>,
    published: Arc<Mutex<Vec<i64>>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts a source on `endpoint`: keepalive 6 s / 2 s (etcd refuses pings more often
    /// than every 5 s), backoff 50 ms to 500 ms, 2 s per request.
    pub fn start(endpoint: &str) -> Result<Self> {
        init_logs();
        let mut options = EtcdOptions::new(vec![endpoint.to_owned()]);
        options.keep_alive = (Duration::from_secs(6), Duration::from_secs(2));
        options.backoff = (Duration::from_millis(50), Duration::from_millis(500));
        options.request_timeout = Duration::from_secs(2);
        let source = EtcdSource::new(options)?;
        let status = source.status();
        let cancel = CancellationToken::new();
        let (rx, task) = Box::new(source).start(cancel.clone())?;
        let published = Arc::new(Mutex::new(vec![rx.borrow().revision]));
        let record = published.clone();
        let mut changes = rx.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let revision = changes.borrow_and_update().revision;
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(revision);
            }
        });
        Ok(Self {
            rx,
            status,
            published,
            cancel,
            task,
        })
    }

    /// Every revision seen published, in order.
    pub fn published(&self) -> Vec<i64> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The entries of namespace `ns` in the current table.
    pub fn kv(&self, ns: &str) -> BTreeMap<String, String> {
        in_namespace(self.rx.borrow().to_kv(), ns)
    }

    /// Stops the source and waits for its task.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Keys of namespace `ns`: `/ferry/v1/<kind>/<ns>/...`.
pub fn in_namespace(kv: BTreeMap<String, String>, ns: &str) -> BTreeMap<String, String> {
    kv.into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(PREFIX)
                .and_then(|rest| rest.split('/').nth(1))
                .is_some_and(|n| n == ns)
        })
        .collect()
}

/// etcd's entries of namespace `ns` and the revision they were read at.
pub async fn etcd_kv(client: &mut Client, ns: &str) -> Result<(BTreeMap<String, String>, i64)> {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let kv = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    Ok((in_namespace(kv, ns), revision))
}

/// Writes `value` as JSON at `key`; returns the revision of the write.
pub async fn put<T: serde::Serialize>(client: &mut Client, key: &str, value: &T) -> Result<i64> {
    let resp = client.put(key, serde_json::to_string(value)?, None).await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Deletes `key`; returns the revision of the delete.
pub async fn delete(client: &mut Client, key: &str) -> Result<i64> {
    let resp = client.delete(key, None).await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// A `Disk` topic entry with the CRD defaults otherwise.
pub fn topic(ns: &str, name: &str) -> TopicEntry {
    let mut topic = fixtures::topic(ns, name);
    topic.durability = Durability::Disk;
    topic
}

pub use fixtures::{group, subscription};

/// A member of `group` at a fixed address, ready or not.
pub fn member(ns: &str, group: &str, pod: &str, ready: bool) -> MemberEntry {
    let mut member = fixtures::member(ns, group, pod, "z1", "10.0.0.1:7710");
    member.node = "n1".into();
    member.ready = ready;
    member
}

/// Whether `revisions` never goes down (no "back in time", docs/reliability.md row 16).
pub fn non_decreasing(revisions: &[i64]) -> bool {
    revisions.windows(2).all(|w| w[0] <= w[1])
}

/// Logs of the source, shown for failing tests (`FERRY_LOG` overrides the filter).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("ferry_sidecar::routing=debug,warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
