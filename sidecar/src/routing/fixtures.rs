//! Routing entries with the CRDs' defaults, in one line each: what unit tests, the
//! integration tests and benchmarks build tables from. Callers change the fields their
//! case is about.

use std::collections::BTreeMap;

use ferry_api::crd::{Balancing, Delivery, Durability, Ordering, Qos, ZonePolicy};
use ferry_api::routing::*;

/// A topic entry with test defaults.
pub fn topic(ns: &str, name: &str) -> TopicEntry {
    TopicEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        name: name.into(),
        durability: Durability::Memory,
        replicas: 1,
        ordering: Ordering::None,
        retention_max_age_ms: 3_600_000,
        retention_max_bytes: 1 << 30,
        max_message_bytes: 1 << 20,
        dedup_window_ms: 60_000,
        allowed_publishers: None,
        allowed_subscriber_namespaces: vec![],
    }
}

/// A group entry with test defaults.
pub fn group(ns: &str, name: &str) -> GroupEntry {
    GroupEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        name: name.into(),
        delivery: Delivery::Unicast,
        zone_policy: ZonePolicy::PreferSameZone,
        balancing: Balancing::RoundRobin,
    }
}

/// A subscription entry with test defaults.
pub fn subscription(ns: &str, name: &str, topic: &str, group: &str) -> SubscriptionEntry {
    SubscriptionEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        name: name.into(),
        topic: object_ref(ns, topic),
        group: object_ref(ns, group),
        qos: Qos::AtLeastOnce,
        ack_wait_ms: 30_000,
        max_deliveries: 5,
        backoff_initial_ms: 100,
        backoff_max_ms: 10_000,
        backoff_multiplier: 2.0,
        dead_letter_topic: None,
        max_in_flight: 100,
        filter_key_prefix: None,
        filter_headers: BTreeMap::new(),
    }
}

/// A ready member.
pub fn member(ns: &str, group: &str, pod: &str, zone: &str, address: &str) -> MemberEntry {
    MemberEntry {
        schema_version: SCHEMA_VERSION,
        namespace: ns.into(),
        group: group.into(),
        pod: pod.into(),
        address: address.into(),
        zone: zone.into(),
        node: format!("node-{pod}"),
        ready: true,
        service_account: String::new(),
    }
}
