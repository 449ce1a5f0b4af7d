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
