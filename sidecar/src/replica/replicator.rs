//! The producer side of `Replicated` topics: sending copies before the ack, telling the
//! replicas which ids are settled (trims), and re-learning custody after a restart. See the
//! parent module for the rules.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::crd::Durability;
use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{HeldRequest, PeerMessage, ReplicateRequest};
use ferry_api::routing::TopicEntry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::choose::{self, Candidate, Chooser};
use super::trims::{self, Trim};
use super::{Moved, custody, to_wire};
use crate::engine::Engine;
use crate::error::Error;
use crate::log::StoredMessage;
use crate::metrics::Metrics;
use crate::store::{SettledIds, SettledReport};

/// How long a replica gets to fsync a copy before the next candidate is tried.
pub const REPLICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often settled ids are sent to the replicas.
pub const TRIM_EVERY: Duration = Duration::from_millis(200);
/// A replica that did not answer is tried after the others for this long.
const SUSPECT_FOR: Duration = Duration::from_secs(5);
/// Trims kept per replica and topic while it does not answer; older ones are forgotten
/// (the copies they name may then be delivered again by a takeover: duplicates only). The
/// queues of a replica whose member records left the routing table are dropped whole once
/// it has been gone for [`DEPARTED_GRACE`], with what this process knows it holds
/// (`forget_departed`): a deleted pod's copies are gone with it, and should it come back on
/// the same data, the same holds as above (duplicates only). A readiness flap shorter than
/// the grace keeps its trims.
const MAX_PENDING_TRIMS: usize = 1 << 20;
/// How long a replica must have been out of the routing table before its trims are dropped.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(10);
/// Payload bytes of copies per `Replicate` request.
const CHUNK_BYTES: usize = 4 << 20;
/// Longest wait for the last trims when the sidecar stops.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// How often a restarted producer asks a sidecar that did not answer yet what it holds.
const RELEARN_RETRY: Duration = Duration::from_secs(2);

/// State of the producer side, one per sidecar.
#[derive(Debug)]
pub struct Replicator {
    incarnation: u64,
    settled_tx: SettledIds,
    settled_rx: Mutex<Option<mpsc::UnboundedReceiver<SettledReport>>>,
    /// Replica addresses that hold copies of a topic, as far as this process knows.
    holders: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Trims not yet sent, per (replica address, topic).
    pending: Mutex<HashMap<(String, String), Vec<Trim>>>,
    /// Replicas that failed to answer, and when.
    suspect: Mutex<HashMap<String, Instant>>,
    /// Replicas with queued trims or holder records that are out of the table, since when.
    departed: Mutex<HashMap<String, Instant>>,
    /// Trims queued in `pending` (`ferry_sidecar_pending_trims`).
    pending_trims: Gauge,
    /// Trims dropped (`ferry_sidecar_trims_dropped_total`).
    trims_dropped: Counter,
}

impl Default for Replicator {
    /// A replicator with a fresh random incarnation (never 0).
    fn default() -> Self {
        Self::new(
            rand::random::<u64>() | 1,
            Gauge::default(),
            Counter::default(),
        )
    }
}

fn with<T, R>(m: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> Option<R> {
    m.lock().ok().map(|mut g| f(&mut g))
}

/// Splits copies into requests of bounded size.
fn chunks(messages: &[StoredMessage]) -> Vec<Vec<PeerMessage>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for m in messages {
        let size = m.payload.len() + 64;
        if bytes + size > CHUNK_BYTES && out.last().is_some_and(|c| !c.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(c) = out.last_mut() {
            c.push(to_wire(m));
        }
    }
    out
}

impl Replicator {
    /// A replicator sending under `incarnation`, the sidecar's (`Identity::incarnation`);
    /// `pending_trims` follows the trims queued, `trims_dropped` counts those forgotten.
    pub fn new(incarnation: u64, pending_trims: Gauge, trims_dropped: Counter) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        Self {
            incarnation,
            settled_tx,
            settled_rx: Mutex::new(Some(settled_rx)),
            holders: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            suspect: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            pending_trims,
            trims_dropped,
        }
    }

    /// Where `Replicated` stores report settled ids.
    pub fn settled_sender(&self) -> SettledIds {
        self.settled_tx.clone()
    }

    /// Replica candidates of this sidecar, best first.
    pub fn candidates(engine: &Engine) -> Vec<Candidate> {
        let here = engine.placement.current();
        let me = Chooser {
            id: &engine.identity.producer_id,
            zone: &here.zone,
            node: &here.node,
        };
        choose::candidates(&engine.table(), me, &engine.identity.advertise)
    }

    fn client(engine: &Engine, addr: &str) -> Result<PeerClient<Channel>, String> {
        engine
            .peers
            .client(addr)
            .ok_or_else(|| format!("invalid peer address {addr:?}"))
    }

    fn is_suspect(&self, addr: &str) -> bool {
        with(&self.suspect, |s| {
            s.get(addr).is_some_and(|t| t.elapsed() < SUSPECT_FOR)
        })
        .unwrap_or(false)
    }

    /// Sends `messages` of `entry`'s topic to `replicas - 1` replicas and waits until they
    /// are fsynced there. A no-op for other durabilities or one replica.
    pub async fn replicate(
        &self,
        engine: &Engine,
        entry: &TopicEntry,
        messages: &[StoredMessage],
    ) -> Result<(), Error> {
        let need = entry.replicas.saturating_sub(1) as usize;
        if entry.durability != Durability::Replicated || need == 0 || messages.is_empty() {
            return Ok(());
        }
        let topic = ferry_api::routing::object_ref(&entry.namespace, &entry.name);
        let mut order = Self::candidates(engine);
        // Stable sort: replicas that answered lately keep their preference order first.
        order.sort_by_key(|c| self.is_suspect(&c.address));
        let chunks = chunks(messages);
        let mut reached = 0;
        let mut errors = Vec::new();
        let mut next = order.iter();
        while reached < need {
            let round: Vec<&Candidate> = next.by_ref().take(need - reached).collect();
            if round.is_empty() {
                break;
            }
            let sends = round
                .iter()
                .map(|c| self.send_copies(engine, &c.address, &topic, &chunks));
            for (c, r) in round.iter().zip(futures::future::join_all(sends).await) {
                match r {
                    Ok(()) => reached += 1,
                    Err(e) => {
                        with(&self.suspect, |s| {
                            s.insert(c.address.clone(), Instant::now())
                        });
                        errors.push(format!("{}: {e}", c.id));
                    }
                }
            }
        }
        if reached < need {
            if order.len() < need {
                errors.push(format!("the mesh has {} other sidecar(s)", order.len()));
            }
            return Err(Error::ReplicasUnavailable {
                topic,
                needed: need,
                reached,
                detail: errors.join("; "),
            });
        }
        engine
            .metrics
            .replicated
            .get_or_create(&Metrics::topic(&topic))
            .inc_by(messages.len() as u64);
        Ok(())
    }

    async fn send_copies(
        &self,
        engine: &Engine,
        addr: &str,
        topic: &str,
        chunks: &[Vec<PeerMessage>],
    ) -> Result<(), String> {
        with(&self.holders, |h| {
            h.entry(topic.to_owned())
                .or_default()
                .insert(addr.to_owned())
        });
        for copies in chunks {
            let trims = self.take_pending(addr, topic);
            let request = self.request(engine, topic, copies.clone(), &trims);
            if let Err(e) = self.call(engine, addr, request).await {
                self.put_back(addr, topic, trims);
                return Err(e);
            }
        }
        Ok(())
    }

    fn request(
        &self,
        engine: &Engine,
        topic: &str,
        copies: Vec<PeerMessage>,
        trims: &[Trim],
    ) -> ReplicateRequest {
        let (settled_ids, settled_by) = trims::to_request(trims);
        ReplicateRequest {
            producer: engine.identity.producer_id.to_string(),
            producer_address: engine.identity.advertise.clone(),
            topic: topic.to_owned(),
            incarnation: self.incarnation,
            copies,
            settled_ids,
            settled_by,
        }
    }

    async fn call(&self, engine: &Engine, addr: &str, r: ReplicateRequest) -> Result<(), String> {
        let mut client = Self::client(engine, addr)?;
        match tokio::time::timeout(REPLICATE_TIMEOUT, client.replicate(r)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {REPLICATE_TIMEOUT:?}")),
        }
    }

    fn take_pending(&self, addr: &str, topic: &str) -> Vec<Trim> {
        with(&self.pending, |p| {
            p.remove(&(addr.to_owned(), topic.to_owned()))
        })
        .flatten()
        .unwrap_or_default()
    }

    fn put_back(&self, addr: &str, topic: &str, mut ids: Vec<Trim>) {
        if ids.is_empty() {
            return;
        }
        with(&self.pending, |p| {
            let q = p.entry((addr.to_owned(), topic.to_owned())).or_default();
            ids.append(q);
            if ids.len() > MAX_PENDING_TRIMS {
                let forgotten = ids.len() - MAX_PENDING_TRIMS;
                tracing::warn!(peer = %addr, %topic, forgotten, "replica unreachable for long: forgetting trims");
                self.trims_dropped.inc_by(forgotten as u64);
                ids.truncate(MAX_PENDING_TRIMS);
            }
            *q = ids;
        });
        self.count_pending();
    }

    fn count_pending(&self) {
        let n = with(&self.pending, |p| p.values().map(Vec::len).sum::<usize>()).unwrap_or(0);
        self.pending_trims.set(n as i64);
    }

    /// Queues `trims` for every replica that may hold copies of `topic`: those this
    /// process sent copies to or learned about, and the first candidates in preference
    /// order (which a previous start of this sidecar most likely used).
    pub fn queue_trims(&self, engine: &Engine, topic: &str, trims: Vec<Trim>) {
        if trims.is_empty() {
            return;
        }
        let replicas = engine
            .table()
            .topics
            .get(topic)
            .map_or(1, |t| t.replicas as usize);
        let mut targets: BTreeSet<String> =
            with(&self.holders, |h| h.get(topic).cloned().unwrap_or_default()).unwrap_or_default();
        targets.extend(
            Self::candidates(engine)
                .into_iter()
                .take(replicas.saturating_sub(1) + 1)
                .map(|c| c.address),
        );
        for addr in targets {
            self.put_back(&addr, topic, trims.clone());
        }
    }

    /// Sends every queued trim now; those a replica does not take stay queued.
    pub async fn flush_trims(&self, engine: &Engine) {
        let pending: Vec<((String, String), Vec<Trim>)> = with(&self.pending, std::mem::take)
            .unwrap_or_default()
            .into_iter()
            .collect();
        self.count_pending();
        let sends = pending.into_iter().map(|((addr, topic), ids)| async move {
            let request = self.request(engine, &topic, Vec::new(), &ids);
            if self.is_suspect(&addr) || self.call(engine, &addr, request).await.is_err() {
                self.put_back(&addr, &topic, ids);
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Sends settled ids to the replicas every [`TRIM_EVERY`] until `stop`.
    pub async fn run_trims(self: Arc<Self>, engine: Arc<Engine>, stop: CancellationToken) {
        let Some(mut rx) = with(&self.settled_rx, Option::take).flatten() else {
            return;
        };
        let mut tick = tokio::time::interval(TRIM_EVERY);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.cancelled() => true,
            };
            while let Ok(report) = rx.try_recv() {
                let topic = report.topic.clone();
                self.queue_trims(&engine, &topic, trims::from_report(report));
            }
            self.forget_departed(&engine.table());
            if !stopping {
                self.flush_trims(&engine).await;
                continue;
            }
            // The last acks before a stop: a trim lost here is a duplicate after a takeover.
            if tokio::time::timeout(FINAL_FLUSH, self.flush_trims(&engine))
                .await
                .is_err()
            {
                tracing::info!("replicas did not take the last trims before the stop");
            }
            return;
        }
    }

    /// After a start: asks every sidecar of the mesh what it holds for this producer from
    /// earlier starts, and takes back custody of what this sidecar's log did not store
    /// (or lost): see `TopicStore::holds`. Retries a sidecar that does not answer until it does or `stop`.
    pub async fn relearn(self: Arc<Self>, engine: Arc<Engine>, stop: CancellationToken) {
        // A routing source may start empty (etcd before its first list): wait for topics.
        let mut routing = engine.routing.clone();
        tokio::select! {
            r = routing.wait_for(|t| !t.topics.is_empty()) => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
        let table = engine.table();
        let topics: Vec<String> = table
            .topics
            .iter()
            .filter(|(_, t)| t.durability == Durability::Replicated && t.replicas > 1)
            .map(|(k, _)| k.clone())
            .collect();
        if topics.is_empty() {
            return;
        }
        let mut todo = Self::candidates(&engine);
        while !todo.is_empty() {
            let mut left = Vec::new();
            for c in todo {
                if let Err(e) = self.relearn_from(&engine, &c, &topics).await {
                    tracing::debug!(peer = %c.id, error = %e, "cannot ask what it holds yet");
                    left.push(c);
                }
            }
            todo = left;
            if todo.is_empty() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(RELEARN_RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn relearn_from(
        &self,
        engine: &Arc<Engine>,
        c: &Candidate,
        topics: &[String],
    ) -> Result<(), String> {
        let me = engine.identity.producer_id.to_string();
        for topic in topics {
            let mut from = 0;
            let mut copies = Vec::new();
            loop {
                let mut client = Self::client(engine, &c.address)?;
                let request = HeldRequest {
                    producer: me.clone(),
                    topic: topic.clone(),
                    exclude_incarnation: self.incarnation,
                    from,
                };
                let page = match tokio::time::timeout(REPLICATE_TIMEOUT, client.held(request)).await
                {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(status)) => {
                        return Err(format!("{}: {}", status.code(), status.message()));
                    }
                    Err(_) => return Err(format!("no answer within {REPLICATE_TIMEOUT:?}")),
                };
                copies.extend(page.copies.into_iter().map(Moved::from_wire));
                if !page.more || page.next <= from {
                    break;
                }
                from = page.next;
            }
            if copies.is_empty() {
                continue;
            }
            with(&self.holders, |h| {
                h.entry(topic.clone())
                    .or_default()
                    .insert(c.address.clone())
            });
            let store = engine.store(topic).await.map_err(|e| e.to_string())?;
            let mut seen = HashSet::new();
            copies.retain(|m| seen.insert(m.message.id.clone()));
            let ids = copies.iter().map(|m| m.message.id.clone()).collect();
            let held = store.holds(ids).await.map_err(|e| e.to_string())?;
            let missing: Vec<Moved> = copies
                .into_iter()
                .zip(held)
                .filter(|(_, h)| !h)
                .map(|(m, _)| m)
                .collect();
            let asked = missing.len();
            let n = custody::relearn(engine, topic, missing)
                .await
                .map_err(|e| e.to_string())?;
            if asked > 0 {
                tracing::info!(%topic, replica = %c.id, stored = n, "re-learned custody of {asked} messages this log did not hold");
            }
            engine
                .metrics
                .relearned
                .get_or_create(&Metrics::topic(topic))
                .inc_by(n);
        }
        Ok(())
    }
}

#[path = "replicator_departed.rs"]
mod departed;
#[cfg(test)]
#[path = "replicator_tests.rs"]
mod tests;
