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
        .into_iter()
        .map(unwrap_descriptions)
        .collect()
}

/// Doc comments are wrapped at 100 columns in the source; `kubectl explain` wraps text
/// itself, so the schema's descriptions keep only paragraph breaks.
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match v {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|p| p.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => walk(v),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

/// Pattern of a DNS-1123 label, the name of a namespaced object in the same namespace.
pub(crate) const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
