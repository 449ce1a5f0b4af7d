//! Where this sidecar runs: its zone, which decides same-zone-first delivery (and replica
//! and handoff choice), and its node.
//!
//! Where they come from:
//!
//! - **A cluster** (`--etcd-endpoints`): from this pod's record in the routing table,
//!   `/ferry/v1/pods/<namespace>/<pod>`, which the operator writes with the node's
//!   `topology.kubernetes.io/zone` label once the pod is scheduled (no container can read
//!   a node's labels; the downward API does not expose them). The sidecar finds its record
//!   by `--namespace` and `--pod-name` (the webhook sets both from the downward API),
//!   follows it, and re-learns when it changes. `--zone` and `--node` are ignored there,
//!   with a warning: a setting nobody keeps true must not decide routing.
//! - **Local mode** (`ferryctl dev`, the process tests): `--zone` and `--node`, as the pods
//!   file says. A routing file used without `--zone` is read for a pod record too.
//!
//! Until the record is read the zone is empty, which prefers no zone: a `PreferSameZone`
//! group is served by any member and a `SameZoneOnly` group waits (its messages stay in
//! the backlog). A log line says so, another one names the zone once it is learned or
//! changes, and `ferry_sidecar_zone{zone,node}` is 1 for the current one. A record that
//! disappears (the pod object is gone; its sidecar is about to stop) leaves the last
//! learned zone in force.
//!
//! In a cluster `/readyz` waits for the record for at most `--pod-record-wait` after start (it is
//! normally there before the sidecar starts: the operator writes it at scheduling), then
//! turns ready without it: a sidecar must not stay unready for ever because the operator is
//! down, since the routing table it already has still routes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferry_api::routing::{RoutingTable, object_ref, pod_key};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Config;
use crate::metrics::ZoneLabels;

/// The zone and node this sidecar routes by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Empty: unknown, no zone preferred.
    pub zone: Arc<str>,
    pub node: Arc<str>,
}

/// Where the placement comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--zone`/`--node` (local mode).
    Setting,
    /// This pod's record in the routing table.
    PodRecord,
}

impl Origin {
    /// The origin for `config`: the pod record in a cluster or when no zone is given.
    pub fn of(config: &Config) -> Self {
        if !config.cluster_routing() && !config.zone.is_empty() {
            Self::Setting
        } else {
            Self::PodRecord
        }
    }
}

/// This pod's placement as `table` records it, if it has a record.
pub fn from_table(table: &RoutingTable, namespace: &str, pod: &str) -> Option<Placement> {
    table
        .pods
        .get(&object_ref(namespace, pod))
        .map(|record| Placement {
            zone: record.zone.as_str().into(),
            node: record.node.as_str().into(),
        })
}

/// The placement in force, how it was had, and what `/readyz` says of it.
#[derive(Debug)]
pub struct Placements {
    origin: Origin,
    namespace: String,
    pod: String,
    current: RwLock<Placement>,
    /// A record was read (ever, in this process).
    learned: AtomicBool,
    /// "No record in the table" was logged.
    missing_logged: AtomicBool,
    started: Instant,
    wait: Duration,
    gauge: Family<ZoneLabels, Gauge>,
}

impl Placements {
    /// The placement of the sidecar of `config`; `gauge` is `ferry_sidecar_zone`.
    pub fn new(config: &Config, gauge: Family<ZoneLabels, Gauge>) -> Self {
        let origin = Origin::of(config);
        let key = pod_key(&config.namespace, &config.pod_name);
        let current = match origin {
            Origin::Setting => Placement {
                zone: config.zone.as_str().into(),
                node: config.node.as_str().into(),
            },
            Origin::PodRecord => {
                if !config.zone.is_empty() || !config.node.is_empty() {
                    tracing::warn!(
                        zone = %config.zone,
                        node = %config.node,
                        record = %key,
                        "--zone and --node are ignored in a cluster: the zone and node come from the pod record"
                    );
                }
                tracing::info!(
                    record = %key,
                    "zone and node come from the pod record; routing with no zone preference until it is read"
                );
                Placement::default()
            }
        };
        let placements = Self {
            origin,
            namespace: config.namespace.clone(),
            pod: config.pod_name.clone(),
            current: RwLock::new(Placement::default()),
            learned: AtomicBool::new(false),
            missing_logged: AtomicBool::new(false),
            started: Instant::now(),
            // Only an operator writes pod records: a routing file without one is not waited for.
            wait: if !config.cluster_routing() {
                Duration::ZERO
            } else {
                config.pod_record_wait
            },
            gauge,
        };
        placements.set(current);
        placements
    }

    /// The placement in force.
    pub fn current(&self) -> Placement {
        self.read().clone()
    }

    /// The zone in force (empty: none preferred).
    pub fn zone(&self) -> Arc<str> {
        self.read().zone.clone()
    }

    /// Learns from `table` (a no-op with `--zone`); returns whether the placement changed.
    pub fn follow(&self, table: &RoutingTable) -> bool {
        if self.origin == Origin::Setting {
            return false;
        }
        let key = pod_key(&self.namespace, &self.pod);
        let Some(next) = from_table(table, &self.namespace, &self.pod) else {
            if self.learned.load(Ordering::SeqCst) {
                // Only the operator removes it, when the pod is gone: keep what we had.
                if !self.missing_logged.swap(true, Ordering::SeqCst) {
                    let here = self.current();
                    tracing::warn!(
                        record = %key,
                        zone = %here.zone,
                        node = %here.node,
                        "the pod record is gone; keeping the zone last learned"
                    );
                }
            } else if table.revision > 0 && !self.missing_logged.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    record = %key,
                    revision = table.revision,
                    "no pod record in the routing table yet; routing with no zone preference until the operator writes it"
                );
            }
            return false;
        };
        self.missing_logged.store(false, Ordering::SeqCst);
        let first = !self.learned.swap(true, Ordering::SeqCst);
        let before = self.current();
        if before == next {
            if first {
                tracing::info!(zone = %next.zone, node = %next.node, record = %key, "zone learned from the pod record");
            }
            return false;
        }
        if first {
            tracing::info!(zone = %next.zone, node = %next.node, record = %key, "zone learned from the pod record");
        } else {
            tracing::info!(
                zone = %next.zone,
                node = %next.node,
                previous_zone = %before.zone,
                previous_node = %before.node,
                record = %key,
                "zone changed in the pod record; routing by the new one"
            );
        }
        if next.zone.is_empty() {
            tracing::warn!(node = %next.node, "the pod's node has no topology.kubernetes.io/zone label; no zone preferred");
        }
        self.set(next);
        true
    }

    /// Whether `/readyz` may say ready as far as the placement goes, and a line saying why.
    pub fn readiness(&self) -> (bool, String) {
        let here = self.current();
        let zone = if here.zone.is_empty() {
            "none".to_owned()
        } else {
            here.zone.to_string()
        };
        readiness(
            self.origin,
            self.learned.load(Ordering::SeqCst),
            self.started.elapsed(),
            self.wait,
            &format!("zone: {zone}, node: {}", here.node),
            &pod_key(&self.namespace, &self.pod),
        )
    }

    fn set(&self, next: Placement) {
        self.gauge.clear();
        self.gauge
            .get_or_create(&ZoneLabels {
                zone: next.zone.to_string(),
                node: next.node.to_string(),
            })
            .set(1);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Placement> {
        // A panic while holding the lock leaves a whole value: keep using it.
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The readiness rule (pure, for the tests): ready with a setting or a learned record;
/// without a record, not ready for the first `wait` after start, then ready anyway.
fn readiness(
    origin: Origin,
    learned: bool,
    elapsed: Duration,
    wait: Duration,
    here: &str,
    key: &str,
) -> (bool, String) {
    match (origin, learned) {
        (Origin::Setting, _) => (true, format!("{here} (--zone)")),
        (Origin::PodRecord, true) => (true, format!("{here} (pod record {key})")),
        (Origin::PodRecord, false) if elapsed < wait => (
            false,
            format!("{here}: waiting up to {wait:?} for the pod record {key}"),
        ),
        (Origin::PodRecord, false) => (
            true,
            format!("{here}: no pod record {key} yet; routing with no zone preference"),
        ),
    }
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
