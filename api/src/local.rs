//! Local mode: the routing table built in process from a folder of CR YAML files, with no
//! Kubernetes and no etcd.
//!
//! What a cluster learns from pods and nodes (a pod's name, labels and zone, which decide
//! group membership) comes in local mode from a small `pods.yaml` beside the CRs: a YAML list
//! of [`LocalPod`]s. Without one, [`default_pods`] makes one up. [`build_table`] then applies
//! the same rules the operator applies, and reports what is wrong as [`Problem`]s instead of
//! failing, so that one bad Subscription does not stop a developer's whole mesh.
//!
//! `pods.yaml` (every field but `name` and `zone` optional):
//!
//! ```yaml
//! - name: billing-a
//!   namespace: default        # default: default
//!   zone: zone-a
//!   node: node-1              # default: <zone>-node
//!   labels: {app: billing}
//!   ready: true               # default: true; false keeps the pod out of every group
//!   serviceAccount: default   # default: default
//! ```

pub mod selector;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::Manifests;
use crate::routing::{
    GroupEntry, MemberEntry, ObjectRef, RoutingTable, SCHEMA_VERSION, SubscriptionEntry,
    TopicEntry, object_ref,
};

/// File name of the local pods list, beside the CRs.
pub const PODS_FILE: &str = "pods.yaml";
/// The two zones local mode spreads its default pods over.
pub const DEFAULT_ZONES: [&str; 2] = ["zone-a", "zone-b"];
/// Name of the default producer pod of each namespace.
pub const PRODUCER_POD: &str = "producer";
/// Label of every pod [`default_pods`] makes, naming its role, so that a user can tell them
/// apart in `kubectl`-style listings and write selectors against them.
pub const ROLE_LABEL: &str = "ferry.dev/local-role";

/// A pod of the local mesh: one sidecar process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPod {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub zone: String,
    /// Defaults to `<zone>-node`: one node per zone, as on a small cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A pod that is not Ready is in no group, as in a cluster.
    #[serde(default = "default_true")]
    pub ready: bool,
    #[serde(default = "default_service_account")]
    pub service_account: String,
}

impl LocalPod {
    /// `namespace/name`, unique across the local mesh.
    pub fn id(&self) -> ObjectRef {
        object_ref(&self.namespace, &self.name)
    }

    /// The node, with the default applied.
    pub fn node_name(&self) -> String {
        if self.node.is_empty() {
            format!("{}-node", self.zone)
        } else {
            self.node.clone()
        }
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_service_account() -> String {
    "default".into()
}

/// Why the pods file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: expected a YAML list of pods ({{name, namespace, zone, node, labels}}): {message}"
    )]
    Yaml { path: PathBuf, message: String },
}

/// Where the pods of a local mesh came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodsSource {
    File(PathBuf),
    Default,
}

impl fmt::Display for PodsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Default => write!(
                f,
                "default (no {PODS_FILE}: two pods per group, one per zone, plus a producer per namespace)"
            ),
        }
    }
}

/// Parses a pods file's text; `path` only names it in errors.
pub fn parse_pods(path: &Path, text: &str) -> Result<Vec<LocalPod>, LocalError> {
    serde_saphyr::from_str::<Option<Vec<LocalPod>>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| LocalError::Yaml {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// The pods of the mesh in `dir`: its `pods.yaml`, or [`default_pods`] when there is none.
pub fn load_pods(
    dir: &Path,
    manifests: &Manifests,
) -> Result<(Vec<LocalPod>, PodsSource), LocalError> {
    let path = dir.join(PODS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((parse_pods(&path, &text)?, PodsSource::File(path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((default_pods(manifests), PodsSource::Default))
        }
        Err(source) => Err(LocalError::Read { path, source }),
    }
}

/// The pods local mode uses without a `pods.yaml`: for each ConsumerGroup two pods,
/// `<group>-a` in `zone-a` and `<group>-b` in `zone-b`, labelled to match the group's
/// selector; and one pod `producer` per namespace that has any Ferry resource, in `zone-a`,
/// labelled only with [`ROLE_LABEL`]`: producer`, so that (unless a selector matches on that
/// label, or only on `NotIn`/`DoesNotExist`) it is in no group: a place to publish from
/// whose deliveries all cross to the group pods, which makes zone preference visible.
pub fn default_pods(manifests: &Manifests) -> Vec<LocalPod> {
    let namespace_of = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.namespace.clone().unwrap_or_else(default_namespace)
    };
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    namespaces.extend(manifests.topics.iter().map(|t| namespace_of(&t.metadata)));
    namespaces.extend(
        manifests
            .subscriptions
            .iter()
            .map(|s| namespace_of(&s.metadata)),
    );
    let mut pods = Vec::new();
    for group in &manifests.groups {
        let namespace = namespace_of(&group.metadata);
        namespaces.insert(namespace.clone());
        let name = group.metadata.name.clone().unwrap_or_default();
        let mut labels = selector::satisfying_labels(&group.spec.selector);
        labels
            .entry(ROLE_LABEL.into())
            .or_insert_with(|| "consumer".into());
        for zone in DEFAULT_ZONES {
            let suffix = zone.trim_start_matches("zone-");
            pods.push(LocalPod {
                name: format!("{name}-{suffix}"),
                namespace: namespace.clone(),
                zone: zone.into(),
                node: String::new(),
                labels: labels.clone(),
                ready: true,
                service_account: default_service_account(),
            });
        }
    }
    for namespace in namespaces {
        pods.push(LocalPod {
            name: PRODUCER_POD.into(),
            namespace,
            zone: DEFAULT_ZONES[0].into(),
            node: String::new(),
            labels: BTreeMap::from([(ROLE_LABEL.into(), "producer".into())]),
            ready: true,
            service_account: default_service_account(),
        });
    }
    pods
}

/// Something wrong with the local mesh's resources: reported, never fatal. The object is
/// left out of the table (or, for a group, left without members) and the rest still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name` of the resource at fault.
    pub object: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Builds the routing table of a local mesh: the pure core of `ferryctl dev`.
///
/// Applies the operator's rules: entries come from [`TopicEntry::from_topic`] and its
/// siblings; a group's members are the Ready pods of its namespace that its selector
/// matches; a Subscription whose topic or group is missing, or whose cross-namespace topic
/// does not allow its namespace, stays out of the table. `address_of` gives each pod's peer
/// `ip:port`; `revision` is the table's version (a sidecar ignores a table older than the
/// one it has).
pub fn build_table(
    manifests: &Manifests,
    pods: &[LocalPod],
    address_of: impl Fn(&LocalPod) -> String,
    revision: i64,
) -> (RoutingTable, Vec<Problem>) {
    let mut table = RoutingTable {
        revision,
        ..RoutingTable::default()
    };
    let mut problems = Vec::new();
    let mut problem = |kind: &str, object: &str, message: String| {
        problems.push(Problem {
            object: format!("{kind} {object}"),
            message,
        });
    };

    let mut seen_pods = BTreeSet::new();
    for pod in pods {
        if !seen_pods.insert(pod.id()) {
            problem(
                "Pod",
                &pod.id(),
                "listed more than once; the first one counts".into(),
            );
        }
    }

    for topic in &manifests.topics {
        match TopicEntry::from_topic(topic) {
            Ok(entry) => {
                let key = object_ref(&entry.namespace, &entry.name);
                if table.topics.insert(key.clone(), entry).is_some() {
                    problem(
                        "Topic",
                        &key,
                        "defined more than once; the last one counts".into(),
                    );
                }
            }
            Err(e) => problem(
                "Topic",
                &e.object,
                format!("{}: {}; left out", e.field, e.message),
            ),
        }
    }

    for group in &manifests.groups {
        let entry = GroupEntry::from_group(group);
        let key = object_ref(&entry.namespace, &entry.name);
        if let Err(e) = selector::validate(&group.spec.selector) {
            problem(
                "ConsumerGroup",
                &key,
                format!("spec.selector: {e}; the group gets no members"),
            );
        } else {
            let mut members = BTreeMap::new();
            let mut seen = BTreeSet::new();
            for pod in pods {
                let eligible =
                    pod.namespace == entry.namespace && pod.ready && seen.insert(pod.name.clone());
                if eligible && selector::matches(&group.spec.selector, &pod.labels) {
                    members.insert(pod.name.clone(), member(&entry, pod, address_of(pod)));
                }
            }
            if members.is_empty() {
                problem(
                    "ConsumerGroup",
                    &key,
                    "no Ready pod matches spec.selector; messages for it wait".into(),
                );
            } else {
                table.members.insert(key.clone(), members);
            }
        }
        if table.groups.insert(key.clone(), entry).is_some() {
            problem(
                "ConsumerGroup",
                &key,
                "defined more than once; the last one counts".into(),
            );
        }
    }

    for sub in &manifests.subscriptions {
        let entry = match SubscriptionEntry::from_subscription(sub) {
            Ok(entry) => entry,
            Err(e) => {
                problem(
                    "Subscription",
                    &e.object,
                    format!("{}: {}; left out", e.field, e.message),
                );
                continue;
            }
        };
        let key = object_ref(&entry.namespace, &entry.name);
        let Some(topic) = table.topics.get(&entry.topic) else {
            problem(
                "Subscription",
                &key,
                format!("spec.topic: topic {} not found; left out", entry.topic),
            );
            continue;
        };
        if topic.namespace != entry.namespace
            && !topic
                .allowed_subscriber_namespaces
                .contains(&entry.namespace)
        {
            problem(
                "Subscription",
                &key,
                format!(
                    "spec.topic: topic {} does not list namespace {} in allowedSubscriberNamespaces; left out",
                    entry.topic, entry.namespace
                ),
            );
            continue;
        }
        if !table.groups.contains_key(&entry.group) {
            problem(
                "Subscription",
                &key,
                format!("spec.group: group {} not found; left out", entry.group),
            );
            continue;
        }
        if let Some(dlq) = &entry.dead_letter_topic
            && !table.topics.contains_key(dlq)
        {
            problem(
                "Subscription",
                &key,
                format!(
                    "spec.deadLetterTopic: topic {dlq} not found; dead letters are dropped until it exists"
                ),
            );
        }
        if table.subscriptions.insert(key.clone(), entry).is_some() {
            problem(
                "Subscription",
                &key,
                "defined more than once; the last one counts".into(),
            );
        }
    }
    (table, problems)
}

fn member(group: &GroupEntry, pod: &LocalPod, address: String) -> MemberEntry {
    MemberEntry {
        schema_version: SCHEMA_VERSION,
        namespace: group.namespace.clone(),
        group: group.name.clone(),
        pod: pod.name.clone(),
        address,
        service_account: pod.service_account.clone(),
        zone: pod.zone.clone(),
        node: pod.node_name(),
        ready: pod.ready,
    }
}

/// The pods as YAML, in the `pods.yaml` format, so that a user can save what the default
/// made up and edit it.
pub fn pods_to_yaml(pods: &[LocalPod]) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(&pods)
}

#[cfg(test)]
mod tests;
