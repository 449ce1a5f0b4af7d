//! Authorization of peer calls, deny by default.
//!
//! A caller is known by the identity its certificate proved (`tls.rs`), never by what a
//! request claims; the claims a request makes (its producer, the topic, the subscription)
//! are checked against that identity and the routing table:
//!
//! - **Who a call acts for** (`acts_for`): a request names its producer (`namespace/pod`)
//!   itself; it must be of the caller's namespace and, when the table lists that pod, of
//!   the service account its member record gives. A producer in no group has no record: on
//!   a replica, its copies belong to the identity that placed the first ones
//!   (`replica/pins.rs`). Identity is per service account: pods sharing one are one caller.
//! - **Forward**: the subscription must exist and be of the delivery's topic, and the
//!   caller must be allowed to send that topic's messages: its service account is on the
//!   Topic's `allowedPublishers` (with no list, any of the topic's namespace), or it is a
//!   group member (the table lists a member pod of its namespace and service account) of a
//!   namespace that may publish to the topic: that is where a producer's copies and custody
//!   go (replicas and handoff peers are group members of the producer's own namespace,
//!   `replica/choose.rs`), and a custodian forwards what it took over. The producer the
//!   delivery names must be one the caller acts for, so that no caller takes over the
//!   stream another producer's settlements go back on. That this pod is a member of the
//!   subscription's group is checked by the consumer (`consumer::accept`). A refused
//!   delivery is answered `REJECTED` with the reason and never reaches the app.
//! - **QueryDelivery**: only the producer of a delivery may ask about it.
//! - **Replicate, Held, TakeCustody**: the producer (or the handing-off sidecar) named must
//!   be one the caller acts for, of this sidecar's own namespace (copies of a tenant's
//!   messages never leave it); this sidecar must be a member of some group (what the replica
//!   chooser picks from: a pod in no group holds nothing, so it takes nothing and shows
//!   nothing); the namespace must be allowed to publish to the topic, and the caller must be
//!   allowed to publish to it or be a group member. A `Held` probe (no topic) reveals
//!   nothing and is open to any peer. A replica's size is bounded apart from this
//!   (`replica/holder.rs`: the topic's `retention.maxBytes` per producer).
//! - **Settlements** on the producer side need no check here: the producer dials each
//!   member and accepts only the identity the table gives it (`expect.rs`), and applies a
//!   settlement or query answer only to a delivery it sent on that link
//!   (`delivery/dispatcher/events.rs`, `find_in_flight`); a replica's trims count only from
//!   the producer's identity (above).
//!
//! The `ferry-sidecar` binary always has a certificate (`--tls-dir` or `--identity-url`,
//! else it does not start); only a sidecar embedded in process without credentials (the
//! in-process tests) has a plaintext peer port, which knows no caller and checks nothing.

use ferry_api::identity::SpiffeId;
use ferry_api::routing::{RoutingTable, TopicEntry};

use crate::routing::may_publish;

/// Why a peer call was refused; the text is what the caller reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {0}")]
pub struct Denied(pub String);

fn namespace_of(producer: &str) -> &str {
    producer.split_once('/').map_or("", |(ns, _)| ns)
}

/// Whether some identity of `namespace` may publish to `topic`.
fn namespace_may_publish(topic: &TopicEntry, namespace: &str) -> bool {
    match &topic.allowed_publishers {
        None => topic.namespace == namespace,
        Some(list) => list.iter().any(|entry| match entry.split_once('/') {
            Some((ns, _)) => ns == namespace,
            None => topic.namespace == namespace,
        }),
    }
}

/// Whether the table lists a member pod of `caller`'s namespace and service account.
fn is_member(table: &RoutingTable, caller: &SpiffeId) -> bool {
    table
        .members
        .values()
        .flat_map(|m| m.values())
        .any(|m| m.namespace == caller.namespace && m.service_account == caller.service_account)
}

/// Whether `caller` may send `topic`'s messages: as a publisher, or as a custodian.
fn may_send(table: &RoutingTable, topic: &TopicEntry, caller: &SpiffeId) -> bool {
    may_publish(topic, &caller.namespace, &caller.service_account)
        || (namespace_may_publish(topic, &caller.namespace) && is_member(table, caller))
}

fn same_namespace(caller: &SpiffeId, producer: &str, what: &str) -> Result<(), Denied> {
    if namespace_of(producer) == caller.namespace {
        Ok(())
    } else {
        Err(Denied(format!(
            "{caller} may not act for {what} {producer:?} of another namespace"
        )))
    }
}

/// The service account the routing table records for pod `producer` (`namespace/pod`).
fn recorded_account<'a>(table: &'a RoutingTable, producer: &str) -> Option<&'a str> {
    let (ns, pod) = producer.split_once('/')?;
    table
        .members
        .values()
        .filter_map(|m| m.get(pod))
        .find(|m| m.namespace == ns && !m.service_account.is_empty())
        .map(|m| m.service_account.as_str())
}

/// Whether `caller` may act as the sidecar `producer` (`namespace/pod`): of its namespace,
/// of the service account the table records for that pod (when it lists it), and the
/// identity its copies on this sidecar belong to (`pinned`, `replica/pins.rs`), if any.
pub fn acts_for(
    table: &RoutingTable,
    caller: &SpiffeId,
    producer: &str,
    pinned: Option<&str>,
) -> Result<(), Denied> {
    same_namespace(caller, producer, "producer")?;
    if let Some(sa) = recorded_account(table, producer)
        && sa != caller.service_account
    {
        return Err(Denied(format!(
            "{caller} may not act for {producer:?}, which runs as service account {sa:?}"
        )));
    }
    if let Some(owner) = pinned
        && owner != caller.to_string()
    {
        return Err(Denied(format!(
            "{caller} may not act for {producer:?}, whose copies here belong to {owner}"
        )));
    }
    Ok(())
}

fn topic<'a>(table: &'a RoutingTable, name: &str) -> Result<&'a TopicEntry, Denied> {
    table.topics.get(name).ok_or_else(|| {
        Denied(format!(
            "topic {name:?} is not in this sidecar's routing table"
        ))
    })
}

/// A delivery of `subscription` (of `topic_name`) from `producer`, sent by `caller`.
pub fn forward(
    table: &RoutingTable,
    caller: &SpiffeId,
    subscription: &str,
    topic_name: &str,
    producer: &str,
) -> Result<(), Denied> {
    let sub = table.subscriptions.get(subscription).ok_or_else(|| {
        Denied(format!(
            "subscription {subscription:?} is not in this sidecar's routing table"
        ))
    })?;
    if sub.topic != topic_name {
        return Err(Denied(format!(
            "subscription {subscription:?} is of topic {:?}, not {topic_name:?}",
            sub.topic
        )));
    }
    let topic = topic(table, topic_name)?;
    if !may_send(table, topic, caller) {
        return Err(Denied(format!(
            "{caller} may not send messages of topic {topic_name:?}"
        )));
    }
    acts_for(table, caller, producer, None)
}

/// A question about a delivery of `producer`: only that producer may ask.
pub fn query(table: &RoutingTable, caller: &SpiffeId, producer: &str) -> Result<(), Denied> {
    acts_for(table, caller, producer, None)
}

/// Whether the table lists sidecar `me` (`namespace/pod`) as a member of some group, with
/// an address: what the replica chooser picks from (`replica/choose.rs`).
fn is_listed(table: &RoutingTable, me: &str) -> bool {
    let Some((ns, pod)) = me.split_once('/') else {
        return false;
    };
    table
        .members
        .values()
        .filter_map(|m| m.get(pod))
        .any(|m| m.namespace == ns && !m.address.is_empty())
}

/// Copies or custody of `topic_name`'s messages of `producer`, on this sidecar `me`
/// (`namespace/pod`), where `producer`'s copies belong to `pinned` (if any).
pub fn holding(
    table: &RoutingTable,
    caller: &SpiffeId,
    me: &str,
    topic_name: &str,
    producer: &str,
    pinned: Option<&str>,
) -> Result<(), Denied> {
    acts_for(table, caller, producer, pinned)?;
    let my_namespace = namespace_of(me);
    if caller.namespace != my_namespace {
        return Err(Denied(format!(
            "{caller} may not place copies on a sidecar of namespace {my_namespace:?}"
        )));
    }
    if !is_listed(table, me) {
        return Err(Denied(format!(
            "sidecar {me:?} is a member of no group: the routing table gives it no copies or custody"
        )));
    }
    let topic = topic(table, topic_name)?;
    if !may_send(table, topic, caller) {
        return Err(Denied(format!(
            "{caller} may not hold messages of topic {topic_name:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::fixtures::{member, subscription, topic as topic_entry};

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("ferry.local", ns, sa).unwrap()
    }

    fn table(allowed: Option<Vec<String>>) -> RoutingTable {
        let mut t = RoutingTable::default();
        let mut orders = topic_entry("shop", "orders");
        orders.allowed_publishers = allowed;
        t.topics.insert("shop/orders".into(), orders);
        t.topics
            .insert("shop/other".into(), topic_entry("shop", "other"));
        t.subscriptions.insert(
            "shop/w-orders".into(),
            subscription("shop", "w-orders", "orders", "w"),
        );
        t
    }

    #[test]
    fn forwards_need_a_caller_that_may_send_the_topic() {
        let open = table(None);
        let ok = forward(
            &open,
            &id("shop", "any"),
            "shop/w-orders",
            "shop/orders",
            "shop/p",
        );
        assert_eq!(ok, Ok(()));
        for (caller, sub, topic, producer, why) in [
            (
                id("evil", "x"),
                "shop/w-orders",
                "shop/orders",
                "evil/p",
                "may not send",
            ),
            (
                id("shop", "a"),
                "shop/nope",
                "shop/orders",
                "shop/p",
                "not in this",
            ),
            (
                id("shop", "a"),
                "shop/w-orders",
                "shop/other",
                "shop/p",
                "is of topic",
            ),
            (
                id("shop", "a"),
                "shop/w-orders",
                "shop/orders",
                "bank/p",
                "another namespace",
            ),
        ] {
            let err = forward(&open, &caller, sub, topic, producer).unwrap_err();
            assert!(err.0.contains(why), "{err}");
        }
        // An allow-list: its entries, and group members of their namespaces (custodians).
        let mut listed = table(Some(vec!["bank/payer".into()]));
        let send = |t: &RoutingTable, who: SpiffeId| {
            let producer = format!("{}/p", who.namespace);
            forward(t, &who, "shop/w-orders", "shop/orders", &producer)
        };
        assert!(send(&listed, id("bank", "payer")).is_ok());
        assert!(
            send(&listed, id("bank", "custodian")).is_err(),
            "not a member"
        );
        assert!(send(&listed, id("shop", "a")).is_err());
        let mut custodian = member("bank", "g", "c-0", "z", "10.0.0.9:7710");
        custodian.service_account = "custodian".into();
        listed
            .members
            .entry("bank/g".into())
            .or_default()
            .insert("c-0".into(), custodian);
        assert!(send(&listed, id("bank", "custodian")).is_ok());
        assert!(send(&listed, id("evil", "custodian")).is_err());
    }

    #[test]
    fn copies_stay_in_the_producers_namespace() {
        let mut t = table(None);
        let a = id("shop", "a");
        let err = holding(&t, &a, "shop/me", "shop/orders", "shop/p", None).unwrap_err();
        assert!(err.0.contains("member of no group"), "{err}");
        t.members
            .entry("shop/g".into())
            .or_default()
            .insert("me".into(), member("shop", "g", "me", "z", "10.0.0.2:7710"));
        assert!(holding(&t, &a, "shop/me", "shop/orders", "shop/p", None).is_ok());
        let err = holding(&t, &a, "bank/me", "shop/orders", "shop/p", None).unwrap_err();
        assert!(err.0.contains("namespace \"bank\""), "{err}");
        assert!(holding(&t, &a, "shop/me", "shop/orders", "bank/p", None).is_err());
        assert!(holding(&t, &a, "shop/me", "shop/gone", "shop/p", None).is_err());
        assert!(query(&t, &a, "bank/p").is_err());
        assert!(query(&t, &a, "shop/p").is_ok());
    }

    #[test]
    fn only_the_producers_own_identity_acts_for_it() {
        let mut t = table(None);
        let (a, b) = (id("shop", "a"), id("shop", "b"));
        // A pod the table lists runs as its recorded service account.
        let mut p = member("shop", "g", "p", "z", "10.0.0.1:7710");
        p.service_account = "a".into();
        t.members
            .entry("shop/g".into())
            .or_default()
            .insert("p".into(), p);
        assert!(acts_for(&t, &a, "shop/p", None).is_ok());
        let err = acts_for(&t, &b, "shop/p", None).unwrap_err();
        assert!(err.0.contains("service account \"a\""), "{err}");
        assert!(query(&t, &b, "shop/p").is_err());
        // One in no group: whoever placed its copies here first.
        let owner = a.to_string();
        assert!(acts_for(&t, &a, "shop/q", Some(&owner)).is_ok());
        let err = acts_for(&t, &b, "shop/q", Some(&owner)).unwrap_err();
        assert!(err.0.contains("belong to"), "{err}");
        assert!(holding(&t, &b, "shop/p", "shop/orders", "shop/q", Some(&owner)).is_err());
        assert!(acts_for(&t, &b, "shop/q", None).is_ok());
    }
}
