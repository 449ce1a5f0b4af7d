//! `ferry.v1.Routing/Watch`: authenticate the caller by its certificate, check the pod it
//! names against the pod record, then stream its scoped table: a snapshot, then a diff on
//! every change that touches its scope.
//!
//! Limits: at most [`MAX_STREAMS`] streams at once (more get `RESOURCE_EXHAUSTED`), a
//! request of at most 4 KiB, an update of at most [`MAX_UPDATE_BYTES`] (a scope larger
//! than that fails the stream with `RESOURCE_EXHAUSTED`; the sidecar keeps its table and
//! retries). A pod record may lag the sidecar's start by a moment: the call waits up to
//! [`RECORD_WAIT`] for it, then answers `NOT_FOUND`. When the record goes away or changes
//! to another service account, the stream ends with `PERMISSION_DENIED`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::identity::SpiffeId;
use ferry_api::proto::v1::routing_server::{Routing, RoutingServer};
use ferry_api::proto::v1::{RoutingEntry, RoutingUpdate, WatchRoutingRequest};
use ferry_api::routing::scope::{Caller, scope};
use ferry_api::routing::{RoutingTable, object_ref};
use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::Peer;

/// Streams served at once.
pub const MAX_STREAMS: usize = 4096;
/// Largest update sent.
pub const MAX_UPDATE_BYTES: usize = 16 * 1024 * 1024;
/// Largest request decoded.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// How long a call waits for the caller's pod record (and the first list of etcd).
pub const RECORD_WAIT: Duration = Duration::from_secs(5);

/// The service over every replica's followed table.
#[derive(Debug, Clone)]
pub struct Service {
    table: watch::Receiver<Arc<RoutingTable>>,
    streams: Arc<Semaphore>,
}

/// The tonic server for `table`, with its message limits.
pub fn server(table: watch::Receiver<Arc<RoutingTable>>) -> RoutingServer<Service> {
    RoutingServer::new(Service {
        table,
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(MAX_UPDATE_BYTES)
}

/// Whether `id` may watch as pod `pod`: the record exists and is of its namespace and
/// service account.
fn authorize(table: &RoutingTable, id: &SpiffeId, pod: &str) -> Result<(), Status> {
    let Some(record) = table.pods.get(&object_ref(&id.namespace, pod)) else {
        return Err(Status::not_found(format!(
            "no pod {:?} in namespace {:?} in the routing table",
            pod, id.namespace
        )));
    };
    if record.service_account != id.service_account {
        return Err(Status::permission_denied(format!(
            "{id} may not watch as pod {}/{pod}, which runs as service account {:?}",
            id.namespace, record.service_account
        )));
    }
    Ok(())
}

fn scoped(table: &RoutingTable, id: &SpiffeId, pod: &str) -> BTreeMap<String, String> {
    let caller = Caller {
        namespace: &id.namespace,
        service_account: &id.service_account,
        pod,
    };
    scope(table, &caller).to_kv()
}

fn entry((key, value): (&String, &String)) -> RoutingEntry {
    RoutingEntry {
        key: key.clone(),
        value: value.clone().into_bytes().into(),
    }
}

/// The update from `old` to `new`, `None` when nothing in the scope changed.
fn diff(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    revision: i64,
) -> Option<RoutingUpdate> {
    let put: Vec<RoutingEntry> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(entry)
        .collect();
    let deleted: Vec<String> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (!put.is_empty() || !deleted.is_empty()).then_some(RoutingUpdate {
        revision,
        snapshot: false,
        put,
        deleted,
    })
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<RoutingUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Routing for Service {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<WatchRoutingRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let id = request
            .extensions()
            .get::<axum::extract::ConnectInfo<Peer>>()
            .and_then(|info| info.0.identity.clone())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no client certificate: the routing service serves only sidecars that present their workload certificate",
                )
            })?;
        let pod = request.into_inner().pod;
        if pod.is_empty() || pod.len() > 253 || pod.contains('/') {
            return Err(Status::invalid_argument(format!(
                "pod: {pod:?} is not a pod name"
            )));
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("the routing service serves its most streams; retry")
        })?;
        let mut rx = self.table.clone();
        // The first list of etcd and the pod record may still be on their way.
        let waited = tokio::time::timeout(RECORD_WAIT, async {
            loop {
                {
                    let table = rx.borrow_and_update();
                    if table.revision > 0 && authorize(&table, &id, &pod).is_ok() {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        let table = rx.borrow_and_update().clone();
        if waited.is_err() && table.revision == 0 {
            return Err(Status::unavailable(
                "the routing service has not read the routing table yet; retry",
            ));
        }
        authorize(&table, &id, &pod)?;
        info!(identity = %id, %pod, revision = table.revision, "streaming a scoped routing table");
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last = scoped(&table, &id, &pod);
            let first = RoutingUpdate {
                revision: table.revision,
                snapshot: true,
                put: last.iter().map(entry).collect(),
                deleted: vec![],
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let table = rx.borrow_and_update().clone();
                if let Err(status) = authorize(&table, &id, &pod) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let next = scoped(&table, &id, &pod);
                if let Some(update) = diff(&last, &next, table.revision)
                    && tx.send(Ok(update)).await.is_err()
                {
                    return;
                }
                last = next;
            }
        });
        debug!("routing stream started");
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_changed_and_removed_keys_only() {
        let old = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        let new = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("c".to_owned(), "3".to_owned()),
        ]);
        let d = diff(&old, &new, 9).expect("a change");
        assert_eq!(d.revision, 9);
        assert_eq!(d.put.len(), 1);
        assert_eq!(d.put[0].key, "c");
        assert_eq!(d.deleted, ["b"]);
        assert!(diff(&new, &new, 10).is_none());
    }
}
