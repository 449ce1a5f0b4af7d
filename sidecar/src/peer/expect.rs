//! Which identity each peer address must prove.
//!
//! The routing table names, for every member, its pod's namespace and service account; a
//! link to that member's address accepts only a server whose certificate proves that
//! identity, so that a pod which took over an address (or answers in its place) cannot
//! receive deliveries meant for another. A member record written before service accounts
//! were recorded is dialled with any identity of the trust domain. When the identity behind
//! an address changes, its link is closed; the next use opens one that expects the new one.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_api::identity::SpiffeId;
use ferry_api::identity::tls::Expect;
use ferry_api::routing::RoutingTable;

use super::PeerPool;

/// Expected identities by peer address, from the table's member records.
pub fn expected_identities(
    table: &RoutingTable,
    trust_domain: &str,
) -> HashMap<Arc<str>, SpiffeId> {
    table
        .members
        .values()
        .flat_map(|m| m.values())
        .filter(|m| !m.service_account.is_empty())
        .filter_map(|m| {
            SpiffeId::new(trust_domain, &m.namespace, &m.service_account)
                .ok()
                .map(|id| (Arc::from(m.address.as_str()), id))
        })
        .collect()
}

impl PeerPool {
    /// Learns the identities of `table`; closes links whose address now belongs to another
    /// identity. Returns how many links it closed.
    pub fn learn_identities(&self, table: &RoutingTable) -> usize {
        let Some(tls) = &self.tls else { return 0 };
        let learned = expected_identities(table, &tls.credentials.identity().trust_domain);
        let Ok(mut expected) = self.expected.lock() else {
            return 0;
        };
        let changed: Vec<Arc<str>> = expected
            .iter()
            .filter(|(addr, id)| learned.get(*addr).is_some_and(|new| new != *id))
            .map(|(addr, _)| addr.clone())
            .collect();
        // Addresses that left the table keep their last identity: a departed member's link
        // stays open a while to settle what it holds (see `departed.rs`).
        expected.extend(learned);
        drop(expected);
        let Ok(mut links) = self.links.lock() else {
            return 0;
        };
        for addr in &changed {
            if let Some(link) = links.remove(addr) {
                tracing::info!(peer = %addr, "closing the link to an address that now belongs to another identity");
                link.closed.cancel();
            }
        }
        self.open_links.set(links.len() as i64);
        changed.len()
    }

    /// What a new link to `addr` must see the server prove.
    pub(super) fn expect_for(&self, addr: &str, trust_domain: String) -> Expect {
        self.expected
            .lock()
            .ok()
            .and_then(|e| e.get(addr).cloned())
            .map_or(Expect::TrustDomain(trust_domain), Expect::Exactly)
    }
}
