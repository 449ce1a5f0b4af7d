//! `Subscription`: binds a consumer group to a topic.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::ResourceStatus;

/// Binds a ConsumerGroup to a Topic: every message of the topic goes to the group, with the
/// delivery guarantees and retry policy set here.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Subscription",
    doc = "Binds a ConsumerGroup to a Topic, with its delivery guarantee and retry policy.",
    namespaced,
    status = "ResourceStatus",
    shortname = "fsub",
    category = "ferry",
    printcolumn = r#"{"name":"Topic","type":"string","jsonPath":".spec.topic"}"#,
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"QoS","type":"string","jsonPath":".spec.qos"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.deadLetterTopic) || self.deadLetterTopic != self.topic").message("spec.deadLetterTopic: must differ from spec.topic").field_path(".deadLetterTopic").reason(kube::core::Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("self.qos != 'AtMostOnce' || !has(self.deadLetterTopic)").message("spec.deadLetterTopic: AtMostOnce never redelivers, so it has no dead letters").field_path(".deadLetterTopic").reason(kube::core::Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("duration(self.ackWait) > duration('0s')").message("spec.ackWait: must be greater than 0s").field_path(".ackWait").reason(kube::core::Reason::FieldValueInvalid))]
pub struct SubscriptionSpec {
    /// The topic: `name` in this namespace, or `namespace/name` for a topic in another
    /// namespace (allowed only when that Topic lists this namespace in
    /// `allowedSubscriberNamespaces`).
    #[schemars(
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 317)
    )]
    pub topic: String,

    /// The ConsumerGroup, in this namespace, that receives the topic's messages.
    #[schemars(regex(pattern = super::NAME_PATTERN), length(min = 1, max = 253))]
    pub group: String,

    /// Delivery guarantee. `AtMostOnce`: never redelivered. `AtLeastOnce` (default):
    /// redelivered until acked or dead-lettered. `ExactlyOnce`: at-least-once plus the
    /// consuming sidecar suppressing ids its app already acked within the topic's
    /// `dedupWindow`.
    #[serde(default)]
    pub qos: Qos,

    /// Time the consuming app has to ack a delivery (Go duration) before it is redelivered,
    /// possibly to another member.
    #[serde(default = "default_ack_wait")]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub ack_wait: String,

    /// Deliveries of one message, the first included, before it goes to the dead-letter topic
    /// (or is dropped when there is none).
    #[serde(default = "default_max_deliveries")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: i32,

    /// Delay between redeliveries, growing by `multiplier` from `initial` up to `max`.
    #[serde(default)]
    pub backoff: Backoff,

    /// Topic, in this namespace, that receives messages after `maxDeliveries`, with the
    /// reason and the attempt history in their headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = super::NAME_PATTERN), length(min = 1, max = 253))]
    pub dead_letter_topic: Option<String>,

    /// Unacked deliveries per member at once; the flow-control window.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_in_flight: i32,

    /// Only messages that match are delivered to this subscription; the rest are settled at
    /// once for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

/// Delivery guarantee of a subscription.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Qos {
    AtMostOnce,
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// Exponential backoff between redeliveries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("duration(self.max) >= duration(self.initial)").message("spec.backoff.max: must be at least spec.backoff.initial").field_path(".max").reason(kube::core::Reason::FieldValueInvalid))]
pub struct Backoff {
    /// Delay before the first redelivery (Go duration).
    #[serde(default = "default_backoff_initial")]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub initial: String,
    /// Longest delay between redeliveries (Go duration).
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub max: String,
    /// Factor applied to the delay after each redelivery, from 1 (constant) to 10.
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
        }
    }
}

/// Which messages a subscription receives. Every condition given must hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// Only messages whose key starts with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Only messages that carry every one of these headers with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

fn default_ack_wait() -> String {
    "30s".into()
}
fn default_max_deliveries() -> i32 {
    5
}
fn default_max_in_flight() -> i32 {
    100
}
fn default_backoff_initial() -> String {
    "1s".into()
}
fn default_backoff_max() -> String {
    "60s".into()
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
