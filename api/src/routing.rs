//! The routing table: what the operator writes to etcd and every sidecar follows.
//!
//! The operator is the only writer; sidecars only read and watch. In local mode the same
//! table is built in process from CR YAML files. Every value carries `schemaVersion` so that
//! a sidecar can refuse a table it does not understand instead of misrouting.
//!
//! Keys (all under [`PREFIX`]):
//!
//! | key | value |
//! | --- | --- |
//! | `topics/<namespace>/<name>` | [`TopicEntry`] |
//! | `groups/<namespace>/<name>` | [`GroupEntry`] |
//! | `subscriptions/<namespace>/<name>` | [`SubscriptionEntry`] |
//! | `members/<namespace>/<group>/<pod>` | [`MemberEntry`] |
//! | `pods/<namespace>/<pod>` | [`PodEntry`] |
//!
//! A **pod record** (`pods/...`) exists for every pod that carries the sidecar once it is
//! scheduled (its `spec.nodeName` is set), whether or not it is in a group (a producer
//! only has one too), and until the pod object is gone (a terminating pod keeps it while
//! its sidecar drains). It is how a sidecar learns its own zone and node in a cluster: the
//! operator reads the node's `topology.kubernetes.io/zone` label, which no container can
//! see, and a sidecar watches only its own record (see [`RoutingTable::pods`]).
//!
//! [`scope`] cuts the part of the table one pod needs: what the operator's routing service
//! serves each sidecar.
//!
//! Values hold resolved settings (durations in milliseconds, sizes in bytes, the topic of a
//! subscription as `namespace/name`), computed once by [`TopicEntry::from_topic`] and its
//! siblings, so that no sidecar parses a CR field again.

pub mod scope;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crd::{
    Balancing, ConsumerGroup, Delivery, Durability, Ordering, Qos, Subscription, Topic, ZonePolicy,
};

/// Prefix of every routing-table key in etcd.
pub const PREFIX: &str = "/ferry/v1/";
/// Schema version written in every value.
pub const SCHEMA_VERSION: u32 = 1;

/// `namespace/name` of a namespaced object.
pub type ObjectRef = String;

/// Joins a namespace and a name into an [`ObjectRef`].
pub fn object_ref(namespace: &str, name: &str) -> ObjectRef {
    format!("{namespace}/{name}")
}

/// Why a resource could not be turned into a routing entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct EntryError {
    pub object: ObjectRef,
    pub field: &'static str,
    pub message: String,
}

/// A topic's policies, as sidecars apply them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicEntry {
    pub schema_version: u32,
    pub namespace: String,
    pub name: String,
    pub durability: Durability,
    pub replicas: u32,
    pub ordering: Ordering,
    pub retention_max_age_ms: u64,
    pub retention_max_bytes: u64,
    pub max_message_bytes: u32,
    pub dedup_window_ms: u64,
    /// `None`: any service account of the topic's namespace may publish.
    pub allowed_publishers: Option<Vec<String>>,
    pub allowed_subscriber_namespaces: Vec<String>,
}

/// A consumer group's delivery mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupEntry {
    pub schema_version: u32,
    pub namespace: String,
    pub name: String,
    pub delivery: Delivery,
    pub zone_policy: ZonePolicy,
    pub balancing: Balancing,
}

/// A subscription: which group receives which topic, and how.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionEntry {
    pub schema_version: u32,
    pub namespace: String,
    pub name: String,
    /// `namespace/name` of the topic.
    pub topic: ObjectRef,
    /// `namespace/name` of the group (always the subscription's namespace).
    pub group: ObjectRef,
    pub qos: Qos,
    pub ack_wait_ms: u64,
    pub max_deliveries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_multiplier: f64,
    /// `namespace/name` of the dead-letter topic.
    pub dead_letter_topic: Option<ObjectRef>,
    pub max_in_flight: u32,
    pub filter_key_prefix: Option<String>,
    pub filter_headers: BTreeMap<String, String>,
}

/// A pod that receives a group's messages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberEntry {
    pub schema_version: u32,
    pub namespace: String,
    /// Name of the group this record makes the pod a member of.
    pub group: String,
    pub pod: String,
    /// `ip:port` of the pod's sidecar peer endpoint.
    pub address: String,
    /// Service account of the pod: with `namespace`, the identity its sidecar's certificate
    /// must prove to peers that dial `address`. Empty in records written before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    pub zone: String,
    pub node: String,
    pub ready: bool,
}

/// Where a pod that carries the sidecar runs: what its sidecar cannot see from inside its
/// container and learns from this record (its zone above all, which decides same-zone
/// delivery).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    pub schema_version: u32,
    pub namespace: String,
    pub pod: String,
    /// The pod's `metadata.uid`: tells a recreated pod of the same name from the old one.
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// The `topology.kubernetes.io/zone` label of the node; empty when it has none.
    pub zone: String,
    /// `status.podIP`; empty until the kubelet reports it.
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
}

/// The whole table, as a sidecar holds it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTable {
    /// Version of the table's source (the etcd revision, or a local counter); a sidecar never
    /// applies a table older than one it has applied.
    pub revision: i64,
    pub topics: BTreeMap<ObjectRef, TopicEntry>,
    pub groups: BTreeMap<ObjectRef, GroupEntry>,
    pub subscriptions: BTreeMap<ObjectRef, SubscriptionEntry>,
    /// Members by `namespace/group`, then by pod name.
    pub members: BTreeMap<ObjectRef, BTreeMap<String, MemberEntry>>,
    /// Pod records by `namespace/pod`. The operator writes one per sidecar pod; a sidecar's
    /// table holds its own only (its etcd source skips the others), a local table none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pods: BTreeMap<ObjectRef, PodEntry>,
}

impl RoutingTable {
    /// The subscriptions of a topic (`namespace/name`).
    pub fn subscriptions_of<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = &'a SubscriptionEntry> + 'a {
        self.subscriptions
            .values()
            .filter(move |s| s.topic == topic)
    }

    /// The ready members of a group (`namespace/name`).
    pub fn ready_members<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a MemberEntry> + 'a {
        self.members
            .get(group)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|m| m.ready)
    }

    /// The etcd key of every entry and its JSON value, in key order: what the operator
    /// writes and what a digest compares.
    pub fn to_kv(&self) -> BTreeMap<String, String> {
        let mut kv = BTreeMap::new();
        let mut put = |key: String, value: Result<String, serde_json::Error>| {
            if let Ok(v) = value {
                kv.insert(key, v);
            }
        };
        for (k, v) in &self.topics {
            put(topic_key(k), serde_json::to_string(v));
        }
        for (k, v) in &self.groups {
            put(group_key(k), serde_json::to_string(v));
        }
        for (k, v) in &self.subscriptions {
            put(subscription_key(k), serde_json::to_string(v));
        }
        for members in self.members.values() {
            for m in members.values() {
                put(
                    member_key(&m.namespace, &m.group, &m.pod),
                    serde_json::to_string(m),
                );
            }
        }
        for (k, v) in &self.pods {
            put(pod_key_of(k), serde_json::to_string(v));
        }
        kv
    }

    /// Applies one etcd key/value (`value = None` for a delete) to the table.
    pub fn apply_kv(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), TableError> {
        let rest = key
            .strip_prefix(PREFIX)
            .ok_or_else(|| TableError::UnknownKey(key.into()))?;
        let (kind, path) = rest
            .split_once('/')
            .ok_or_else(|| TableError::UnknownKey(key.into()))?;
        fn decode<T: serde::de::DeserializeOwned + HasSchemaVersion>(
            key: &str,
            bytes: &[u8],
        ) -> Result<T, TableError> {
            let value: T = serde_json::from_slice(bytes).map_err(|e| TableError::BadValue {
                key: key.into(),
                message: e.to_string(),
            })?;
            if value.schema_version() != SCHEMA_VERSION {
                return Err(TableError::SchemaVersion {
                    key: key.into(),
                    found: value.schema_version(),
                });
            }
            Ok(value)
        }
        match kind {
            "topics" => match value {
                Some(v) => {
                    self.topics.insert(path.into(), decode(key, v)?);
                }
                None => {
                    self.topics.remove(path);
                }
            },
            "groups" => match value {
                Some(v) => {
                    self.groups.insert(path.into(), decode(key, v)?);
                }
                None => {
                    self.groups.remove(path);
                }
            },
            "subscriptions" => match value {
                Some(v) => {
                    self.subscriptions.insert(path.into(), decode(key, v)?);
                }
                None => {
                    self.subscriptions.remove(path);
                }
            },
            "members" => {
                let (group, pod) = path
                    .rsplit_once('/')
                    .ok_or_else(|| TableError::UnknownKey(key.into()))?;
                match value {
                    Some(v) => {
                        let m: MemberEntry = decode(key, v)?;
                        self.members
                            .entry(group.into())
                            .or_default()
                            .insert(pod.into(), m);
                    }
                    None => {
                        if let Some(members) = self.members.get_mut(group) {
                            members.remove(pod);
                            if members.is_empty() {
                                self.members.remove(group);
                            }
                        }
                    }
                }
            }
            "pods" => match value {
                Some(v) => {
                    self.pods.insert(path.into(), decode(key, v)?);
                }
                None => {
                    self.pods.remove(path);
                }
            },
            _ => return Err(TableError::UnknownKey(key.into())),
        }
        Ok(())
    }
}

/// Why a routing-table key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("unknown routing-table key {0:?}")]
    UnknownKey(String),
    #[error("routing-table value at {key:?} does not decode: {message}")]
    BadValue { key: String, message: String },
    #[error(
        "routing-table value at {key:?} has schema version {found}, this build reads {SCHEMA_VERSION}"
    )]
    SchemaVersion { key: String, found: u32 },
}

trait HasSchemaVersion {
    fn schema_version(&self) -> u32;
}
macro_rules! has_schema_version {
    ($($t:ty),*) => { $(impl HasSchemaVersion for $t { fn schema_version(&self) -> u32 { self.schema_version } })* };
}
has_schema_version!(
    TopicEntry,
    GroupEntry,
    SubscriptionEntry,
    MemberEntry,
    PodEntry
);

/// Key of a topic entry.
pub fn topic_key(topic: &str) -> String {
    format!("{PREFIX}topics/{topic}")
}
/// Key of a group entry.
pub fn group_key(group: &str) -> String {
    format!("{PREFIX}groups/{group}")
}
/// Key of a subscription entry.
pub fn subscription_key(subscription: &str) -> String {
    format!("{PREFIX}subscriptions/{subscription}")
}
/// Key of a member entry.
pub fn member_key(namespace: &str, group: &str, pod: &str) -> String {
    format!("{PREFIX}members/{namespace}/{group}/{pod}")
}

/// Prefix of every pod record.
pub const PODS_PREFIX: &str = "/ferry/v1/pods/";
/// Key of the record of pod `pod` of `namespace`.
pub fn pod_key(namespace: &str, pod: &str) -> String {
    format!("{PODS_PREFIX}{namespace}/{pod}")
}
/// Key of the record of pod `namespace/pod` (an [`ObjectRef`]).
fn pod_key_of(pod: &str) -> String {
    format!("{PODS_PREFIX}{pod}")
}

fn meta(obj: &impl kube::Resource) -> (String, String) {
    let meta = obj.meta();
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn millis(object: &str, field: &'static str, value: &str) -> Result<u64, EntryError> {
    crate::duration::parse(value)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|e| EntryError {
            object: object.into(),
            field,
            message: e.to_string(),
        })
}

fn positive(object: &str, field: &'static str, value: i32) -> Result<u32, EntryError> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| EntryError {
            object: object.into(),
            field,
            message: format!("must be at least 1, got {value}"),
        })
}

impl TopicEntry {
    /// The entry for a Topic, with every field resolved and checked.
    pub fn from_topic(topic: &Topic) -> Result<Self, EntryError> {
        let (namespace, name) = meta(topic);
        let obj = object_ref(&namespace, &name);
        let spec = &topic.spec;
        Ok(Self {
            schema_version: SCHEMA_VERSION,
            durability: spec.durability,
            replicas: positive(&obj, "spec.replicas", spec.replicas)?,
            ordering: spec.ordering,
            retention_max_age_ms: millis(&obj, "spec.retention.maxAge", &spec.retention.max_age)?,
            retention_max_bytes: crate::quantity::parse_bytes(&spec.retention.max_bytes).map_err(
                |e| EntryError {
                    object: obj.clone(),
                    field: "spec.retention.maxBytes",
                    message: e.to_string(),
                },
            )?,
            max_message_bytes: positive(&obj, "spec.maxMessageBytes", spec.max_message_bytes)?,
            dedup_window_ms: millis(&obj, "spec.dedupWindow", &spec.dedup_window)?,
            allowed_publishers: spec.allowed_publishers.clone(),
            allowed_subscriber_namespaces: spec.allowed_subscriber_namespaces.clone(),
            namespace,
            name,
        })
    }
}

impl GroupEntry {
    /// The entry for a ConsumerGroup.
    pub fn from_group(group: &ConsumerGroup) -> Self {
        let (namespace, name) = meta(group);
        Self {
            schema_version: SCHEMA_VERSION,
            namespace,
            name,
            delivery: group.spec.delivery,
            zone_policy: group.spec.zone_policy,
            balancing: group.spec.balancing.unwrap_or_default(),
        }
    }
}

impl SubscriptionEntry {
    /// The entry for a Subscription, with its topic and group resolved to `namespace/name`.
    pub fn from_subscription(sub: &Subscription) -> Result<Self, EntryError> {
        let (namespace, name) = meta(sub);
        let obj = object_ref(&namespace, &name);
        let spec = &sub.spec;
        let topic = if spec.topic.contains('/') {
            spec.topic.clone()
        } else {
            object_ref(&namespace, &spec.topic)
        };
        let initial = millis(&obj, "spec.backoff.initial", &spec.backoff.initial)?;
        let max = millis(&obj, "spec.backoff.max", &spec.backoff.max)?;
        if max < initial {
            return Err(EntryError {
                object: obj,
                field: "spec.backoff.max",
                message: "must be at least spec.backoff.initial".into(),
            });
        }
        if !(1.0..=10.0).contains(&spec.backoff.multiplier) {
            return Err(EntryError {
                object: obj,
                field: "spec.backoff.multiplier",
                message: format!("must be between 1 and 10, got {}", spec.backoff.multiplier),
            });
        }
        Ok(Self {
            schema_version: SCHEMA_VERSION,
            topic,
            group: object_ref(&namespace, &spec.group),
            qos: spec.qos,
            ack_wait_ms: millis(&obj, "spec.ackWait", &spec.ack_wait)?.max(1),
            max_deliveries: positive(&obj, "spec.maxDeliveries", spec.max_deliveries)?,
            backoff_initial_ms: initial,
            backoff_max_ms: max,
            backoff_multiplier: spec.backoff.multiplier,
            dead_letter_topic: spec
                .dead_letter_topic
                .as_ref()
                .map(|t| object_ref(&namespace, t)),
            max_in_flight: positive(&obj, "spec.maxInFlight", spec.max_in_flight)?,
            filter_key_prefix: spec.filter.as_ref().and_then(|f| f.key_prefix.clone()),
            filter_headers: spec
                .filter
                .as_ref()
                .map(|f| f.headers.clone())
                .unwrap_or_default(),
            namespace,
            name,
        })
    }
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
