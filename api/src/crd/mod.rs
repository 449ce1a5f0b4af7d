//! The custom resources, API group `ferry.dev`, version `v1alpha1`, all namespaced.
//!
//! Schemas come from the Rust types (schemars), so that what the API server validates and
//! what the operator and sidecar read can never drift; `crdgen` writes them to `crds/`.
//! Cross-field rules are CEL (`x-kubernetes-validations`) so that the API server rejects a
//! bad object with a message that names the field, before any controller sees it.

mod common;
mod group;
mod subscription;
mod topic;

pub use common::{Condition, ResourceStatus, condition_types};
pub use group::{
    Balancing, ConsumerGroup, ConsumerGroupSpec, ConsumerGroupStatus, Delivery, ZonePolicy,
};
pub use subscription::{Backoff, Filter, Qos, Subscription, SubscriptionSpec};
pub use topic::{Durability, Ordering, Retention, Topic, TopicSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD Ferry installs, in the order `crdgen` writes them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![Topic::crd(), ConsumerGroup::crd(), Subscription::crd()]
}

/// Pattern of a DNS-1123 label, the name of a namespaced object in the same namespace.
pub(crate) const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
