//! What every Ferry resource's status has in common.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A standard Kubernetes condition (`type`, `status`, `reason`, `message`,
/// `lastTransitionTime`, `observedGeneration`), the shape that `kubectl wait
/// --for=condition=Ready`, Argo CD and Flux understand.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Condition types Ferry sets.
pub mod condition_types {
    /// The resource is in the routing table and usable.
    pub const READY: &str = "Ready";
}

/// Status shared by Topic and Subscription.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The `metadata.generation` this status describes; when it is lower than the
    /// object's generation, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current state. `Ready` is `True` once the resource is in the routing table; when it is
    /// `False`, its reason and message say what is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
