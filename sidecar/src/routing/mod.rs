//! Routing: where the table comes from ([`source`]) and how names in requests resolve
//! against it.

pub mod etcd;
pub mod fixtures;
pub mod operator;
pub mod source;

pub use source::{FileSource, RoutingSource, StaticSource};

use ferry_api::routing::{GroupEntry, RoutingTable, SubscriptionEntry, TopicEntry};

/// `namespace/name` for a name given by an app: `name` means the sidecar's own namespace.
pub fn qualify(namespace: &str, name: &str) -> String {
    if name.contains('/') {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

/// Whether `service_account` of `namespace` may publish to `topic`. Entries of the
/// allow-list are `name` (the topic's namespace) or `namespace/name`; with no list, every
/// pod of the topic's own namespace may publish.
pub fn may_publish(topic: &TopicEntry, namespace: &str, service_account: &str) -> bool {
    match &topic.allowed_publishers {
        None => topic.namespace == namespace,
        Some(list) => list.iter().any(|entry| match entry.split_once('/') {
            Some((ns, sa)) => ns == namespace && sa == service_account,
            None => topic.namespace == namespace && entry == service_account,
        }),
    }
}

/// Whether a subscription of `namespace` may receive `topic`'s messages: a topic's own
/// namespace always may, another only when the topic lists it in
/// `allowedSubscriberNamespaces`. The operator already leaves such a subscription out of
/// the table; the producing and the consuming sidecar check again, so that a table written
/// by something else (or an old one) cannot carry messages across namespaces.
pub fn may_subscribe(topic: &TopicEntry, namespace: &str) -> bool {
    topic.namespace == namespace
        || topic
            .allowed_subscriber_namespaces
            .iter()
            .any(|n| n == namespace)
}

/// A subscription with the group and topic it refers to, as one lookup.
#[derive(Debug, Clone)]
pub struct Resolved<'a> {
    pub subscription: &'a SubscriptionEntry,
    pub group: &'a GroupEntry,
    pub topic: &'a TopicEntry,
}

/// Looks a subscription (`namespace/name`) up with its group and topic.
pub fn resolve_subscription<'a>(table: &'a RoutingTable, name: &str) -> Option<Resolved<'a>> {
    let subscription = table.subscriptions.get(name)?;
    let group = table.groups.get(&subscription.group)?;
    let topic = table.topics.get(&subscription.topic)?;
    Some(Resolved {
        subscription,
        group,
        topic,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use super::fixtures::{group, member, subscription, topic};

    #[test]
    fn allow_list_forms() {
        let mut t = topic("shop", "orders");
        assert!(super::may_publish(&t, "shop", "any"));
        assert!(!super::may_publish(&t, "other", "any"));
        t.allowed_publishers = Some(vec!["api".into(), "billing/worker".into()]);
        assert!(super::may_publish(&t, "shop", "api"));
        assert!(!super::may_publish(&t, "shop", "worker"));
        assert!(super::may_publish(&t, "billing", "worker"));
        t.allowed_publishers = Some(vec![]);
        assert!(!super::may_publish(&t, "shop", "api"));
    }

    #[test]
    fn subscriber_namespaces() {
        let mut t = topic("shop", "orders");
        assert!(super::may_subscribe(&t, "shop"));
        assert!(!super::may_subscribe(&t, "billing"));
        t.allowed_subscriber_namespaces = vec!["billing".into()];
        assert!(super::may_subscribe(&t, "billing"));
        assert!(!super::may_subscribe(&t, "other"));
    }

    #[test]
    fn qualify_names() {
        assert_eq!(super::qualify("ns", "t"), "ns/t");
        assert_eq!(super::qualify("ns", "o/t"), "o/t");
    }
}
