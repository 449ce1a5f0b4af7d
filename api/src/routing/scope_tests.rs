//! The scope of a pod: its namespace's entries and what allow-lists grant, never another
//! tenant's.

use std::collections::BTreeMap;

use super::*;
use crate::crd::{Balancing, Delivery, Durability, Ordering, Qos, ZonePolicy};
use crate::routing::{
    GroupEntry, MemberEntry, PodEntry, SCHEMA_VERSION, SubscriptionEntry, TopicEntry,
};

fn topic(ns: &str, name: &str) -> TopicEntry {
    TopicEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        name: name.into(),
        durability: Durability::Memory,
        replicas: 1,
        ordering: Ordering::None,
        retention_max_age_ms: 1,
        retention_max_bytes: 1,
        max_message_bytes: 1,
        dedup_window_ms: 1,
        allowed_publishers: None,
        allowed_subscriber_namespaces: vec![],
    }
}

fn subscription(ns: &str, name: &str, topic: &str, group: &str) -> SubscriptionEntry {
    SubscriptionEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        name: name.into(),
        topic: topic.into(),
        group: object_ref(ns, group),
        qos: Qos::AtLeastOnce,
        ack_wait_ms: 1,
        max_deliveries: 1,
        backoff_initial_ms: 1,
        backoff_max_ms: 1,
        backoff_multiplier: 1.0,
        dead_letter_topic: None,
        max_in_flight: 1,
        filter_key_prefix: None,
        filter_headers: BTreeMap::new(),
    }
}

/// Adds topic, group, subscription and one member; returns nothing, keys are `ns/name`.
struct Table(RoutingTable);

impl Table {
    fn topic(&mut self, t: TopicEntry) -> &mut Self {
        self.0.topics.insert(object_ref(&t.namespace, &t.name), t);
        self
    }
    fn group(&mut self, ns: &str, name: &str, pods: &[&str]) -> &mut Self {
        let g = GroupEntry {
            schema_version: SCHEMA_VERSION,
            namespace: ns.into(),
            name: name.into(),
            delivery: Delivery::Unicast,
            zone_policy: ZonePolicy::Any,
            balancing: Balancing::RoundRobin,
        };
        self.0.groups.insert(object_ref(ns, name), g);
        for pod in pods {
            let m = MemberEntry {
                schema_version: SCHEMA_VERSION,
                namespace: ns.into(),
                group: name.into(),
                pod: (*pod).into(),
                address: format!("{pod}:7710"),
                service_account: "sa".into(),
                zone: "z".into(),
                node: "n".into(),
                ready: true,
            };
            self.0
                .members
                .entry(object_ref(ns, name))
                .or_default()
                .insert((*pod).into(), m);
        }
        self
    }
    fn sub(&mut self, s: SubscriptionEntry) -> &mut Self {
        self.0
            .subscriptions
            .insert(object_ref(&s.namespace, &s.name), s);
        self
    }
    fn pod(&mut self, ns: &str, pod: &str) -> &mut Self {
        let p = PodEntry {
            schema_version: SCHEMA_VERSION,
            namespace: ns.into(),
            pod: pod.into(),
            uid: "u".into(),
            node: "n".into(),
            zone: "z".into(),
            pod_ip: "10.0.0.1".into(),
            service_account: "sa".into(),
        };
        self.0.pods.insert(object_ref(ns, pod), p);
        self
    }
}

/// Two tenants, `shop` and `bank`, that share nothing, plus `billing`, which `shop`'s
/// topic allows to subscribe.
fn mesh() -> RoutingTable {
    let mut t = Table(RoutingTable {
        revision: 42,
        ..Default::default()
    });
    let mut orders = topic("shop", "orders");
    orders.allowed_subscriber_namespaces = vec!["billing".into()];
    t.topic(orders)
        .topic(topic("shop", "dlq"))
        .group("shop", "workers", &["web-1", "web-2"])
        .sub({
            let mut s = subscription("shop", "work", "shop/orders", "workers");
            s.dead_letter_topic = Some("shop/dlq".into());
            s
        })
        .topic(topic("billing", "invoices"))
        .topic(topic("billing", "billing-dlq"))
        .group("billing", "invoicers", &["inv-1"])
        .group("billing", "dlq-readers", &["dlq-1"])
        .sub({
            let mut s = subscription("billing", "from-shop", "shop/orders", "invoicers");
            s.dead_letter_topic = Some("billing/billing-dlq".into());
            s
        })
        .sub(subscription(
            "billing",
            "read-dlq",
            "billing/billing-dlq",
            "dlq-readers",
        ))
        .sub(subscription(
            "billing",
            "own",
            "billing/invoices",
            "invoicers",
        ))
        .topic(topic("bank", "ledger"))
        .group("bank", "tellers", &["teller-1"])
        .sub(subscription("bank", "post", "bank/ledger", "tellers"))
        // A subscription of bank to shop's topic, which shop does not allow.
        .sub(subscription("bank", "snoop", "shop/orders", "tellers"))
        .pod("shop", "web-1")
        .pod("shop", "web-2")
        .pod("bank", "teller-1")
        .pod("billing", "inv-1");
    t.0
}

fn keys(t: &RoutingTable) -> Vec<String> {
    t.to_kv().into_keys().collect()
}

fn caller<'a>(ns: &'a str, pod: &'a str) -> Caller<'a> {
    Caller {
        namespace: ns,
        service_account: "sa",
        pod,
    }
}

#[test]
fn a_producer_sees_its_namespace_and_the_subscribers_its_topic_allows() {
    let s = scope(&mesh(), &caller("shop", "web-1"));
    assert_eq!(s.revision, 42);
    assert_eq!(
        keys(&s),
        [
            "/ferry/v1/groups/billing/dlq-readers",
            "/ferry/v1/groups/billing/invoicers",
            "/ferry/v1/groups/shop/workers",
            "/ferry/v1/members/billing/dlq-readers/dlq-1",
            "/ferry/v1/members/billing/invoicers/inv-1",
            "/ferry/v1/members/shop/workers/web-1",
            "/ferry/v1/members/shop/workers/web-2",
            "/ferry/v1/pods/shop/web-1",
            "/ferry/v1/subscriptions/billing/from-shop",
            // Its dead-letter topic's subscribers: shop's sidecar dead-letters into it.
            "/ferry/v1/subscriptions/billing/read-dlq",
            "/ferry/v1/subscriptions/shop/work",
            "/ferry/v1/topics/billing/billing-dlq",
            "/ferry/v1/topics/shop/dlq",
            "/ferry/v1/topics/shop/orders",
        ]
    );
}

#[test]
fn a_subscriber_of_another_namespace_sees_the_topic_it_is_allowed_and_its_own() {
    let s = scope(&mesh(), &caller("billing", "inv-1"));
    let k = keys(&s);
    assert!(k.contains(&"/ferry/v1/topics/shop/orders".to_owned()));
    assert!(k.contains(&"/ferry/v1/subscriptions/billing/own".to_owned()));
    assert!(k.contains(&"/ferry/v1/pods/billing/inv-1".to_owned()));
    // Not shop's own subscribers, groups, members or pods.
    for key in &k {
        assert!(
            !key.contains("/shop/") || key == "/ferry/v1/topics/shop/orders",
            "{key} leaked to billing"
        );
    }
}

#[test]
fn another_tenants_entries_are_never_included() {
    let table = mesh();
    for (ns, pod) in [("shop", "web-1"), ("billing", "inv-1")] {
        for key in keys(&scope(&table, &caller(ns, pod))) {
            assert!(!key.contains("/bank/"), "{key} leaked to {ns}");
        }
    }
    let bank = keys(&scope(&table, &caller("bank", "teller-1")));
    for key in &bank {
        assert!(
            key.contains("/bank/"),
            "{key} leaked to bank (its snoop subscription is not allowed)"
        );
    }
    assert!(bank.contains(&"/ferry/v1/subscriptions/bank/snoop".to_owned()));
}

#[test]
fn only_its_own_pod_record() {
    let s = scope(&mesh(), &caller("shop", "web-2"));
    let pods: Vec<&String> = s.pods.keys().collect();
    assert_eq!(pods, ["shop/web-2"]);
    let none = scope(&mesh(), &caller("shop", "unknown"));
    assert!(none.pods.is_empty());
}

#[test]
fn an_allowed_publisher_of_another_namespace_sees_the_topic_and_its_subscribers() {
    let mut table = mesh();
    if let Some(t) = table.topics.get_mut("bank/ledger") {
        t.allowed_publishers = Some(vec!["shop/web".into()]);
    }
    let k = keys(&scope(&table, &caller("shop", "web-1")));
    assert!(k.contains(&"/ferry/v1/topics/bank/ledger".to_owned()));
    assert!(k.contains(&"/ferry/v1/members/bank/tellers/teller-1".to_owned()));
    assert!(!k.contains(&"/ferry/v1/pods/bank/teller-1".to_owned()));
    // A bare name in the list is of the topic's own namespace: it grants shop nothing.
    if let Some(t) = table.topics.get_mut("bank/ledger") {
        t.allowed_publishers = Some(vec!["web".into()]);
    }
    let k = keys(&scope(&table, &caller("shop", "web-1")));
    assert!(k.iter().all(|key| !key.contains("/bank/")));
}
