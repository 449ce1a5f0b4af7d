//! SIGTERM handoff: after the drain window, the backlog this sidecar could not deliver is
//! moved to a live peer with `TakeCustody` (the peer fsyncs before answering), then settled
//! here, so that deleting the pod loses nothing. Each record goes with the subscriptions
//! that settled it here (`PeerMessage.settled_by`): the peer delivers it to the others
//! only, so a group that kept up gets nothing again while a slow one gets its backlog.
//! Peers are tried in the replica preference order. The dispatchers stop first, so nothing
//! is forwarded while it moves; deliveries in flight at that moment are handed off too (a
//! consumer may see them twice, attempt >= 2 for the second). What no peer takes stays in
//! the log for the next start.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::crd::Durability;
use ferry_api::proto::v1::TakeCustodyRequest;
use tokio::time::Instant;

use super::Moved;
use super::replicator::Replicator;
use super::trims;
use crate::engine::Engine;
use crate::log::Offset;
use crate::metrics::Metrics;
use crate::store::{Outcome, TopicStore, UnsettledRecord};

/// Messages per `TakeCustody` request.
const CHUNK: usize = 512;
/// Longest wait for one `TakeCustody` answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands every undelivered message to peers until `deadline`. Returns how many moved.
/// With no other sidecar in the mesh it keeps draining instead.
pub async fn hand_off(engine: &Arc<Engine>, deadline: Instant) -> u64 {
    if Replicator::candidates(engine).is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if !crate::shutdown::drain(engine, left).await {
            tracing::warn!(
                "no peer to hand the backlog to; it stays in the log for the next start"
            );
        }
        return 0;
    }
    engine.delivery.stop_all().await;
    let mut total = 0;
    for store in engine.open_stores() {
        if store.stats.drained() {
            continue;
        }
        total += hand_off_topic(engine, &store, deadline).await;
    }
    engine.replicator.flush_trims(engine).await;
    total
}

async fn hand_off_topic(engine: &Arc<Engine>, store: &Arc<TopicStore>, deadline: Instant) -> u64 {
    let topic = store.topic.clone();
    let table = engine.table();
    let subs: Vec<Arc<str>> = table
        .subscriptions
        .iter()
        .filter(|(_, s)| s.topic == topic)
        .map(|(k, _)| Arc::from(k.as_str()))
        .collect();
    if subs.is_empty() {
        return 0;
    }
    let records = match store.unsettled(&subs).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%topic, error = %e, "cannot read the backlog to hand it off");
            return 0;
        }
    };
    let mut moved = 0;
    for chunk in records.chunks(CHUNK) {
        let Some(peer) = send(engine, &topic, chunk, deadline).await else {
            tracing::warn!(%topic, left = records.len() as u64 - moved, "no peer took the rest of the backlog; it stays in the log for the next start");
            break;
        };
        let settle = chunk
            .iter()
            .flat_map(|r| {
                subs.iter()
                    .filter(|s| !r.settled_by.contains(s))
                    .map(move |s| (s.clone(), r.offset, Outcome::HandedOff))
            })
            .collect::<Vec<(Arc<str>, Offset, Outcome)>>();
        store.settle(settle);
        if store.durability == Durability::Replicated {
            let ids = chunk.iter().map(|r| r.message.id.clone());
            engine
                .replicator
                .queue_trims(engine, &topic, trims::all(ids));
        }
        moved += chunk.len() as u64;
        tracing::info!(%topic, %peer, n = chunk.len(), "handed messages off");
    }
    if let Err(e) = store.flush().await {
        tracing::error!(%topic, error = %e, "flushing after the handoff failed; some messages may be delivered twice");
    }
    engine
        .metrics
        .handed_off
        .get_or_create(&Metrics::topic(&topic))
        .inc_by(moved);
    if moved > 0 {
        tracing::info!(%topic, "handed {moved} undelivered messages off before stopping");
    }
    moved
}

/// Sends one chunk to the first peer that takes it; returns that peer's id.
async fn send(
    engine: &Engine,
    topic: &str,
    chunk: &[UnsettledRecord],
    deadline: Instant,
) -> Option<String> {
    let request = TakeCustodyRequest {
        from: engine.identity.producer_id.to_string(),
        topic: topic.to_owned(),
        messages: chunk.iter().map(|r| moved(r).to_wire()).collect(),
    };
    let mut order = Replicator::candidates(engine);
    order.sort_by_key(|c| !engine.peers.is_live(&c.address));
    for c in order {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let Some(mut client) = engine.peers.client(&c.address) else {
            continue;
        };
        match tokio::time::timeout(left.min(CALL_TIMEOUT), client.take_custody(request.clone()))
            .await
        {
            Ok(Ok(_)) => return Some(c.id),
            Ok(Err(status)) => {
                tracing::info!(peer = %c.id, %status, "peer refused the handoff; trying the next");
            }
            Err(_) => tracing::info!(peer = %c.id, "peer did not take the handoff in time"),
        }
    }
    None
}

/// What moves of a record: the message and who settled it here.
fn moved(r: &UnsettledRecord) -> Moved {
    Moved {
        message: r.message.clone(),
        settled_by: r.settled_by.iter().map(|s| s.to_string()).collect(),
    }
}
