#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::*;
use crate::crd::{Delivery, Durability, ZonePolicy};

fn manifests(yaml: &str) -> Manifests {
    let mut m = Manifests::default();
    m.add_str(Path::new("test.yaml"), yaml)
        .expect("test YAML parses");
    m
}

const QUICKSTART: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: orders}
spec: {durability: Disk}
---
apiVersion: ferry.dev/v1alpha1
kind: ConsumerGroup
metadata: {name: billing}
spec:
  selector: {matchLabels: {app: billing}}
  delivery: Unicast
---
apiVersion: ferry.dev/v1alpha1
kind: ConsumerGroup
metadata: {name: cache}
spec:
  selector:
    matchExpressions:
      - {key: app, operator: In, values: [cache, edge]}
      - {key: legacy, operator: DoesNotExist}
  delivery: Broadcast
  zonePolicy: SameZoneOnly
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: billing-orders}
spec: {topic: orders, group: billing}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: cache-orders}
spec: {topic: orders, group: cache, ackWait: 5s}
"#;

fn address(pod: &LocalPod) -> String {
    format!("{}:7710", pod.name)
}

#[test]
fn default_pods_two_per_group_plus_producer() {
    let m = manifests(QUICKSTART);
    let pods = default_pods(&m);
    let names: Vec<_> = pods
        .iter()
        .map(|p| (p.name.as_str(), p.zone.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("billing-a", "zone-a"),
            ("billing-b", "zone-b"),
            ("cache-a", "zone-a"),
            ("cache-b", "zone-b"),
            ("producer", "zone-a"),
        ]
    );
    for pod in &pods {
        assert_eq!(pod.namespace, "default");
        assert!(pod.ready);
    }
    assert_eq!(pods[2].labels.get("app").map(String::as_str), Some("cache"));
    assert!(!pods[2].labels.contains_key("legacy"));
}

#[test]
fn default_table_has_every_entry_and_member() {
    let m = manifests(QUICKSTART);
    let pods = default_pods(&m);
    let (table, problems) = build_table(&m, &pods, address, 7);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(table.revision, 7);
    assert_eq!(table.topics["default/orders"].durability, Durability::Disk);
    assert_eq!(table.groups["default/cache"].delivery, Delivery::Broadcast);
    assert_eq!(
        table.groups["default/cache"].zone_policy,
        ZonePolicy::SameZoneOnly
    );
    assert_eq!(
        table.subscriptions["default/cache-orders"].ack_wait_ms,
        5000
    );
    assert_eq!(table.subscriptions_of("default/orders").count(), 2);
    let billing: Vec<_> = table
        .ready_members("default/billing")
        .map(|m| (m.pod.as_str(), m.zone.as_str()))
        .collect();
    assert_eq!(billing, [("billing-a", "zone-a"), ("billing-b", "zone-b")]);
    let member = &table.members["default/billing"]["billing-a"];
    assert_eq!(member.address, "billing-a:7710");
    assert_eq!(member.node, "zone-a-node");
    assert_eq!(member.group, "billing");
    // The producer belongs to no group.
    assert!(
        table
            .members
            .values()
            .all(|m| !m.contains_key(PRODUCER_POD))
    );
    // The table survives the JSON round trip a routing file makes.
    let json = serde_json::to_string(&table).expect("serializes");
    let back: RoutingTable = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, table);
}

#[test]
fn missing_references_are_problems_not_failures() {
    let yaml = format!(
        "{QUICKSTART}\n---\n{}",
        r#"
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: no-topic}
spec: {topic: nothing, group: billing}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: no-group}
spec: {topic: orders, group: nobody}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: no-dlq}
spec: {topic: orders, group: billing, deadLetterTopic: orders-dlq}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: other-ns, namespace: team-b}
spec: {topic: default/orders, group: billing}
"#
    );
    let m = manifests(&yaml);
    let (table, problems) = build_table(&m, &default_pods(&m), address, 1);
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|p| p.contains(needle));
    assert!(
        has("Subscription default/no-topic: spec.topic: topic default/nothing not found"),
        "{text:#?}"
    );
    assert!(
        has("Subscription default/no-group: spec.group: group default/nobody not found"),
        "{text:#?}"
    );
    assert!(
        has(
            "Subscription default/no-dlq: spec.deadLetterTopic: topic default/orders-dlq not found"
        ),
        "{text:#?}"
    );
    assert!(
        has(
            "Subscription team-b/other-ns: spec.topic: topic default/orders does not list namespace team-b"
        ),
        "{text:#?}"
    );
    assert!(!table.subscriptions.contains_key("default/no-topic"));
    assert!(!table.subscriptions.contains_key("default/no-group"));
    assert!(!table.subscriptions.contains_key("team-b/other-ns"));
    // A missing dead-letter topic is a warning: the subscription still delivers.
    assert!(table.subscriptions.contains_key("default/no-dlq"));
    assert!(table.subscriptions.contains_key("default/billing-orders"));
}

#[test]
fn cross_namespace_subscription_allowed_when_listed() {
    let yaml = r#"
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: events, namespace: shop}
spec: {allowedSubscriberNamespaces: [analytics]}
---
apiVersion: ferry.dev/v1alpha1
kind: ConsumerGroup
metadata: {name: etl, namespace: analytics}
spec: {selector: {matchLabels: {app: etl}}}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata: {name: etl-events, namespace: analytics}
spec: {topic: shop/events, group: etl}
"#;
    let m = manifests(yaml);
    let pods = default_pods(&m);
    // A producer in each namespace that has resources.
    assert!(pods.iter().any(|p| p.id() == "shop/producer"));
    assert!(pods.iter().any(|p| p.id() == "analytics/producer"));
    let (table, problems) = build_table(&m, &pods, address, 1);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        table.subscriptions["analytics/etl-events"].topic,
        "shop/events"
    );
    assert_eq!(
        table.subscriptions["analytics/etl-events"].group,
        "analytics/etl"
    );
}

#[test]
fn membership_uses_namespace_readiness_and_selector() {
    let m = manifests(QUICKSTART);
    let pods = parse_pods(
        Path::new("pods.yaml"),
        r#"
- {name: b1, zone: zone-a, labels: {app: billing}}
- {name: b2, zone: zone-b, labels: {app: billing}, ready: false}
- {name: b3, namespace: other, zone: zone-a, labels: {app: billing}}
- {name: c1, zone: zone-b, node: n7, labels: {app: edge}}
- {name: c2, zone: zone-b, labels: {app: edge, legacy: "yes"}}
- {name: p, zone: zone-a}
"#,
    )
    .expect("pods parse");
    let (table, problems) = build_table(&m, &pods, address, 1);
    assert!(problems.is_empty(), "{problems:?}");
    let billing: Vec<_> = table.members["default/billing"].keys().cloned().collect();
    assert_eq!(billing, ["b1"]);
    let cache: Vec<_> = table.members["default/cache"].keys().cloned().collect();
    assert_eq!(cache, ["c1"]);
    assert_eq!(table.members["default/cache"]["c1"].node, "n7");
}

#[test]
fn group_without_members_and_bad_selector_are_reported() {
    let yaml = format!(
        "{QUICKSTART}\n---\n{}",
        r#"
apiVersion: ferry.dev/v1alpha1
kind: ConsumerGroup
metadata: {name: weird}
spec:
  selector:
    matchExpressions: [{key: app, operator: Gt, values: ["1"]}]
"#
    );
    let m = manifests(&yaml);
    let pods = parse_pods(Path::new("p"), "- {name: p, zone: zone-a}\n").expect("parses");
    let (table, problems) = build_table(&m, &pods, address, 1);
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|p| p.contains("ConsumerGroup default/weird: spec.selector: matchExpressions[0]")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|p| p.contains("ConsumerGroup default/billing: no Ready pod matches")),
        "{text:#?}"
    );
    // The group is still known (its subscriptions wait), it just has no members.
    assert!(table.groups.contains_key("default/billing"));
    assert!(!table.members.contains_key("default/billing"));
}

#[test]
fn invalid_entries_and_duplicates_are_reported() {
    let yaml = r#"
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: t}
spec: {dedupWindow: "forever"}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: ok}
spec: {}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: ok}
spec: {}
"#;
    let m = manifests(yaml);
    let pods = parse_pods(
        Path::new("p"),
        "- {name: p, zone: zone-a}\n- {name: p, zone: zone-b}\n",
    )
    .expect("parses");
    let (table, problems) = build_table(&m, &pods, address, 1);
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|p| p.starts_with("Topic default/t: spec.dedupWindow")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|p| p == "Topic default/ok: defined more than once; the last one counts"),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|p| p.starts_with("Pod default/p: listed more than once")),
        "{text:#?}"
    );
    assert_eq!(table.topics.keys().collect::<Vec<_>>(), ["default/ok"]);
}

#[test]
fn pods_file_round_trips_and_rejects_unknown_fields() {
    let m = manifests(QUICKSTART);
    let pods = default_pods(&m);
    let yaml = pods_to_yaml(&pods).expect("serializes");
    assert_eq!(parse_pods(Path::new("p"), &yaml).expect("parses"), pods);
    assert!(
        parse_pods(Path::new("p"), "")
            .expect("empty is no pods")
            .is_empty()
    );
    let err = parse_pods(Path::new("p"), "- {name: x, zone: a, color: red}\n").unwrap_err();
    assert!(err.to_string().contains("color"), "{err}");
}

#[test]
fn load_pods_prefers_the_file() {
    let dir = std::env::temp_dir().join(format!("ferry-local-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let m = manifests(QUICKSTART);
    let (pods, source) = load_pods(&dir, &m).expect("default");
    assert_eq!(source, PodsSource::Default);
    assert_eq!(pods.len(), 5);
    std::fs::write(dir.join(PODS_FILE), "- {name: only, zone: zone-b}\n").expect("write");
    let (pods, source) = load_pods(&dir, &m).expect("file");
    assert_eq!(source, PodsSource::File(dir.join(PODS_FILE)));
    assert_eq!(pods.len(), 1);
    // The manifest reader skips the pods file rather than failing on it.
    let read = Manifests::read_dir(&dir).expect("reads");
    assert!(read.topics.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
