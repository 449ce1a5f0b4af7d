//! Which sidecars hold a producer's copies, and which one a stopping sidecar hands its
//! backlog to: every sidecar of the producer's own namespace that is a member of some group
//! in the routing table, except this one (copies of a tenant's messages stay with that
//! tenant's pods, and peers refuse copies from another namespace, `peer/authz.rs`), ordered by (another node first, then another zone, then a
//! rendezvous hash of the producer and the candidate). The order depends only on the table
//! and the producer's identity, so a restarted producer tries the same replicas in the same
//! order, and different producers spread their copies over different replicas.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use ferry_api::routing::RoutingTable;

/// A sidecar that can hold copies or take custody.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `namespace/pod`, its producer id.
    pub id: String,
    pub address: String,
    pub zone: String,
    pub node: String,
}

/// Who is choosing: its id, zone and node.
#[derive(Debug, Clone, Copy)]
pub struct Chooser<'a> {
    pub id: &'a str,
    pub zone: &'a str,
    pub node: &'a str,
}

/// Every sidecar of the mesh (one entry per pod, whatever its number of groups).
pub fn mesh(table: &RoutingTable) -> BTreeMap<String, Candidate> {
    let mut out = BTreeMap::new();
    for members in table.members.values() {
        for m in members.values() {
            if m.address.is_empty() {
                continue;
            }
            let id = format!("{}/{}", m.namespace, m.pod);
            out.entry(id.clone()).or_insert_with(|| Candidate {
                id,
                address: m.address.clone(),
                zone: m.zone.clone(),
                node: m.node.clone(),
            });
        }
    }
    out
}

fn namespace_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(ns, _)| ns)
}

/// The candidates for `me`, best first.
pub fn candidates(table: &RoutingTable, me: Chooser<'_>, my_address: &str) -> Vec<Candidate> {
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let mut all: Vec<(bool, bool, u64, Candidate)> = mesh(table)
        .into_values()
        .filter(|c| c.id != me.id && c.address != my_address)
        .filter(|c| namespace_of(&c.id) == namespace_of(me.id))
        .map(|c| {
            let same_node = !me.node.is_empty() && c.node == me.node;
            let same_zone = !me.zone.is_empty() && c.zone == me.zone;
            let rank = hasher.hash_one((me.id, c.id.as_str()));
            (same_node, same_zone, rank, c)
        })
        .collect();
    all.sort_by(|a, b| (a.0, a.1, a.2, &a.3.id).cmp(&(b.0, b.1, b.2, &b.3.id)));
    all.into_iter().map(|(.., c)| c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::member;

    #[test]
    fn other_node_then_other_zone_first_and_stable() {
        let mut t = RoutingTable::default();
        let mut add = |pod: &str, zone: &str, node: &str| {
            let mut m = member("ns", "g", pod, zone, &format!("{pod}:7710"));
            m.node = node.into();
            t.members
                .entry("ns/g".into())
                .or_default()
                .insert(pod.into(), m);
        };
        add("p", "a", "n1");
        add("same-node", "a", "n1");
        add("same-zone", "a", "n2");
        add("other-zone", "b", "n3");
        // Another tenant's pod is never a candidate.
        t.members
            .entry("bank/g".into())
            .or_default()
            .insert("q".into(), member("bank", "g", "q", "b", "q:7710"));
        let me = Chooser {
            id: "ns/p",
            zone: "a",
            node: "n1",
        };
        let c = candidates(&t, me, "p:7710");
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[2], "ns/same-node");
        assert_eq!(&ids[..2], ["ns/other-zone", "ns/same-zone"]);
        assert_eq!(candidates(&t, me, "p:7710"), c);
    }
}
