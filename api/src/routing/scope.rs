//! The part of the routing table one pod needs: what the operator's routing service
//! (`ferry.v1.Routing/Watch`) sends a sidecar instead of the whole table, so that no
//! sidecar reads another tenant's topics, groups or pod addresses.
//!
//! For a pod of namespace `N`, [`scope`] keeps:
//!
//! - **`N`'s own entries**: its topics, groups and subscriptions, and the members of its
//!   groups (replica and handoff peers are members of `N`, and a consumer checks its own
//!   groups).
//! - **What `N` sends into**: for every topic `N` may publish to (its own, and another
//!   namespace's whose `allowedPublishers` names a service account of `N`), the
//!   subscriptions to it whose namespace the topic allows (`allowedSubscriberNamespaces`),
//!   their groups and members: the producing sidecar forwards to those members and keeps
//!   custody. The grant is by namespace, not by the pod's own service account, because a
//!   custodian of `N` may forward what a pod of another service account of `N` published.
//! - **Their dead-letter topics**, transitively: the producing sidecar dead-letters a
//!   subscription's messages into that subscription's dead-letter topic and then forwards
//!   them to its subscribers, so it needs that topic, its subscriptions, groups, members.
//! - **Topics `N`'s subscriptions name** in another namespace, when that topic's
//!   `allowedSubscriberNamespaces` lists `N` (the topic alone: its policies, not its other
//!   subscribers).
//! - **Its own pod record** (`pods/<N>/<pod>`) and no other.
//!
//! Nothing else: another namespace's entries appear only when one of the allow-lists above
//! grants them. The operator already leaves a subscription that its topic does not allow
//! out of the table; the checks here hold even for a table that carries one.

use std::collections::{BTreeMap, BTreeSet};

use super::{RoutingTable, TopicEntry, object_ref};

/// Who is asking: the identity its certificate proved and the pod its pod record names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    pub namespace: &'a str,
    /// Part of the caller's identity; the scope is by namespace (see the module doc), the
    /// routing service checks it against the pod record.
    pub service_account: &'a str,
    pub pod: &'a str,
}

/// Whether a subscription of `namespace` may receive `topic`'s messages.
fn may_subscribe(topic: &TopicEntry, namespace: &str) -> bool {
    topic.namespace == namespace
        || topic
            .allowed_subscriber_namespaces
            .iter()
            .any(|n| n == namespace)
}

/// Whether some service account of `namespace` may publish to `topic` (an entry `name`
/// of `allowedPublishers` is of the topic's namespace, `namespace/name` of that namespace;
/// no list means the topic's namespace).
fn namespace_may_publish(topic: &TopicEntry, namespace: &str) -> bool {
    topic.namespace == namespace
        || topic
            .allowed_publishers
            .iter()
            .flatten()
            .any(|entry| entry.split_once('/').is_some_and(|(ns, _)| ns == namespace))
}

/// The entries of `table` that `caller`'s pod needs (see the module doc), at the same
/// revision.
pub fn scope(table: &RoutingTable, caller: &Caller<'_>) -> RoutingTable {
    let ns = caller.namespace;
    let mut topics: BTreeSet<&str> = BTreeSet::new();
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    let mut subscriptions: BTreeSet<&str> = BTreeSet::new();

    // Topics whose subscribers this pod forwards to, closed over dead-letter topics.
    let mut queue: Vec<&str> = table
        .topics
        .iter()
        .filter(|(_, t)| namespace_may_publish(t, ns))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut sent: BTreeSet<&str> = queue.iter().copied().collect();
    while let Some(name) = queue.pop() {
        let Some(topic) = table.topics.get(name) else {
            continue;
        };
        topics.insert(name);
        for (key, sub) in &table.subscriptions {
            if sub.topic != name || !may_subscribe(topic, &sub.namespace) {
                continue;
            }
            subscriptions.insert(key);
            groups.insert(&sub.group);
            if let Some(dlq) = sub.dead_letter_topic.as_deref()
                && sent.insert(dlq)
            {
                queue.push(dlq);
            }
        }
    }

    // The namespace's own entries, and the topics its subscriptions may receive.
    for (key, topic) in &table.topics {
        if topic.namespace == ns {
            topics.insert(key);
        }
    }
    for (key, group) in &table.groups {
        if group.namespace == ns {
            groups.insert(key);
        }
    }
    for (key, sub) in &table.subscriptions {
        if sub.namespace != ns {
            continue;
        }
        subscriptions.insert(key);
        groups.insert(&sub.group);
        if table
            .topics
            .get(&sub.topic)
            .is_some_and(|t| may_subscribe(t, ns))
        {
            topics.insert(&sub.topic);
        }
    }

    let own_pod = object_ref(ns, caller.pod);
    RoutingTable {
        revision: table.revision,
        topics: pick(&topics, &table.topics),
        groups: pick(&groups, &table.groups),
        subscriptions: pick(&subscriptions, &table.subscriptions),
        members: pick(&groups, &table.members),
        pods: table
            .pods
            .get(&own_pod)
            .map(|p| (own_pod.clone(), p.clone()))
            .into_iter()
            .collect(),
    }
}

/// The entries of `from` whose keys are in `keys`.
fn pick<V: Clone>(keys: &BTreeSet<&str>, from: &BTreeMap<String, V>) -> BTreeMap<String, V> {
    keys.iter()
        .filter_map(|k| from.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect()
}

#[cfg(test)]
#[path = "scope_tests.rs"]
mod tests;
