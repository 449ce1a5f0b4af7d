//! What the scenarios share: the history checker fed from the apps' files, and labels.

use std::collections::BTreeMap;

use ferry_kind_tests::app_events::AppEvent;
use ferry_sidecar_tests::history::{Counts, Delivered, Expect, History};

/// Replays the apps' events into the history checker: every publish first (file order
/// keeps each producer's publish order), then every delivery.
pub fn history(events: &[AppEvent]) -> History {
    let h = History::default();
    for event in events {
        match event {
            AppEvent::Attempt {
                producer,
                topic,
                id,
                key,
            } => h.publish_attempt(producer, topic, id, key.as_deref()),
            AppEvent::Acked { id } => h.publish_acked(id),
            _ => {}
        }
    }
    for event in events {
        match event {
            AppEvent::Delivered {
                group,
                member,
                id,
                attempt,
                key_sequence,
                headers,
            } => h.delivered(Delivered {
                group: group.clone(),
                member: member.clone(),
                message_id: id.clone(),
                attempt: *attempt,
                key_sequence: *key_sequence,
                headers: headers.clone(),
            }),
            AppEvent::ConsumerAcked { group, member, id } => h.consumer_acked(group, member, id),
            _ => {}
        }
    }
    h
}

/// Checks and prints the counts of a scenario.
pub fn counts(scenario: &str, events: &[AppEvent], expect: &[Expect]) -> Counts {
    let counts = history(events).check(expect);
    println!("{scenario}: {counts}");
    counts
}

/// A unicast group's expectation.
pub fn any_member(group: &str, topic: &str, check_order: bool) -> Expect {
    Expect::AnyMember {
        group: group.into(),
        topic: topic.into(),
        check_order,
    }
}

/// Labels from `(key, value)` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Ids delivered to `member` of `group`, in arrival order, repeats included.
pub fn delivered(events: &[AppEvent], group: &str, member: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AppEvent::Delivered {
                group: g,
                member: m,
                id,
                ..
            } if g == group && m == member => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// Ids delivered to any member of `group` (first deliveries only, sorted).
pub fn delivered_to_group(events: &[AppEvent], group: &str) -> std::collections::BTreeSet<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AppEvent::Delivered { group: g, id, .. } if g == group => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// The YAML of a Topic, with `spec` given as JSON.
pub fn topic_yaml(name: &str, spec: serde_json::Value) -> String {
    object_yaml("Topic", name, spec)
}

/// The YAML of a Unicast ConsumerGroup of pods labelled `app: <app>`.
pub fn group_yaml(name: &str, app: &str, zone_policy: &str) -> String {
    object_yaml(
        "ConsumerGroup",
        name,
        serde_json::json!({
            "selector": {"matchLabels": {"app": app}},
            "delivery": "Unicast",
            "zonePolicy": zone_policy,
        }),
    )
}

/// The YAML of a Subscription `<group>-<topic>` with `ackWait` of 5 s (so that
/// redeliveries come soon enough for a short test).
pub fn subscription_yaml(topic: &str, group: &str) -> String {
    object_yaml(
        "Subscription",
        &format!("{group}-{topic}"),
        serde_json::json!({"topic": topic, "group": group, "ackWait": "5s"}),
    )
}

fn object_yaml(kind: &str, name: &str, spec: serde_json::Value) -> String {
    // JSON is YAML.
    let object = serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    });
    format!("---\n{object}\n")
}
