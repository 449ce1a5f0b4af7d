//! The replica side's watch over the producers it holds copies for. Once a second it probes
//! each (`Held` with no topic). A producer that does not answer and whose member record left
//! the routing table (after this process saw it there) is gone for good, as is one that has
//! not answered for `--replica-takeover-after` (the only rule for a producer that is in no
//! group, hence never in the table). A producer that answers keeps custody even when it
//! left the table (a pod that is only not Ready, or one still handing off on SIGTERM). The
//! replica then takes custody of every copy it holds for that producer
//! ([`super::custody::take_custody`]), each settled already for the subscriptions the
//! producer said had settled it (per-subscription trims), so that only the others receive
//! it; and drops the copies once its own log holds them durably. A sidecar that is
//! stopping takes nothing over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::proto::v1::HeldRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::choose;
use super::custody::take_custody;
use super::holder::HeldSummary;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// How often producers are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Payload bytes of copies moved per step.
const STEP_BYTES: usize = 4 << 20;

async fn probe(engine: &Engine, address: &str) -> bool {
    let Some(mut client) = engine.peers.client(address) else {
        return false;
    };
    let request = HeldRequest::default();
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, client.held(request)).await,
        Ok(Ok(_))
    )
}

/// Watches producers until `stop`.
pub async fn run(engine: Arc<Engine>, stop: CancellationToken) {
    let after = engine.config.replica_takeover_after;
    let mut seen: HashSet<String> = HashSet::new();
    let mut unreachable: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if engine.draining() {
            continue;
        }
        let mesh = choose::mesh(&engine.table());
        // Every sidecar ever seen in the table, copies or not: a producer may join, get
        // copies made and be removed between two checks.
        seen.extend(mesh.keys().cloned());
        let held = engine.replicas.producers();
        let mut verdicts: HashMap<String, Option<&'static str>> = HashMap::new();
        for h in held {
            if !verdicts.contains_key(&h.producer) {
                let in_table = mesh.get(&h.producer);
                let address = in_table.map_or(h.address.as_str(), |c| c.address.as_str());
                let verdict = if !address.is_empty() && probe(&engine, address).await {
                    unreachable.remove(&h.producer);
                    None
                } else if in_table.is_none() && seen.contains(&h.producer) {
                    Some("its member record left the routing table and it does not answer")
                } else {
                    let since = *unreachable
                        .entry(h.producer.clone())
                        .or_insert_with(Instant::now);
                    (since.elapsed() >= after)
                        .then_some("it did not answer for --replica-takeover-after")
                };
                verdicts.insert(h.producer.clone(), verdict);
            }
            if let Some(Some(reason)) = verdicts.get(&h.producer) {
                take_over(&engine, &h, reason).await;
            }
        }
    }
}

/// Moves every copy of `h` into this sidecar's own log, a page at a time.
async fn take_over(engine: &Arc<Engine>, h: &HeldSummary, reason: &str) {
    let mut total = 0u64;
    loop {
        let replicas = engine.replicas.clone();
        let (producer, topic) = (h.producer.clone(), h.topic.clone());
        let page =
            tokio::task::spawn_blocking(move || replicas.held(&producer, &topic, 0, 0, STEP_BYTES))
                .await;
        let (copies, more) = match page {
            Ok(Ok(p)) => (p.copies, p.more),
            Ok(Err(e)) => {
                tracing::error!(producer = %h.producer, topic = %h.topic, error = %e, "cannot read replica log");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "replica read task failed");
                return;
            }
        };
        if copies.is_empty() {
            break;
        }
        let (offsets, messages): (Vec<_>, Vec<_>) =
            copies.into_iter().map(|c| (c.offset, c.moved)).unzip();
        let n = messages.len() as u64;
        if let Err(e) = take_custody(engine, &h.topic, &h.producer, messages).await {
            tracing::error!(producer = %h.producer, topic = %h.topic, error = %e, "taking custody failed; will retry");
            return;
        }
        let replicas = engine.replicas.clone();
        let (producer, topic) = (h.producer.clone(), h.topic.clone());
        let released =
            tokio::task::spawn_blocking(move || replicas.release(&producer, &topic, &offsets))
                .await;
        if !matches!(released, Ok(Ok(()))) {
            tracing::error!(producer = %h.producer, topic = %h.topic, "copies taken over but not released; they may be delivered twice");
            return;
        }
        total += n;
        engine
            .metrics
            .taken_over
            .get_or_create(&Metrics::topic(&h.topic))
            .inc_by(n);
        if !more {
            break;
        }
    }
    if total > 0 {
        tracing::info!(producer = %h.producer, topic = %h.topic, "took custody of {total} replicated messages: {reason}");
    }
}
