//! Pods and nodes → pod records (`/ferry/v1/pods/<namespace>/<pod>`), from which each
//! sidecar learns its own zone and node.
//!
//! A pod has a record when it **carries the sidecar** (the same test as for group
//! membership, [`carries_sidecar`]: the injection annotation and the container), is
//! **scheduled** (`spec.nodeName` set: before that it has no node and so no zone) and is **not finished** (`Succeeded`/`Failed`: its sidecar is
//! gone). Readiness and group selectors do not matter: a pod that only publishes needs its
//! zone as much as a consumer, and a sidecar needs it before it is ready. A terminating pod
//! keeps its record until the pod object is gone, because its sidecar still drains and
//! hands off its backlog by it.
//!
//! The zone is the node's `topology.kubernetes.io/zone` label (empty when the node or the
//! label is missing; the record is then rewritten when the node shows up or gets it).

use std::collections::BTreeMap;

use ferry_api::routing::{PodEntry, SCHEMA_VERSION, pod_key};
use k8s_openapi::api::core::v1::Pod;

use super::members::carries_sidecar;
use crate::error::{Error, Result};

/// The record of `pod`, or `None` when it should have none; `zone_of` maps a node name to
/// its zone.
pub fn pod_record(pod: &Pod, zone_of: impl Fn(&str) -> Option<String>) -> Option<PodEntry> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !carries_sidecar(pod) || matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodEntry {
        schema_version: SCHEMA_VERSION,
        namespace: pod.metadata.namespace.clone()?,
        pod: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        zone: zone_of(&node).unwrap_or_default(),
        node,
        pod_ip: pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into()),
    })
}

/// The keys and JSON values of the records of `pods`.
pub fn pod_records_kv<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    zone_of: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>> {
    pods.into_iter()
        .filter_map(|pod| pod_record(pod, &zone_of))
        .map(|record| {
            let value = serde_json::to_string(&record).map_err(|source| Error::Json {
                what: "pod record",
                source,
            })?;
            Ok((pod_key(&record.namespace, &record.pod), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(name: &str, node: Option<&str>, sidecar: bool, phase: &str) -> Pod {
        let mut containers = vec![Container {
            name: "app".into(),
            ..Container::default()
        }];
        if sidecar {
            containers.push(Container {
                name: ferry_api::consts::SIDECAR_CONTAINER.into(),
                ..Container::default()
            });
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some(format!("uid-{name}")),
                annotations: Some(
                    [(ferry_api::consts::INJECT_ANNOTATION.into(), "true".into())].into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                containers,
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some("10.0.0.4".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn zone_of(node: &str) -> Option<String> {
        (node == "node-a").then(|| "zone-a".to_owned())
    }

    #[test]
    fn a_scheduled_sidecar_pod_gets_its_nodes_zone() {
        let record = pod_record(&pod("web", Some("node-a"), true, "Pending"), zone_of);
        assert_eq!(
            record,
            Some(PodEntry {
                schema_version: SCHEMA_VERSION,
                namespace: "shop".into(),
                pod: "web".into(),
                uid: "uid-web".into(),
                node: "node-a".into(),
                zone: "zone-a".into(),
                pod_ip: "10.0.0.4".into(),
                service_account: "default".into(),
            })
        );
        let unlabelled = pod_record(&pod("web", Some("node-x"), true, "Running"), zone_of);
        assert_eq!(unlabelled.map(|r| r.zone), Some(String::new()));
    }

    #[test]
    fn unscheduled_finished_and_sidecarless_pods_get_none() {
        let pods = [
            pod("unscheduled", None, true, "Pending"),
            pod("empty-node", Some(""), true, "Pending"),
            pod("done", Some("node-a"), true, "Succeeded"),
            pod("failed", Some("node-a"), true, "Failed"),
            pod("bare", Some("node-a"), false, "Running"),
            pod("kept", Some("node-a"), true, "Running"),
        ];
        let kv = pod_records_kv(&pods, zone_of).unwrap();
        assert_eq!(kv.keys().collect::<Vec<_>>(), ["/ferry/v1/pods/shop/kept"]);
    }

    #[test]
    fn a_terminating_pod_keeps_its_record() {
        let mut p = pod("going", Some("node-a"), true, "Running");
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(pod_record(&p, zone_of).is_some());
    }
}
