//! Cluster mode: the routing table from etcd, listed once and then watched.
//!
//! How it follows etcd, and why:
//!
//! - **List, then watch from the list's revision + 1.** The list is a linearizable range
//!   read of `/ferry/v1/` (paged, every page pinned to the first page's revision), so the
//!   table it builds is etcd's state at that revision; a watch from the next revision
//!   misses nothing and repeats nothing.
//! - **One table per batch.** The events of every watch response already waiting are
//!   applied together and published as one new `Arc<RoutingTable>` (a burst of operator
//!   writes costs the dispatchers one reconcile). A batch ends on a response boundary, so
//!   every published table is etcd's state at some revision. The table's `revision` is the
//!   etcd revision of the last event applied.
//! - **Resume first, re-list when etcd says so.** When the watch breaks (connection reset,
//!   keepalive timeout on a paused etcd), the source backs off and watches again from
//!   the applied revision + 1: etcd replays what was missed, with no list. If etcd has
//!   compacted past that revision it cancels the new watch with `compact_revision` set, and
//!   only then the source lists again (also for any other cancel). This is what etcd's own
//!   clients do, and it makes docs/reliability.md row 16 a real detection, not a side effect.
//! - **Never back in time (row 16).** A list served at a revision lower than the one
//!   applied (a lagging member) is refused and retried; `apply_if_newer` refuses older
//!   tables as a last guard.
//! - **Keep the last table (row 15).** While etcd is unreachable nothing is published, so
//!   the sidecar keeps routing with the table it has. Retries back off (100 ms to 5 s,
//!   jittered). [`SourceStatus`] tells `/metrics` and `/readyz`.
//! - **A bad value is skipped.** A key this build does not know or a value that does not
//!   decode (including another schema version) is logged and counted; that key keeps its
//!   last good entry (none if it never had one) and the rest applies. A re-list carries
//!   such entries over, so that a re-list gives the same table as the watch did.
//! - **Only its own pod record.** The operator writes a record per pod
//!   (`/ferry/v1/pods/...`); the source keeps only this pod's ([`EtcdOptions::pod`]) and
//!   skips the others unread, so that a sidecar neither holds every pod's record nor
//!   reads other tenants' pods (they still advance the revision).
//! - **Starting with etcd down.** Unlike [`super::FileSource`], [`EtcdSource::start`]
//!   does not wait for the first table: the sidecar starts with an empty table (revision
//!   0), reports not connected and not ready, and the source keeps retrying.

mod status;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue, WatchOptions, WatchResponse};
use ferry_api::routing::{PODS_PREFIX, PREFIX, RoutingTable, pod_key};
use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use status::Backoff;
pub use status::SourceStatus;

use super::source::{RoutingSource, apply_if_newer};
use crate::error::Error;

/// Keys per page of a list: bounds each response well under gRPC's 4 MiB default.
const LIST_PAGE: i64 = 500;

/// How the source talks to etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Bound on connecting, each list page and starting a watch. A watch itself has no
    /// deadline (it may be quiet for hours); `keep_alive` finds a dead one.
    pub request_timeout: Duration,
    /// HTTP/2 ping interval and ack timeout on the connection: how a paused etcd or a
    /// silent network is noticed while the watch waits. The interval must stay above
    /// etcd's `--grpc-keepalive-min-time` (5 s by default), or etcd answers the pings with
    /// GOAWAY `too_many_pings` and the watch breaks every few seconds.
    pub keep_alive: (Duration, Duration),
    /// First and largest delay between two attempts.
    pub backoff: (Duration, Duration),
    /// At most this many watch responses are coalesced into one published table.
    pub max_batch: usize,
    /// Key of this pod's record (`routing::pod_key`): the only pod record kept. `None`:
    /// none is kept.
    pub pod: Option<String>,
}

impl EtcdOptions {
    /// Production defaults for `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: Duration::from_secs(5),
            keep_alive: (Duration::from_secs(10), Duration::from_secs(5)),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            max_batch: 64,
            pod: None,
        }
    }

    /// Keeps the record of pod `pod` of `namespace` (and no other pod's).
    pub fn for_pod(mut self, namespace: &str, pod: &str) -> Self {
        self.pod = Some(pod_key(namespace, pod));
        self
    }

    /// Whether the entry at `key` is another pod's record, which is skipped.
    fn skips(&self, key: &[u8]) -> bool {
        key.starts_with(PODS_PREFIX.as_bytes())
            && self.pod.as_deref().map(str::as_bytes) != Some(key)
    }
}

/// Why one attempt to follow etcd ended. Every one of them is retried.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("etcd closed the watch stream")]
    WatchClosed,
    #[error(
        "etcd compacted past revision {wanted} (oldest kept: {compact_revision}); listing again"
    )]
    Compacted { wanted: i64, compact_revision: i64 },
    #[error("etcd canceled the watch: {reason:?}; listing again")]
    Canceled { reason: String },
    #[error("etcd answered at revision {listed}, older than the applied {applied}")]
    Stale { listed: i64, applied: i64 },
    #[error("etcd answered without a response header")]
    NoHeader,
}

impl SourceError {
    /// Whether the watch cannot resume from the applied revision.
    fn needs_list(&self) -> bool {
        matches!(self, Self::Compacted { .. } | Self::Canceled { .. })
    }

    /// Whether etcd is (as far as we know) unreachable; a compaction is not an outage.
    fn is_outage(&self) -> bool {
        !matches!(self, Self::Compacted { .. })
    }
}

/// A [`RoutingSource`] that lists and watches `/ferry/v1/` in etcd.
#[derive(Debug)]
pub struct EtcdSource {
    options: EtcdOptions,
    status: Arc<SourceStatus>,
}

impl EtcdSource {
    /// A source for `options`; nothing is dialed before [`RoutingSource::start`].
    pub fn new(options: EtcdOptions) -> Result<Self, Error> {
        if options.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(Error::Config("--etcd-endpoints: no endpoint given".into()));
        }
        Ok(Self {
            options,
            status: Arc::default(),
        })
    }

    /// The status handle (connected, revision, re-lists, bad values), for the admin port
    /// and tests.
    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    /// Follows etcd until `cancel`, retrying every failure after a backoff.
    async fn run(self, tx: watch::Sender<Arc<RoutingTable>>, cancel: CancellationToken) {
        let mut follow = Follow {
            table: RoutingTable::default(),
            needs_list: true,
        };
        let (min, max) = self.options.backoff;
        let mut backoff = Backoff::new(min, max);
        loop {
            let error = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.follow(&mut follow, &tx, &mut backoff) => match result {
                    Err(e) => e,
                    Ok(never) => match never {},
                },
            };
            follow.needs_list |= error.needs_list();
            if error.is_outage() {
                self.status.set_disconnected(&error.to_string());
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                error = %error,
                retry_in = ?delay,
                revision = follow.table.revision,
                "etcd routing source: routing with the last table"
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt: connect, list if needed, watch and publish until something fails.
    async fn follow(
        &self,
        follow: &mut Follow,
        tx: &watch::Sender<Arc<RoutingTable>>,
        backoff: &mut Backoff,
    ) -> Result<Infallible, SourceError> {
        // A fresh client per attempt: no state of a broken connection survives it.
        let (interval, timeout) = self.options.keep_alive;
        let options = ConnectOptions::new()
            .with_connect_timeout(self.options.request_timeout)
            .with_keep_alive(interval, timeout);
        let client = self
            .timed(
                "connecting to etcd",
                Client::connect(&self.options.endpoints, Some(options)),
            )
            .await?;
        if follow.needs_list {
            let listed = self.list(&client, &follow.table).await?;
            if listed.revision < follow.table.revision {
                return Err(SourceError::Stale {
                    listed: listed.revision,
                    applied: follow.table.revision,
                });
            }
            follow.table = listed;
            follow.needs_list = false;
            self.status.listed();
            tracing::info!(
                revision = follow.table.revision,
                relists = self.status.relists(),
                "listed the routing table from etcd"
            );
            self.publish(tx, &follow.table);
        }

        let from = follow.table.revision + 1;
        let mut stream = self
            .timed(
                "starting the routing watch",
                client.watch_client().watch(
                    PREFIX,
                    Some(WatchOptions::new().with_prefix().with_start_revision(from)),
                ),
            )
            .await?;
        // The first response says the watch exists (a compacted `from` is canceled after).
        let mut next = Some(
            self.timed("confirming the routing watch", stream.message())
                .await?
                .ok_or(SourceError::WatchClosed)?,
        );
        self.status.set_connected();
        backoff.reset();
        tracing::debug!(from, "watching the routing table");
        loop {
            let first = match next.take() {
                Some(response) => response,
                None => received(stream.message().await)?,
            };
            // Apply what is already waiting too; publish once, even if the batch fails
            // half-way (what was applied is etcd's state at a revision boundary).
            let before = follow.table.revision;
            let mut failure = None;
            let mut response = first;
            for _ in 0..self.options.max_batch.max(1) {
                if let Err(e) = self.apply_response(&mut follow.table, &response) {
                    failure = Some(e);
                    break;
                }
                match stream.message().now_or_never() {
                    Some(r) => match received(r) {
                        Ok(r) => response = r,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    },
                    None => break,
                }
            }
            if follow.table.revision > before {
                self.publish(tx, &follow.table);
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
    }

    /// Applies the events of one watch response, or reports why the watch ended.
    fn apply_response(
        &self,
        table: &mut RoutingTable,
        response: &WatchResponse,
    ) -> Result<(), SourceError> {
        if response.canceled() {
            let compact_revision = response.compact_revision();
            return Err(if compact_revision > 0 {
                SourceError::Compacted {
                    wanted: table.revision + 1,
                    compact_revision,
                }
            } else {
                SourceError::Canceled {
                    reason: response.cancel_reason().to_owned(),
                }
            });
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            // A delete carries the key with version 0 (etcd resets it on delete); reading
            // that instead of `event_type()` avoids its panic on an unknown event type.
            let value = (kv.version() > 0).then(|| kv.value());
            self.apply_one(table, kv, value);
            table.revision = table.revision.max(kv.mod_revision());
        }
        Ok(())
    }

    /// Applies one key; a bad key or value is logged and counted, the table keeps going.
    fn apply_one(&self, table: &mut RoutingTable, kv: &KeyValue, value: Option<&[u8]>) -> bool {
        if self.options.skips(kv.key()) {
            return true;
        }
        let result = match kv.key_str() {
            Ok(key) => table.apply_kv(key, value).map_err(|e| e.to_string()),
            Err(e) => Err(format!(
                "key {:?} is not UTF-8: {e}",
                String::from_utf8_lossy(kv.key())
            )),
        };
        match result {
            Ok(()) => true,
            Err(error) => {
                self.status.bad_value();
                tracing::warn!(
                    %error,
                    revision = kv.mod_revision(),
                    "skipping a routing-table entry; the key keeps its last good value"
                );
                false
            }
        }
    }

    /// Lists the prefix into a new table at one revision. Keys whose value is bad keep
    /// their entry from `previous` (see the module doc).
    async fn list(
        &self,
        client: &Client,
        previous: &RoutingTable,
    ) -> Result<RoutingTable, SourceError> {
        let mut kv_client = client.kv_client();
        let end = prefix_end(PREFIX);
        let mut table = RoutingTable::default();
        let mut previous_kv: Option<BTreeMap<String, String>> = None;
        let mut from = PREFIX.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self
                .timed(
                    "listing the routing table",
                    kv_client.get(from.clone(), Some(options)),
                )
                .await?;
            if revision == 0 {
                revision = page.header().ok_or(SourceError::NoHeader)?.revision();
            }
            for kv in page.kvs() {
                if !self.apply_one(&mut table, kv, Some(kv.value()))
                    && let Ok(key) = kv.key_str()
                {
                    let old = previous_kv.get_or_insert_with(|| previous.to_kv());
                    if let Some(value) = old.get(key) {
                        // It decoded before; it decodes again.
                        let _ = table.apply_kv(key, Some(value.as_bytes()));
                    }
                }
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        table.revision = revision;
        Ok(table)
    }

    fn publish(&self, tx: &watch::Sender<Arc<RoutingTable>>, table: &RoutingTable) {
        if apply_if_newer(tx, table.clone()) {
            tracing::debug!(revision = table.revision, "applied routing table from etcd");
        }
        self.status.set_revision(tx.borrow().revision);
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, SourceError> {
        let timeout = self.options.request_timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(SourceError::Etcd { what, source }),
            Err(_) => Err(SourceError::Timeout { what, timeout }),
        }
    }
}

/// Where the source stands between attempts.
#[derive(Debug)]
struct Follow {
    /// Every change up to `table.revision` is applied.
    table: RoutingTable,
    /// The next attempt must list (first start, or etcd cannot replay from here).
    needs_list: bool,
}

fn received(
    message: Result<Option<WatchResponse>, etcd_client::Error>,
) -> Result<WatchResponse, SourceError> {
    message
        .map_err(|source| SourceError::Etcd {
            what: "watching the routing table",
            source,
        })?
        .ok_or(SourceError::WatchClosed)
}

/// The end of the key range of `prefix` (its last byte plus one), as etcd's `WithPrefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl RoutingSource for EtcdSource {
    /// Returns at once with an empty table (revision 0); the first list follows in the
    /// background, and `/readyz` stays not ready until it arrives.
    fn start(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> Result<(watch::Receiver<Arc<RoutingTable>>, JoinHandle<()>), Error> {
        let tx = watch::Sender::new(Arc::new(RoutingTable::default()));
        let rx = tx.subscribe();
        let task = tokio::spawn(self.run(tx, cancel));
        Ok((rx, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end("/ferry/v1/"), b"/ferry/v10".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn needs_at_least_one_endpoint() {
        assert!(EtcdSource::new(EtcdOptions::new(vec![])).is_err());
        assert!(EtcdSource::new(EtcdOptions::new(vec![" ".into()])).is_err());
        assert!(EtcdSource::new(EtcdOptions::new(vec!["http://127.0.0.1:2379".into()])).is_ok());
    }

    #[test]
    fn only_its_own_pod_record_is_kept() {
        let options = EtcdOptions::new(vec!["http://e:2379".into()]).for_pod("shop", "web-1");
        assert!(!options.skips(b"/ferry/v1/pods/shop/web-1"));
        assert!(options.skips(b"/ferry/v1/pods/shop/web-2"));
        assert!(options.skips(b"/ferry/v1/pods/other/web-1"));
        assert!(!options.skips(b"/ferry/v1/members/shop/g/web-2"));
        let anonymous = EtcdOptions::new(vec!["http://e:2379".into()]);
        assert!(anonymous.skips(b"/ferry/v1/pods/shop/web-1"));
    }

    #[test]
    fn compaction_needs_a_list_but_is_no_outage() {
        let e = SourceError::Compacted {
            wanted: 5,
            compact_revision: 9,
        };
        assert!(e.needs_list() && !e.is_outage());
        assert!(!SourceError::WatchClosed.needs_list());
        assert!(SourceError::WatchClosed.is_outage());
    }
}
