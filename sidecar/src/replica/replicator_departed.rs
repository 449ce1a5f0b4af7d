//! Dropping what the replicator keeps for replicas that left the routing table: their trim
//! queues, holder records and suspicion (see [`DEPARTED_GRACE`]).

use std::collections::HashSet;

use ferry_api::routing::RoutingTable;
use tokio::time::Instant;

use super::{DEPARTED_GRACE, Replicator, SUSPECT_FOR, with};

impl Replicator {
    /// Drops the trim queues, holder records and suspicion of replicas no member record of
    /// `table` has named for [`DEPARTED_GRACE`] (see [`MAX_PENDING_TRIMS`]). Returns the
    /// trims dropped.
    pub fn forget_departed(&self, table: &RoutingTable) -> usize {
        self.forget_departed_at(table, Instant::now())
    }

    pub(super) fn forget_departed_at(&self, table: &RoutingTable, now: Instant) -> usize {
        let members: HashSet<&str> = table
            .members
            .values()
            .flat_map(|m| m.values().map(|e| e.address.as_str()))
            .collect();
        let mut known: HashSet<String> = with(&self.pending, |p| {
            p.keys().map(|(a, _)| a.clone()).collect()
        })
        .unwrap_or_default();
        with(&self.holders, |h| {
            known.extend(h.values().flatten().cloned())
        });
        let gone: HashSet<String> = with(&self.departed, |d| {
            d.retain(|a, _| known.contains(a) && !members.contains(a.as_str()));
            for a in known.iter().filter(|a| !members.contains(a.as_str())) {
                d.entry(a.clone()).or_insert(now);
            }
            d.iter()
                .filter(|(_, since)| now.duration_since(**since) >= DEPARTED_GRACE)
                .map(|(a, _)| a.clone())
                .collect()
        })
        .unwrap_or_default();
        if gone.is_empty() {
            return 0;
        }
        let dropped = with(&self.pending, |p| {
            let mut dropped = 0;
            p.retain(|(addr, topic), ids| {
                let keep = !gone.contains(addr);
                if !keep {
                    tracing::info!(peer = %addr, %topic, trims = ids.len(), "replica left the routing table: dropping its trims");
                    dropped += ids.len();
                }
                keep
            });
            dropped
        })
        .unwrap_or(0);
        with(&self.holders, |h| {
            for addrs in h.values_mut() {
                addrs.retain(|a| !gone.contains(a));
            }
            h.retain(|_, addrs| !addrs.is_empty());
        });
        with(&self.suspect, |s| {
            s.retain(|a, t| !gone.contains(a) && now.duration_since(*t) < SUSPECT_FOR)
        });
        with(&self.departed, |d| d.retain(|a, _| !gone.contains(a)));
        self.trims_dropped.inc_by(dropped as u64);
        self.count_pending();
        dropped
    }
}
