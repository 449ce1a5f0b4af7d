//! A resource → the routing-table key it owns and its value.
//!
//! The values come from the `api` crate's constructors ([`TopicEntry::from_topic`] and its
//! siblings), so the operator and local mode write byte-identical tables.

use std::collections::BTreeMap;

use ferry_api::routing::{
    GroupEntry, SubscriptionEntry, TopicEntry, group_key, member_key, object_ref, subscription_key,
    topic_key,
};
use ferry_api::{ConsumerGroup, Subscription, Topic};
use kube::ResourceExt;
use serde::Serialize;

use crate::error::{Error, Result};

/// `namespace/name` of a namespaced object, or an error naming what is missing.
pub fn namespaced_ref<K: kube::Resource<DynamicType = ()>>(obj: &K) -> Result<(String, String)> {
    let kind = leak_kind::<K>();
    let namespace = obj.namespace().ok_or(Error::MissingField {
        kind,
        field: "metadata.namespace",
    })?;
    let name = obj.meta().name.clone().ok_or(Error::MissingField {
        kind,
        field: "metadata.name",
    })?;
    Ok((namespace, name))
}

fn leak_kind<K: kube::Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Topic" => "Topic",
        "ConsumerGroup" => "ConsumerGroup",
        "Subscription" => "Subscription",
        "Pod" => "Pod",
        _ => "object",
    }
}

fn json<T: Serialize>(what: &'static str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|source| Error::Json { what, source })
}

/// The key of a Topic.
pub fn topic_entry_key(namespace: &str, name: &str) -> String {
    topic_key(&object_ref(namespace, name))
}

/// The key of a ConsumerGroup.
pub fn group_entry_key(namespace: &str, name: &str) -> String {
    group_key(&object_ref(namespace, name))
}

/// The key of a Subscription.
pub fn subscription_entry_key(namespace: &str, name: &str) -> String {
    subscription_key(&object_ref(namespace, name))
}

/// The prefix under which a group's members live (with the trailing `/`, so that group
/// `a` never matches the members of group `ab`).
pub fn members_prefix(namespace: &str, group: &str) -> String {
    member_key(namespace, group, "")
}

/// A Topic's key and value; an [`Error::Entry`] names the field that cannot be resolved.
pub fn topic_kv(topic: &Topic) -> Result<BTreeMap<String, String>> {
    let entry = TopicEntry::from_topic(topic)?;
    let key = topic_entry_key(&entry.namespace, &entry.name);
    Ok(BTreeMap::from([(key, json("topic entry", &entry)?)]))
}

/// A ConsumerGroup's own key and value (its members come from [`super::members`]).
pub fn group_kv(group: &ConsumerGroup) -> Result<BTreeMap<String, String>> {
    let entry = GroupEntry::from_group(group);
    let key = group_entry_key(&entry.namespace, &entry.name);
    Ok(BTreeMap::from([(key, json("group entry", &entry)?)]))
}

/// A Subscription's resolved entry (topic and group as `namespace/name`).
pub fn subscription_entry(sub: &Subscription) -> Result<SubscriptionEntry> {
    Ok(SubscriptionEntry::from_subscription(sub)?)
}

/// A Subscription's key and value.
pub fn subscription_kv(entry: &SubscriptionEntry) -> Result<BTreeMap<String, String>> {
    let key = subscription_entry_key(&entry.namespace, &entry.name);
    Ok(BTreeMap::from([(key, json("subscription entry", entry)?)]))
}

/// Splits `namespace/name` into its parts.
pub fn split_ref(reference: &str) -> Option<(&str, &str)> {
    reference.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::crd::{ConsumerGroupSpec, SubscriptionSpec, TopicSpec};

    fn spec<T: serde::de::DeserializeOwned>(json: &str) -> Result<T> {
        serde_json::from_str(json).map_err(|source| Error::Json {
            what: "test spec",
            source,
        })
    }

    fn meta(name: &str) -> kube::api::ObjectMeta {
        kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..Default::default()
        }
    }

    #[test]
    fn keys_and_values_follow_the_schema() -> Result<()> {
        let topic = Topic {
            metadata: meta("orders"),
            spec: spec::<TopicSpec>("{}")?,
            status: None,
        };
        let kv = topic_kv(&topic)?;
        let value = kv.get("/ferry/v1/topics/shop/orders").map(String::as_str);
        assert!(
            value.is_some_and(|v| v.contains("\"schemaVersion\":1")),
            "{kv:?}"
        );

        let group = ConsumerGroup {
            metadata: meta("billing"),
            spec: spec::<ConsumerGroupSpec>(r#"{"selector":{"matchLabels":{"app":"b"}}}"#)?,
            status: None,
        };
        assert!(group_kv(&group)?.contains_key("/ferry/v1/groups/shop/billing"));
        assert_eq!(
            members_prefix("shop", "billing"),
            "/ferry/v1/members/shop/billing/"
        );

        let sub = Subscription {
            metadata: meta("s"),
            spec: spec::<SubscriptionSpec>(r#"{"topic":"other/orders","group":"billing"}"#)?,
            status: None,
        };
        let entry = subscription_entry(&sub)?;
        assert_eq!(entry.topic, "other/orders");
        assert_eq!(entry.group, "shop/billing");
        assert!(subscription_kv(&entry)?.contains_key("/ferry/v1/subscriptions/shop/s"));
        Ok(())
    }

    #[test]
    fn a_missing_namespace_is_named() -> Result<()> {
        let topic = Topic {
            metadata: kube::api::ObjectMeta {
                name: Some("t".into()),
                ..Default::default()
            },
            spec: spec::<TopicSpec>("{}")?,
            status: None,
        };
        let error = namespaced_ref(&topic).map_err(|e| e.to_string());
        assert_eq!(
            error,
            Err("Topic object has no metadata.namespace".to_owned())
        );
        Ok(())
    }
}
