//! The history checker: records every publish attempt, publish ack, delivery and consumer
//! ack of a test run, then counts what went wrong (docs/reliability.md's shared pass criteria).
//!
//! - **lost**: a message whose publish was acked but that some expected receiver never got
//!   (a Unicast group: no member got it; a Broadcast group: one member did not).
//! - **duplicated**: deliveries beyond the first of a message to the same receiver.
//! - **unexpected**: deliveries of a message id nobody tried to publish.
//! - **reordered**: on checked groups, a delivery of a key whose publish position is lower
//!   than one already delivered for that key and producer (first deliveries only, so a
//!   redelivery is counted as a duplicate, not as disorder).
//!
//! Publish order per key is the order of [`History::publish_attempt`] calls, so a test that
//! checks order must publish each key's messages one after the other from one producer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// A message as the publisher knows it.
#[derive(Debug, Clone, Default)]
struct Published {
    topic: String,
    key: Option<String>,
    producer: String,
    /// Position among the messages of the same (producer, topic, key), from 1.
    position: u64,
    acked: bool,
}

/// One delivery as the consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub group: String,
    pub member: String,
    pub message_id: String,
    pub attempt: u32,
    pub key_sequence: u64,
    pub headers: BTreeMap<String, String>,
}

impl Delivered {
    /// What a consuming app of `group`, member `member`, saw in `d`.
    pub fn of(group: &str, member: &str, d: &ferry_api::proto::v1::Delivery) -> Self {
        Self {
            group: group.to_owned(),
            member: member.to_owned(),
            message_id: d.message_id.clone(),
            attempt: d.attempt,
            key_sequence: d.key_sequence,
            headers: d
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Who must receive every acked message of `topic` (`namespace/name`).
#[derive(Debug, Clone)]
pub enum Expect {
    /// Unicast: at least one member of the group; more than one delivery is a duplicate.
    AnyMember {
        group: String,
        topic: String,
        check_order: bool,
    },
    /// Broadcast: every listed member.
    EveryMember {
        group: String,
        topic: String,
        members: Vec<String>,
    },
}

/// What a run got wrong, and how much it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub attempted: u64,
    pub acked: u64,
    pub deliveries: u64,
    pub consumer_acks: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub reordered: u64,
    /// Duplicates that arrived as a first attempt (`attempt == 1`), so no redelivery
    /// explains them.
    pub unexplained_duplicates: u64,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempted={} acked={} deliveries={} consumer_acks={} lost={} duplicated={} (unexplained {}) unexpected={} reordered={}",
            self.attempted,
            self.acked,
            self.deliveries,
            self.consumer_acks,
            self.lost,
            self.duplicated,
            self.unexplained_duplicates,
            self.unexpected,
            self.reordered
        )
    }
}

/// The recorded history; clone it into every task (it is shared).
#[derive(Debug, Clone, Default)]
pub struct History(Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    published: BTreeMap<String, Published>,
    positions: BTreeMap<(String, String, Option<String>), u64>,
    deliveries: Vec<Delivered>,
    consumer_acks: Vec<(String, String, String)>,
}

impl History {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A publish is about to be sent.
    pub fn publish_attempt(
        &self,
        producer: &str,
        topic: &str,
        message_id: &str,
        key: Option<&str>,
    ) {
        let mut h = self.lock();
        if h.published.contains_key(message_id) {
            return;
        }
        let position = h
            .positions
            .entry((
                producer.to_owned(),
                topic.to_owned(),
                key.map(str::to_owned),
            ))
            .or_default();
        *position += 1;
        let position = *position;
        h.published
            .entry(message_id.to_owned())
            .or_insert(Published {
                topic: topic.to_owned(),
                key: key.map(str::to_owned),
                producer: producer.to_owned(),
                position,
                acked: false,
            });
    }

    /// The sidecar acked a publish: from now on the message must not be lost.
    pub fn publish_acked(&self, message_id: &str) {
        if let Some(p) = self.lock().published.get_mut(message_id) {
            p.acked = true;
        }
    }

    /// A consumer received a delivery.
    pub fn delivered(&self, delivery: Delivered) {
        self.lock().deliveries.push(delivery);
    }

    /// A consumer's ack of a delivery was accepted.
    pub fn consumer_acked(&self, group: &str, member: &str, message_id: &str) {
        self.lock()
            .consumer_acks
            .push((group.into(), member.into(), message_id.into()));
    }

    /// Every delivery so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivered> {
        self.lock().deliveries.clone()
    }

    /// Deliveries to one group.
    pub fn deliveries_to(&self, group: &str) -> Vec<Delivered> {
        self.lock()
            .deliveries
            .iter()
            .filter(|d| d.group == group)
            .cloned()
            .collect()
    }

    /// Ids of every publish attempted so far (acked or not).
    pub fn attempted_ids(&self) -> BTreeSet<String> {
        self.lock().published.keys().cloned().collect()
    }

    /// Deliveries of a message to `group` after its first one there, in arrival order:
    /// the duplicates, each with the attempt number the sidecar gave it.
    pub fn repeats_to(&self, group: &str) -> Vec<Delivered> {
        let h = self.lock();
        let mut seen = BTreeSet::new();
        h.deliveries
            .iter()
            .filter(|d| d.group == group && !seen.insert(d.message_id.as_str()))
            .cloned()
            .collect()
    }

    /// Ids of acked publishes.
    pub fn acked_ids(&self) -> BTreeSet<String> {
        self.lock()
            .published
            .iter()
            .filter(|(_, p)| p.acked)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Counts everything that went wrong against `expect`.
    pub fn check(&self, expect: &[Expect]) -> Counts {
        let h = self.lock();
        let mut c = Counts {
            attempted: h.published.len() as u64,
            acked: h.published.values().filter(|p| p.acked).count() as u64,
            deliveries: h.deliveries.len() as u64,
            consumer_acks: h.consumer_acks.len() as u64,
            ..Counts::default()
        };
        c.unexpected = h
            .deliveries
            .iter()
            .filter(|d| !h.published.contains_key(&d.message_id))
            .count() as u64;
        let mut first_attempts: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
        for d in h.deliveries.iter().filter(|d| d.attempt <= 1) {
            *first_attempts
                .entry((&d.group, &d.member, &d.message_id))
                .or_default() += 1;
        }
        c.unexplained_duplicates = first_attempts.values().map(|n| n.saturating_sub(1)).sum();
        for e in expect {
            match e {
                Expect::AnyMember {
                    group,
                    topic,
                    check_order,
                } => {
                    let got = receivers(&h.deliveries, |d| d.group == *group);
                    c.lost += lost(&h.published, topic, &got);
                    c.duplicated += duplicates(&got);
                    if *check_order {
                        c.reordered += reordered(
                            &h.published,
                            h.deliveries.iter().filter(|d| d.group == *group),
                        );
                    }
                }
                Expect::EveryMember {
                    group,
                    topic,
                    members,
                } => {
                    for member in members {
                        let got =
                            receivers(&h.deliveries, |d| d.group == *group && d.member == *member);
                        c.lost += lost(&h.published, topic, &got);
                        c.duplicated += duplicates(&got);
                    }
                }
            }
        }
        c
    }
}

/// Deliveries per message id among those that pass `filter`.
fn receivers(deliveries: &[Delivered], filter: impl Fn(&Delivered) -> bool) -> BTreeMap<&str, u64> {
    let mut got = BTreeMap::new();
    for d in deliveries.iter().filter(|d| filter(d)) {
        *got.entry(d.message_id.as_str()).or_default() += 1;
    }
    got
}

fn lost(published: &BTreeMap<String, Published>, topic: &str, got: &BTreeMap<&str, u64>) -> u64 {
    published
        .iter()
        .filter(|(id, p)| p.acked && p.topic == topic && !got.contains_key(id.as_str()))
        .count() as u64
}

fn duplicates(got: &BTreeMap<&str, u64>) -> u64 {
    got.values().map(|n| n.saturating_sub(1)).sum()
}

fn reordered<'a>(
    published: &BTreeMap<String, Published>,
    deliveries: impl Iterator<Item = &'a Delivered>,
) -> u64 {
    let mut highest: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut count = 0;
    for d in deliveries {
        let Some(p) = published.get(&d.message_id) else {
            continue;
        };
        let Some(key) = p.key.as_deref() else {
            continue;
        };
        if !seen.insert(d.message_id.as_str()) {
            continue;
        }
        let top = highest.entry((p.producer.as_str(), key)).or_default();
        if p.position < *top {
            count += 1;
        } else {
            *top = p.position;
        }
    }
    count
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn delivery(group: &str, member: &str, id: &str) -> Delivered {
        Delivered {
            group: group.into(),
            member: member.into(),
            message_id: id.into(),
            attempt: 1,
            key_sequence: 0,
            headers: BTreeMap::new(),
        }
    }

    #[test]
    fn counts_lost_duplicated_unexpected_and_reordered() {
        let h = History::default();
        for (id, key) in [("m1", "k"), ("m2", "k"), ("m3", "k"), ("m4", "j")] {
            h.publish_attempt("p", "t", id, Some(key));
            h.publish_acked(id);
        }
        h.publish_attempt("p", "t", "never-acked", None);
        // Unicast group: m2 before m1 (reorder), m3 twice (dup), m4 missing (lost).
        for id in ["m2", "m1", "m3", "m3", "ghost"] {
            h.delivered(delivery("u", "a", id));
        }
        // Broadcast group: member b misses m4.
        for id in ["m1", "m2", "m3", "m4"] {
            h.delivered(delivery("b", "x", id));
        }
        for id in ["m1", "m2", "m3"] {
            h.delivered(delivery("b", "y", id));
        }
        let c = h.check(&[
            Expect::AnyMember {
                group: "u".into(),
                topic: "t".into(),
                check_order: true,
            },
            Expect::EveryMember {
                group: "b".into(),
                topic: "t".into(),
                members: vec!["x".into(), "y".into()],
            },
        ]);
        assert_eq!(
            (
                c.attempted,
                c.acked,
                c.lost,
                c.duplicated,
                c.unexpected,
                c.reordered
            ),
            (5, 4, 2, 1, 1, 1),
            "{c}"
        );
    }

    #[test]
    fn a_clean_run_counts_nothing() {
        let h = History::default();
        for i in 0..10 {
            let id = format!("m{i}");
            h.publish_attempt("p", "t", &id, Some("k"));
            h.publish_acked(&id);
            h.delivered(delivery("u", if i % 2 == 0 { "a" } else { "b" }, &id));
            h.consumer_acked("u", "a", &id);
        }
        let c = h.check(&[Expect::AnyMember {
            group: "u".into(),
            topic: "t".into(),
            check_order: true,
        }]);
        // Messages of another topic are not expected by this group.
        h.publish_attempt("p", "other", "o1", None);
        h.publish_acked("o1");
        assert_eq!(
            h.check(&[Expect::AnyMember {
                group: "u".into(),
                topic: "t".into(),
                check_order: false
            }])
            .lost,
            0
        );
        assert_eq!(
            (
                c.lost,
                c.duplicated,
                c.unexpected,
                c.reordered,
                c.consumer_acks
            ),
            (0, 0, 0, 0, 10),
            "{c}"
        );
    }
}
