//! The producer side of delivery: for every (topic, subscription) of a topic this sidecar
//! stores, one dispatcher task reads unsettled records from the store, chooses members,
//! sends deliveries (batched per peer, or in process to this sidecar's own consumer),
//! tracks acks, timeouts, nacks, redeliveries and dead letters, and records settlements in
//! the log so they survive a restart.
//!
//! - `dispatcher.rs`: the per-subscription task.
//! - `select.rs`: zone policy and balancing.
//! - `policy.rs`: backoff, filters and the dead-letter message.

pub mod dispatcher;
pub mod policy;
pub mod select;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use ferry_api::proto::v1::{DeliveryState, Settled};
use ferry_api::routing::{GroupEntry, MemberEntry, RoutingTable, SubscriptionEntry, TopicEntry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::log::Offset;

/// What a dispatcher reacts to besides its timers.
#[derive(Debug)]
pub enum Event {
    /// A consumer sidecar (at `from`, its peer address) settled a delivery.
    Settled { from: Arc<str>, settled: Settled },
    /// Deliveries that could not be written to the peer at `addr`.
    SendFailed {
        addr: Arc<str>,
        items: Vec<(Offset, u32)>,
        reason: String,
    },
    /// Answer (or failure) of a `QueryDelivery` after an ack timeout.
    Queried {
        addr: Arc<str>,
        offset: Offset,
        attempt: u32,
        state: Result<DeliveryState, String>,
    },
    /// The dead-letter publish of `offset`'s copy finished.
    DeadLettered {
        offset: Offset,
        copy: usize,
        result: Result<(), String>,
    },
    /// The routing table changed this subscription's setup.
    Setup(Arc<Setup>),
}

/// Everything a dispatcher needs from the routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub topic: TopicEntry,
    pub subscription: SubscriptionEntry,
    pub group: GroupEntry,
    /// Ready members of the group, by pod name.
    pub members: Vec<MemberEntry>,
    /// Whether the dead-letter topic (if any) is in the table.
    pub dead_letter_known: bool,
}

impl Setup {
    /// The setup of `subscription` from `table`, if it is complete.
    pub fn from_table(table: &RoutingTable, subscription: &str) -> Option<Self> {
        let r = crate::routing::resolve_subscription(table, subscription)?;
        Some(Self {
            topic: r.topic.clone(),
            subscription: r.subscription.clone(),
            group: r.group.clone(),
            members: table
                .ready_members(&r.subscription.group)
                .cloned()
                .collect(),
            dead_letter_known: r
                .subscription
                .dead_letter_topic
                .as_ref()
                .is_some_and(|t| table.topics.contains_key(t)),
        })
    }
}

/// Dispatchers by subscription name, for routing settlements that arrive from peers.
#[derive(Debug, Default)]
pub struct Registry {
    senders: RwLock<HashMap<Arc<str>, mpsc::UnboundedSender<Event>>>,
}

impl Registry {
    /// Sends `event` to the dispatcher of `subscription`; false if there is none.
    pub fn route(&self, subscription: &str, event: Event) -> bool {
        self.senders
            .read()
            .ok()
            .and_then(|m| m.get(subscription).map(|tx| tx.send(event).is_ok()))
            .unwrap_or(false)
    }

    /// Sends many events, taking the lock once.
    pub fn route_many(&self, events: Vec<(String, Event)>) {
        let Ok(m) = self.senders.read() else { return };
        for (sub, e) in events {
            if let Some(tx) = m.get(sub.as_str()) {
                let _ = tx.send(e);
            }
        }
    }
}

#[derive(Debug)]
struct Running {
    tx: mpsc::UnboundedSender<Event>,
    setup: Arc<Setup>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts, reconfigures and stops dispatchers as stores open and the table changes.
#[derive(Debug, Default)]
pub struct DeliveryManager {
    pub registry: Arc<Registry>,
    running: Mutex<HashMap<Arc<str>, Running>>,
}

impl DeliveryManager {
    /// Brings dispatchers in line with `table` for every open store.
    pub async fn reconcile(&self, engine: &Arc<Engine>, table: &RoutingTable) {
        let stores = engine.open_stores();
        let mut wanted: HashMap<Arc<str>, Arc<Setup>> = HashMap::new();
        for store in &stores {
            let mut subs: Vec<String> = table
                .subscriptions_of(&store.topic)
                .filter(|s| {
                    // Producer side of the allowedSubscriberNamespaces check (the consumer
                    // side is in `consumer`): no dispatcher, so nothing is sent across.
                    table
                        .topics
                        .get(&s.topic)
                        .is_some_and(|t| crate::routing::may_subscribe(t, &s.namespace))
                })
                .map(|s| ferry_api::routing::object_ref(&s.namespace, &s.name))
                .collect();
            subs.sort();
            store.set_subscriptions(subs.clone());
            for sub in subs {
                if let Some(setup) = Setup::from_table(table, &sub) {
                    wanted.insert(sub.into(), Arc::new(setup));
                }
            }
        }
        let mut stopped = Vec::new();
        {
            let Ok(mut running) = self.running.lock() else {
                return;
            };
            let gone: Vec<Arc<str>> = running
                .keys()
                .filter(|k| !wanted.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                if let Some(r) = running.remove(&k) {
                    r.cancel.cancel();
                    stopped.push(r.task);
                }
            }
            if let Ok(mut senders) = self.registry.senders.write() {
                senders.retain(|k, _| wanted.contains_key(k));
            }
            for (sub, setup) in wanted {
                if let Some(r) = running.get_mut(&sub) {
                    if r.setup != setup {
                        r.setup = setup.clone();
                        let _ = r.tx.send(Event::Setup(setup));
                    }
                    continue;
                }
                let Some(store) = stores.iter().find(|s| s.topic == setup.subscription.topic)
                else {
                    continue;
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let cancel = engine.stop.child_token();
                let task = tokio::spawn(dispatcher::run(
                    engine.clone(),
                    store.clone(),
                    setup.clone(),
                    tx.clone(),
                    rx,
                    cancel.clone(),
                ));
                if let Ok(mut senders) = self.registry.senders.write() {
                    senders.insert(sub.clone(), tx.clone());
                }
                running.insert(
                    sub,
                    Running {
                        tx,
                        setup,
                        cancel,
                        task,
                    },
                );
            }
        }
        for t in stopped {
            let _ = t.await;
        }
    }

    /// Subscriptions with a running dispatcher.
    pub fn running(&self) -> BTreeSet<String> {
        self.running
            .lock()
            .map(|r| r.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// Stops every dispatcher and waits for them.
    pub async fn stop_all(&self) {
        let tasks: Vec<Running> = match self.running.lock() {
            Ok(mut r) => r.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        for r in &tasks {
            r.cancel.cancel();
        }
        for r in tasks {
            let _ = r.task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::{group, member, subscription, topic};

    #[test]
    fn setup_resolves_members_and_dead_letter_topic() {
        let mut t = RoutingTable::default();
        t.topics.insert("ns/t".into(), topic("ns", "t"));
        t.groups.insert("ns/g".into(), group("ns", "g"));
        let mut s = subscription("ns", "s", "t", "g");
        s.dead_letter_topic = Some("ns/dlq".into());
        t.subscriptions.insert("ns/s".into(), s);
        let mut down = member("ns", "g", "p2", "z", "10.0.0.2:7710");
        down.ready = false;
        t.members.insert(
            "ns/g".into(),
            [
                (
                    "p1".to_string(),
                    member("ns", "g", "p1", "z", "10.0.0.1:7710"),
                ),
                ("p2".to_string(), down),
            ]
            .into(),
        );
        let setup = Setup::from_table(&t, "ns/s").unwrap();
        assert_eq!(setup.members.len(), 1, "only ready members");
        assert!(!setup.dead_letter_known);
        t.topics.insert("ns/dlq".into(), topic("ns", "dlq"));
        assert!(Setup::from_table(&t, "ns/s").unwrap().dead_letter_known);
        assert!(Setup::from_table(&t, "ns/missing").is_none());
    }
}
