//! `Topic`: a named stream of messages.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::ResourceStatus;

/// A named stream of messages. Every message published to a Topic goes to every
/// Subscription of it (publish-subscribe across consumer groups); inside a group, the group's
/// `delivery` decides who receives it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Topic",
    doc = "A named stream of messages that every subscribed consumer group receives.",
    namespaced,
    status = "ResourceStatus",
    shortname = "ftopic",
    shortname = "fto",
    category = "ferry",
    printcolumn = r#"{"name":"Durability","type":"string","jsonPath":".spec.durability"}"#,
    printcolumn = r#"{"name":"Ordering","type":"string","jsonPath":".spec.ordering"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.durability == 'Replicated' || self.replicas == 1").message("spec.replicas: must be 1 unless spec.durability is Replicated").field_path(".replicas").reason(kube::core::Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("self.durability != 'Replicated' || self.replicas >= 2").message("spec.replicas: must be at least 2 when spec.durability is Replicated").field_path(".replicas").reason(kube::core::Reason::FieldValueInvalid))]
pub struct TopicSpec {
    /// How a message is stored before the producer is acked. `Memory`: never touches disk
    /// (for logs and metrics; lost if the sidecar restarts). `Disk`: fsynced before the ack,
    /// many messages per fsync (group commit). `DiskAsync`: fsynced on a short interval, so
    /// the last interval's acked messages can be lost on power loss. `Replicated`: also
    /// fsynced on `replicas - 1` peer sidecars, preferring another node, before the ack (as
    /// Kafka's acks=all); if a replica's sidecar is gone for good, it delivers the copies.
    #[serde(default)]
    pub durability: Durability,

    /// Copies of each message for `Replicated` topics, counting the producer's own. Must be 1
    /// for every other durability.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,

    /// `Key`: messages with the same key reach each group's app in publish order, one in
    /// flight per key; `None`: no order, maximum parallelism.
    #[serde(default)]
    pub ordering: Ordering,

    /// Limits on the undelivered backlog each sidecar keeps for this topic. Past them,
    /// publishing fails with RESOURCE_EXHAUSTED (Memory topics drop the oldest instead).
    #[serde(default)]
    pub retention: Retention,

    /// Largest payload accepted, in bytes; larger publishes are rejected with
    /// INVALID_ARGUMENT. At most 4 MiB, the gRPC frame limit.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1, max = 4194304))]
    pub max_message_bytes: i32,

    /// A message id seen again within this window (Go duration, e.g. `2m`) is not stored
    /// twice. `0s` turns deduplication off.
    #[serde(default = "default_dedup_window")]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub dedup_window: String,

    /// Service accounts allowed to publish, as `name` (this namespace) or `namespace/name`.
    /// Unset: every pod of this namespace may publish. An empty list: nobody may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub allowed_publishers: Option<Vec<String>>,

    /// Other namespaces whose Subscriptions may name this topic as `namespace/name`.
    /// Cross-namespace subscriptions are denied unless the namespace is listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub allowed_subscriber_namespaces: Vec<String>,
}

/// How a message is stored before the producer is acked.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Durability {
    Memory,
    #[default]
    Disk,
    DiskAsync,
    Replicated,
}

/// Ordering guarantee of a topic.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Ordering {
    #[default]
    None,
    Key,
}

/// Limits on a topic's undelivered backlog per sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// Oldest undelivered message kept (Go duration, e.g. `168h`); older ones go to the
    /// dead-letter topic of each subscription that has one, else they are dropped and counted.
    #[serde(default = "default_max_age")]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub max_age: String,

    /// Undelivered bytes kept per sidecar, as a quantity (`512Mi`, `10Gi`). Past it,
    /// publishing fails with RESOURCE_EXHAUSTED naming this limit.
    #[serde(default = "default_max_bytes")]
    #[schemars(regex(pattern = crate::quantity::PATTERN))]
    pub max_bytes: String,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            max_bytes: default_max_bytes(),
        }
    }
}

fn default_replicas() -> i32 {
    1
}
fn default_max_message_bytes() -> i32 {
    1024 * 1024
}
fn default_dedup_window() -> String {
    "2m".into()
}
fn default_max_age() -> String {
    "168h".into()
}
fn default_max_bytes() -> String {
    "1Gi".into()
}
