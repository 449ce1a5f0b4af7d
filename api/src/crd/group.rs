//! `ConsumerGroup`: the pods that consume together.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Condition;

/// A set of pods, chosen by a label selector, that consume together. Unlike partitions,
/// there is no ceiling on a group's parallelism: adding members spreads a backlog at once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "ConsumerGroup",
    doc = "A set of pods, chosen by a label selector, that consume messages together.",
    namespaced,
    status = "ConsumerGroupStatus",
    shortname = "fcg",
    category = "ferry",
    printcolumn = r#"{"name":"Delivery","type":"string","jsonPath":".spec.delivery"}"#,
    printcolumn = r#"{"name":"Zones","type":"string","jsonPath":".spec.zonePolicy"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.readyMembers"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("(has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0) || (has(self.selector.matchExpressions) && size(self.selector.matchExpressions) > 0)").message("spec.selector: must have matchLabels or matchExpressions; an empty selector would match every pod").field_path(".selector").reason(kube::core::Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.balancing) || self.delivery == 'Unicast'").message("spec.balancing: only applies to Unicast delivery").field_path(".balancing").reason(kube::core::Reason::FieldValueForbidden))]
pub struct ConsumerGroupSpec {
    /// Pods of this namespace that belong to the group. Only pods that carry the Ferry
    /// sidecar and are Ready become members. Must not be empty.
    pub selector: LabelSelector,

    /// `Unicast`: each message goes to one member (a work queue). `Broadcast`: to every
    /// member (for example local cache invalidation).
    #[serde(default)]
    pub delivery: Delivery,

    /// Where members may be. `PreferSameZone`: members in the producer's zone first, other
    /// zones when none is live there. `SameZoneOnly`: never cross a zone; messages wait for a
    /// same-zone member. `Any`: zones are ignored.
    #[serde(default)]
    pub zone_policy: ZonePolicy,

    /// How a Unicast group picks a member: `RoundRobin` (default) or `LeastInFlight`.
    /// Ordered topics always hash the message key instead. Only valid for Unicast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancing: Option<Balancing>,
}

/// How a group shares messages.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Delivery {
    #[default]
    Unicast,
    Broadcast,
}

/// Zone preference of a group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ZonePolicy {
    #[default]
    PreferSameZone,
    SameZoneOnly,
    Any,
}

/// Member choice of a Unicast group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Balancing {
    #[default]
    RoundRobin,
    LeastInFlight,
}

/// Observed state of a ConsumerGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods matched by the selector that carry the sidecar.
    #[serde(default)]
    pub members: i32,
    /// Members that are Ready and so receive messages.
    #[serde(default)]
    pub ready_members: i32,
    /// Zones of the ready members, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Current state; `Ready` is `True` once the group is in the routing table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
