//! Cluster mode without etcd: the routing table from the operator's routing service
//! (`ferry.v1.Routing/Watch`, `--routing-url`), which serves this pod only its scoped view
//! (`ferry_api::routing::scope`) over mutual TLS with the pod's workload certificate.
//!
//! It behaves as [`super::etcd::EtcdSource`] does:
//!
//! - **Keep the last table.** While the operator is unreachable (or refuses) nothing is
//!   published and the sidecar routes with the table it has; retries back off (100 ms to
//!   5 s, jittered). [`SourceStatus`] tells `/metrics` and `/readyz`.
//! - **Never back in revision.** Each stream builds its own table from its snapshot and
//!   the diffs after it; a table older than the one applied (a lagging operator replica)
//!   is refused by `apply_if_newer`.
//! - **A bad entry is skipped**, logged and counted; the rest applies.
//! - **Starting with the operator down**: an empty table (revision 0), not ready, retrying.
//!
//! The client certificate is the sidecar's own [`PeerTls`] credentials, renewed in place,
//! so each new connection presents the current certificate; the server must prove the
//! operator's identity (`--identity-server`).

use std::sync::Arc;
use std::time::Duration;

use ferry_api::identity::SpiffeId;
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::{Expect, PeerTls};
use ferry_api::proto::v1::routing_client::RoutingClient;
use ferry_api::proto::v1::{RoutingUpdate, WatchRoutingRequest};
use ferry_api::routing::RoutingTable;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};

use super::etcd::{Backoff, SourceStatus};
use super::source::{RoutingSource, apply_if_newer};
use crate::error::Error;

/// Largest update accepted (the operator sends at most this much, `MAX_UPDATE_BYTES`).
const MAX_UPDATE_BYTES: usize = 16 * 1024 * 1024;
/// Bound on connecting and on the first answer of a watch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`RoutingSource`] that watches the operator's routing service.
#[derive(Debug)]
pub struct OperatorSource {
    uri: Uri,
    url: String,
    server: SpiffeId,
    tls: PeerTls,
    pod: String,
    status: Arc<SourceStatus>,
}

impl OperatorSource {
    /// A source for `url` (`https://host:port`), expecting the server to prove `server`,
    /// asking as pod `pod` with `tls`. Nothing is dialed before [`RoutingSource::start`].
    pub fn new(url: &str, server: SpiffeId, tls: PeerTls, pod: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("--routing-url {url:?}: {why}"));
        let parsed: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if parsed.scheme_str() != Some("https") {
            return Err(bad("must be an https:// URL"));
        }
        let host = parsed.host().ok_or_else(|| bad("has no host"))?;
        let port = parsed
            .port_u16()
            .unwrap_or(ferry_api::consts::IDENTITY_PORT);
        // The TLS is under the connector; the endpoint speaks HTTP/2 over it.
        let uri = format!("http://{host}:{port}")
            .parse()
            .map_err(|_| bad("has an unusable host"))?;
        Ok(Self {
            uri,
            url: url.to_owned(),
            server,
            tls,
            pod: pod.to_owned(),
            status: Arc::default(),
        })
    }

    /// The status handle, for the admin port and tests.
    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    async fn run(self, tx: watch::Sender<Arc<RoutingTable>>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let error = tokio::select! {
                () = cancel.cancelled() => return,
                e = self.follow(&tx, &mut backoff) => e,
            };
            self.status.set_disconnected(&error);
            let delay = backoff.next_delay();
            tracing::warn!(
                %error,
                retry_in = ?delay,
                revision = tx.borrow().revision,
                "routing service: routing with the last table"
            );
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One stream: connect, watch, apply until it ends; returns why.
    async fn follow(&self, tx: &watch::Sender<Arc<RoutingTable>>, backoff: &mut Backoff) -> String {
        let config = match self.tls.client_config(Expect::Exactly(self.server.clone())) {
            Ok(c) => c,
            Err(e) => return format!("TLS for {}: {e}", self.url),
        };
        let channel = match Endpoint::from(self.uri.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector(connector(config))
            .await
        {
            Ok(c) => c,
            Err(e) => return format!("connecting to {}: {e}", self.url),
        };
        let mut client = RoutingClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
        let request = WatchRoutingRequest {
            pod: self.pod.clone(),
        };
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, client.watch(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return format!("{}: {status}", self.url),
            Err(_) => return format!("{}: no answer within {CONNECT_TIMEOUT:?}", self.url),
        };
        let mut table: Option<RoutingTable> = None;
        loop {
            let update = match stream.message().await {
                Ok(Some(u)) => u,
                Ok(None) => return format!("{} ended the routing stream", self.url),
                Err(status) => return format!("{}: {status}", self.url),
            };
            if update.snapshot {
                table = Some(RoutingTable::default());
            }
            let Some(t) = table.as_mut() else {
                return format!("{} sent a diff before a snapshot", self.url);
            };
            self.apply(t, &update);
            if update.snapshot {
                self.status.listed();
                self.status.set_connected();
                backoff.reset();
            }
            if apply_if_newer(tx, t.clone()) {
                tracing::debug!(
                    revision = t.revision,
                    "applied routing table from the operator"
                );
            }
            self.status.set_revision(tx.borrow().revision);
        }
    }

    fn apply(&self, table: &mut RoutingTable, update: &RoutingUpdate) {
        let puts = update
            .put
            .iter()
            .map(|e| (e.key.as_str(), Some(&e.value[..])));
        let deletes = update.deleted.iter().map(|k| (k.as_str(), None));
        for (key, value) in puts.chain(deletes) {
            if let Err(error) = table.apply_kv(key, value) {
                self.status.bad_value();
                tracing::warn!(%error, "skipping a routing-table entry from the operator");
            }
        }
        table.revision = table.revision.max(update.revision);
    }
}

impl RoutingSource for OperatorSource {
    /// Returns at once with an empty table (revision 0); `/readyz` stays not ready until
    /// the first snapshot.
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
