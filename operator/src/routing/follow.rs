//! Every replica's copy of the routing table, followed from etcd: what the routing service
//! cuts each sidecar's scoped view from.
//!
//! List `/ferry/v1/`, then watch from the list's revision + 1; every watch response is
//! applied and published as one new table whose `revision` is etcd's. On any failure
//! (etcd unreachable, the watch canceled or compacted) the last table stays published, the
//! follower backs off (100 ms to 5 s) and lists again; a list older than the table
//! published is refused, so the table never goes back in revision. A key or value this
//! build cannot read is logged and skipped, as a sidecar's etcd source does. Leader or not,
//! every replica follows: a sidecar may be connected to any of them.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use ferry_api::routing::{PREFIX, RoutingTable};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why one attempt to follow etcd ended; every one is retried.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
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
    #[error("etcd ended the routing watch ({0})")]
    WatchEnded(String),
    #[error("etcd answered at revision {listed}, older than the published {published}")]
    Stale { listed: i64, published: i64 },
}

/// Starts following `endpoints` until `shutdown`. The receiver holds an empty table at
/// revision 0 until the first list.
pub fn spawn(
    endpoints: Vec<String>,
    timeout: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<RoutingTable>> {
    let tx = watch::Sender::new(Arc::new(RoutingTable::default()));
    let rx = tx.subscribe();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                result = follow(&endpoints, timeout, &tx) => match result {
                    Ok(never) => match never {},
                    Err(e) => e,
                },
            };
            warn!(%error, retry_in = ?delay, revision = tx.borrow().revision, "routing service: serving the last table");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    });
    rx
}

async fn timed<T>(
    what: &'static str,
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FollowError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(FollowError::Etcd { what, source }),
        Err(_) => Err(FollowError::Timeout { what, timeout }),
    }
}

fn apply(table: &mut RoutingTable, key: &[u8], value: Option<&[u8]>) {
    let key = String::from_utf8_lossy(key);
    if let Err(error) = table.apply_kv(&key, value) {
        warn!(%error, "routing service: skipping a routing-table entry");
    }
}

/// One attempt: connect, list, watch and publish until something fails.
async fn follow(
    endpoints: &[String],
    timeout: Duration,
    tx: &watch::Sender<Arc<RoutingTable>>,
) -> Result<std::convert::Infallible, FollowError> {
    // No request timeout on the client: it would end the watch. Keepalives find a dead one.
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(10), timeout);
    let client = timed(
        "connecting to etcd",
        timeout,
        Client::connect(endpoints, Some(options)),
    )
    .await?;
    let response = timed(
        "listing the routing table",
        timeout,
        client
            .kv_client()
            .get(PREFIX, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut table = RoutingTable {
        revision: response.header().map_or(0, |h| h.revision()),
        ..RoutingTable::default()
    };
    for kv in response.kvs() {
        apply(&mut table, kv.key(), Some(kv.value()));
    }
    let published = tx.borrow().revision;
    if table.revision < published {
        return Err(FollowError::Stale {
            listed: table.revision,
            published,
        });
    }
    info!(
        revision = table.revision,
        "routing service: listed the routing table"
    );
    tx.send_replace(Arc::new(table.clone()));
    let mut stream = timed(
        "starting the routing watch",
        timeout,
        client.watch_client().watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(table.revision + 1),
            ),
        ),
    )
    .await?;
    loop {
        let response = stream
            .message()
            .await
            .map_err(|source| FollowError::Etcd {
                what: "watching the routing table",
                source,
            })?
            .ok_or_else(|| FollowError::WatchEnded("stream closed".into()))?;
        if response.canceled() {
            return Err(FollowError::WatchEnded(format!(
                "canceled: {:?}, compacted at {}",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        let before = table.revision;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let value = (kv.version() > 0).then(|| kv.value());
            apply(&mut table, kv.key(), value);
            table.revision = table.revision.max(kv.mod_revision());
        }
        if table.revision > before {
            tx.send_replace(Arc::new(table.clone()));
        }
    }
}
