//! Pods and nodes → a ConsumerGroup's members.
//!
//! A pod is a **member** of a group when it is in the group's namespace, its labels match
//! the group's selector, it is not being deleted nor finished (`Succeeded`/`Failed`), and
//! it **carries the sidecar**: it asks for injection (`ferry.dev/inject: "true"`) and has
//! a container named [`SIDECAR_CONTAINER`] in `spec.initContainers` (a native sidecar, as
//! the webhook injects it) or in `spec.containers`.
//!
//! The annotation alone does not count: it is a *request* for injection, and a pod that
//! has it but no sidecar (webhook not installed, or the pod created before it was) would be
//! routed to a port nobody listens on. Nor does the container alone: a container merely
//! named like the sidecar in a pod that never asked for it is not Ferry's (the webhook
//! denies such pods, and one that asks gets its own container compared with the injected
//! one, [`crate::webhook::spoof`]). Membership only routes to a pod; what a peer may do is
//! decided by its certificate, which the identity service issues only to a pod whose
//! sidecar runs the operator's sidecar image.
//!
//! A member is **ready**, and only then written to the routing table, when its `Ready`
//! condition is `True` and it has a `status.podIP`. Not-ready members leave the table
//! (so every entry written has `ready: true`); they are still counted in the group's
//! `status.members`. The zone is the `topology.kubernetes.io/zone` label of the pod's node
//! (empty when the node or the label is missing), and the address is `podIP:PEER_PORT`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ferry_api::consts::INJECT_ANNOTATION;
use ferry_api::routing::{MemberEntry, SCHEMA_VERSION, member_key};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::{Error, Result};

/// The sidecar container, in `initContainers` (native sidecar) or `containers`.
pub use ferry_api::consts::SIDECAR_CONTAINER;

/// A group's members, as the table and the group's status show them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Ready members by pod name: what goes into the table.
    pub ready: BTreeMap<String, MemberEntry>,
    /// Pods that are members, ready or not.
    pub members: i32,
    /// Distinct non-empty zones of the ready members, sorted.
    pub zones: Vec<String>,
}

impl Membership {
    /// The ready members' keys and JSON values.
    pub fn kv(&self) -> Result<BTreeMap<String, String>> {
        self.ready
            .values()
            .map(|m| {
                let value = serde_json::to_string(m).map_err(|source| Error::Json {
                    what: "member entry",
                    source,
                })?;
                Ok((member_key(&m.namespace, &m.group, &m.pod), value))
            })
            .collect()
    }

    /// Number of ready members.
    pub fn ready_members(&self) -> i32 {
        i32::try_from(self.ready.len()).unwrap_or(i32::MAX)
    }
}

/// Whether the pod asks for the sidecar (`ferry.dev/inject: "true"`).
pub fn asks_for_injection(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Whether the pod asks for injection and has the sidecar container, as a native sidecar
/// or a plain container. A container of that name without the annotation is not trusted
/// (the webhook denies such a pod wherever it sees it).
pub fn carries_sidecar(pod: &Pod) -> bool {
    asks_for_injection(pod)
        && pod.spec.as_ref().is_some_and(|spec| {
            spec.containers.iter().any(|c| c.name == SIDECAR_CONTAINER)
                || spec
                    .init_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == SIDECAR_CONTAINER)
        })
}

/// Whether the pod's `Ready` condition is `True`.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Whether the pod may be a member at all: not being deleted and not finished.
fn is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The zone of a node: its `topology.kubernetes.io/zone` label.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ferry_api::consts::ZONE_LABEL))
        .cloned()
}

/// The members of group `namespace/group` among `pods`; `zone_of` maps a node name to its
/// zone. Pods of other namespaces are ignored.
pub fn membership<'a>(
    namespace: &str,
    group: &str,
    selector: &LabelSelector,
    pods: impl IntoIterator<Item = &'a Pod>,
    zone_of: impl Fn(&str) -> Option<String>,
    peer_port: u16,
) -> Membership {
    let mut out = Membership::default();
    let mut zones = BTreeSet::new();
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if pod.metadata.namespace.as_deref() != Some(namespace)
            || !ferry_api::local::selector::matches(selector, &labels)
            || !carries_sidecar(pod)
            || !is_live(pod)
        {
            continue;
        }
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        out.members = out.members.saturating_add(1);
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let (Some(ip), true) = (ip, is_ready(pod)) else {
            continue;
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let zone = zone_of(&node).unwrap_or_default();
        // The identity its sidecar's certificate proves; Kubernetes defaults it to `default`.
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into());
        if !zone.is_empty() {
            zones.insert(zone.clone());
        }
        out.ready.insert(
            name.clone(),
            MemberEntry {
                schema_version: SCHEMA_VERSION,
                namespace: namespace.into(),
                group: group.into(),
                pod: name,
                address: SocketAddr::new(ip, peer_port).to_string(),
                service_account,
                zone,
                node,
                ready: true,
            },
        );
    }
    out.zones = zones.into_iter().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodCondition, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(name: &str, labels: &[(&str, &str)], init: bool, ready: bool, ip: Option<&str>) -> Pod {
        let sidecar = Container {
            name: SIDECAR_CONTAINER.into(),
            ..Container::default()
        };
        let app = Container {
            name: "app".into(),
            ..Container::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                annotations: Some([(INJECT_ANNOTATION.into(), "true".into())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(format!("node-{name}")),
                containers: if init {
                    vec![app]
                } else {
                    vec![app, sidecar.clone()]
                },
                init_containers: init.then(|| vec![sidecar]),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn selector() -> LabelSelector {
        LabelSelector {
            match_labels: Some([("app".to_owned(), "billing".to_owned())].into()),
            ..LabelSelector::default()
        }
    }

    #[test]
    fn only_ready_matching_pods_with_the_sidecar_are_in_the_table() -> Result<()> {
        let mut no_sidecar = pod("bare", &[("app", "billing")], false, true, Some("10.0.0.9"));
        if let Some(spec) = no_sidecar.spec.as_mut() {
            spec.containers.retain(|c| c.name != SIDECAR_CONTAINER);
        }
        let mut not_asking = pod("named", &[("app", "billing")], true, true, Some("10.0.0.7"));
        not_asking.metadata.annotations = None;
        let mut deleting = pod(
            "going",
            &[("app", "billing")],
            false,
            true,
            Some("10.0.0.8"),
        );
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let pods = [
            pod("a", &[("app", "billing")], true, true, Some("10.0.0.1")),
            pod("b", &[("app", "billing")], false, true, Some("fd00::2")),
            pod("c", &[("app", "billing")], false, false, Some("10.0.0.3")),
            pod("d", &[("app", "billing")], false, true, None),
            pod("e", &[("app", "other")], false, true, Some("10.0.0.5")),
            no_sidecar,
            not_asking,
            deleting,
        ];
        let zone_of = |node: &str| (node == "node-a").then(|| "zone-a".to_owned());
        let m = membership("shop", "billing", &selector(), &pods, zone_of, 7710);
        assert_eq!(m.members, 4, "a, b, c (not ready), d (no IP)");
        assert_eq!(m.ready.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.ready_members(), 2);
        assert_eq!(m.zones, ["zone-a"]);
        let a = &m.ready["a"];
        assert_eq!(
            (a.address.as_str(), a.zone.as_str(), a.node.as_str()),
            ("10.0.0.1:7710", "zone-a", "node-a")
        );
        assert_eq!(m.ready["b"].address, "[fd00::2]:7710");
        assert_eq!(m.ready["b"].zone, "");
        let kv = m.kv()?;
        assert!(kv.contains_key("/ferry/v1/members/shop/billing/a"));
        assert_eq!(kv.len(), 2);
        Ok(())
    }

    #[test]
    fn pods_of_other_namespaces_never_match() {
        let mut p = pod("a", &[("app", "billing")], true, true, Some("10.0.0.1"));
        p.metadata.namespace = Some("elsewhere".into());
        let m = membership("shop", "billing", &selector(), [&p], |_| None, 7710);
        assert_eq!(m, Membership::default());
    }
}
