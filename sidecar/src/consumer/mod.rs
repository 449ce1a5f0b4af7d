//! The consuming side of a sidecar: deliveries that producers (remote sidecars over the
//! peer API, or this sidecar's own dispatchers in process) hand to this pod's app, the app's
//! consume sessions with credits, and acks and nacks by delivery id.
//!
//! - `inbox.rs`: one subscription's state (queue, handed-out deliveries, sessions).
//! - `held.rs`: what the inbox keeps per delivery, including ExactlyOnce twins (copies of
//!   a held message from another origin, answered by the same settlement).
//! - `ids.rs`: delivery ids.
//! - `session.rs`: an app's consume session (credit in, deliveries out, returns on close).
//! - `acked.rs`: acked (producer, offset) pairs remembered, so that a producer repeating a
//!   delivery (after a restart or a lost ack) gets ACKED back, not a second copy to the app.
//! - `acked_journal.rs`: ExactlyOnce acked ids on disk, fsynced before the upstream ack, so
//!   that they survive `kill -9` of this sidecar.
//!
//! One lock per subscription, taken once per arriving batch and once per ack; settlements
//! go back to producers through the channel of their current `Forward` stream (or a
//! callback for in-process delivery), never while the lock is held.

pub mod acked;
pub mod acked_ids;
pub mod acked_journal;
mod held;
pub mod ids;
pub mod inbox;

/// The answer to a delivery this sidecar refuses (not a member, unknown subscription, not
/// authorized): `REJECTED` with the reason, naming the message as every settlement does, so
/// that the producer retries it elsewhere.
pub fn rejected(d: Deliver, reason: String) -> Settled {
    Settled {
        offset: d.offset,
        attempt: d.attempt,
        outcome: Outcome::Rejected as i32,
        delay_ms: 0,
        reason,
        message_id: d.message.map(|m| m.id).unwrap_or_default(),
        incarnation: d.incarnation,
        subscription: d.subscription,
    }
}

#[cfg(test)]
mod namespace_tests;
mod session;

pub use session::Session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_api::crd::Qos;
use ferry_api::proto::v1::{
    Deliver, Delivery, DeliveryState, Outcome, QueryDeliveryRequest, Settled,
};
use ferry_api::routing::RoutingTable;
use tokio::sync::{mpsc, watch};

use self::acked_journal::AckedJournal;
use self::ids::DeliveryIds;
use self::inbox::{Arrival, InboxState, Reply};
use crate::error::Error;
use crate::metrics::Metrics;

/// Where a settlement of a delivery goes.
#[derive(Clone)]
pub enum ReplyTo {
    /// A remote producer sidecar, by its identity (`namespace/pod`); sent on its current
    /// `Forward` stream.
    Remote(Arc<str>),
    /// A dispatcher of this sidecar (in-process delivery).
    Local(Arc<dyn Fn(Settled) + Send + Sync>),
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyTo::Remote(p) => write!(f, "Remote({p})"),
            ReplyTo::Local(_) => write!(f, "Local"),
        }
    }
}

/// A delivery arriving from a producer.
#[derive(Debug)]
pub struct Incoming {
    pub reply: ReplyTo,
    pub deliver: Deliver,
}

/// One subscription's inbox.
#[derive(Debug)]
pub struct Inbox {
    index: u32,
    pub subscription: Arc<str>,
    pub topic: String,
    state: Mutex<InboxState>,
    /// ExactlyOnce with a data dir: the acked ids on disk. Its own lock, so that the fsync
    /// of one ack does not hold up deliveries.
    acked_journal: Mutex<Option<AckedJournal>>,
}

#[derive(Debug, Default)]
struct Inboxes {
    by_name: HashMap<Arc<str>, Arc<Inbox>>,
    by_index: Vec<Arc<Inbox>>,
}

/// The consuming side of this sidecar.
#[derive(Debug)]
pub struct Consumer {
    pod: String,
    ids: DeliveryIds,
    inboxes: RwLock<Inboxes>,
    producers: RwLock<HashMap<Arc<str>, mpsc::UnboundedSender<Settled>>>,
    routing: watch::Receiver<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    next_session: AtomicU64,
    /// Where ExactlyOnce acked ids are kept; `None` keeps them in memory only.
    data_dir: Option<PathBuf>,
    /// Most ExactlyOnce acked ids remembered per subscription (`--dedup-max-ids`).
    acked_ids_max: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding an inbox lock leaves consistent-enough state (every method
    // finishes its bookkeeping before sending); keep serving rather than cascade.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Consumer {
    /// The consumer of pod `pod` following `routing`.
    pub fn new(
        pod: String,
        routing: watch::Receiver<Arc<RoutingTable>>,
        metrics: Arc<Metrics>,
        data_dir: Option<PathBuf>,
        acked_ids_max: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            data_dir,
            acked_ids_max,
            pod,
            ids: DeliveryIds::new(),
            inboxes: RwLock::new(Inboxes::default()),
            producers: RwLock::new(HashMap::new()),
            routing,
            metrics,
            next_session: AtomicU64::new(1),
        })
    }

    fn inbox(&self, subscription: &str, table: &RoutingTable) -> Result<Arc<Inbox>, Error> {
        let resolved = crate::routing::resolve_subscription(table, subscription)
            .ok_or_else(|| Error::UnknownSubscription(subscription.to_owned()))?;
        if !crate::routing::may_subscribe(resolved.topic, &resolved.subscription.namespace) {
            return Err(Error::PermissionDenied(format!(
                "subscription {subscription} may not receive topic {}: namespace {} is not in its allowedSubscriberNamespaces",
                resolved.subscription.topic, resolved.subscription.namespace
            )));
        }
        let window = (resolved.subscription.qos == Qos::ExactlyOnce)
            .then(|| Duration::from_millis(resolved.topic.dedup_window_ms.max(1)));
        if let Some(inbox) = self
            .inboxes
            .read()
            .ok()
            .and_then(|i| i.by_name.get(subscription).cloned())
        {
            {
                let mut state = lock(&inbox.state);
                state.exactly_once_window = window;
                self.limit_acked_ids(&mut state, &inbox.topic, window);
            }
            self.open_acked_journal(&inbox, window);
            return Ok(inbox);
        }
        let mut all = self
            .inboxes
            .write()
            .map_err(|_| Error::Internal("inbox table poisoned".into()))?;
        if let Some(inbox) = all.by_name.get(subscription) {
            return Ok(inbox.clone());
        }
        let name: Arc<str> = subscription.into();
        let mut state = InboxState::new(name.clone());
        state.exactly_once_window = window;
        self.limit_acked_ids(&mut state, &resolved.subscription.topic, window);
        let inbox = Arc::new(Inbox {
            index: u32::try_from(all.by_index.len())
                .map_err(|_| Error::Internal("too many inboxes".into()))?,
            subscription: name.clone(),
            topic: resolved.subscription.topic.clone(),
            state: Mutex::new(state),
            acked_journal: Mutex::new(None),
        });
        all.by_index.push(inbox.clone());
        all.by_name.insert(name, inbox.clone());
        drop(all);
        self.open_acked_journal(&inbox, window);
        Ok(inbox)
    }

    /// ExactlyOnce: bounds the inbox's acked ids, with their metrics.
    fn limit_acked_ids(&self, state: &mut InboxState, topic: &str, window: Option<Duration>) {
        if window.is_none() {
            return;
        }
        let labels = Metrics::sub(topic, state.subscription());
        state.limit_acked_ids(
            self.acked_ids_max,
            self.metrics.exactly_once_ids.get_or_create(&labels).clone(),
            self.metrics
                .exactly_once_evicted
                .get_or_create(&labels)
                .clone(),
        );
    }

    /// ExactlyOnce: opens the inbox's acked-id journal once and re-seeds the inbox from it.
    fn open_acked_journal(&self, inbox: &Inbox, window: Option<Duration>) {
        let (Some(window), Some(data_dir)) = (window, &self.data_dir) else {
            return;
        };
        let mut journal = lock(&inbox.acked_journal);
        if journal.is_some() {
            return;
        }
        match AckedJournal::open(data_dir, &inbox.subscription, window, self.acked_ids_max) {
            Ok((j, ids)) => {
                lock(&inbox.state).seed_acked(ids);
                *journal = Some(j);
            }
            Err(e) => tracing::error!(subscription = %inbox.subscription, error = %e,
                "cannot open the ExactlyOnce acked-id journal; acked ids are kept in memory only"),
        }
    }

    /// Makes an ExactlyOnce ack durable before it goes upstream. A failure is logged and
    /// the ack still sent: the id stays remembered in memory, and only a restart of this
    /// sidecar could then let a duplicate through.
    fn persist_acked(&self, inbox: &Inbox, message_id: &str) {
        let write = || {
            let mut journal = lock(&inbox.acked_journal);
            if let Some(j) = journal.as_mut()
                && let Err(e) = j.record(message_id, Instant::now())
            {
                tracing::error!(subscription = %inbox.subscription, error = %e,
                    "ExactlyOnce acked id not persisted; a restart could redeliver it");
            }
        };
        // The fsync blocks: tell a multi-threaded runtime, so that it moves other tasks off
        // this worker meanwhile (a current-thread runtime cannot, and just waits).
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(write);
            }
            _ => write(),
        }
    }

    fn send(&self, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let producers = self.producers.read().ok();
        for r in replies {
            match r.to {
                ReplyTo::Local(f) => f(r.settled),
                ReplyTo::Remote(p) => {
                    let sent = producers
                        .as_ref()
                        .and_then(|m| m.get(&p))
                        .is_some_and(|tx| tx.send(r.settled).is_ok());
                    if !sent {
                        // The producer asks with QueryDelivery before redelivering.
                        tracing::debug!(producer = %p, "no stream to the producer; settlement kept for its query");
                    }
                }
            }
        }
    }

    /// Routes settlements for `producer` to `tx` (its newest `Forward` stream).
    pub fn attach_producer(&self, producer: Arc<str>, tx: mpsc::UnboundedSender<Settled>) {
        if let Ok(mut m) = self.producers.write() {
            m.insert(producer, tx);
        }
    }

    /// Forgets `tx` as the stream of `producer` unless a newer stream replaced it.
    pub fn detach_producer(&self, producer: &str, tx: &mpsc::UnboundedSender<Settled>) {
        if let Ok(mut m) = self.producers.write()
            && m.get(producer).is_some_and(|cur| cur.same_channel(tx))
        {
            m.remove(producer);
        }
    }

    /// Takes a batch of deliveries in; those this sidecar cannot take are answered with
    /// [`rejected`].
    pub fn accept(&self, incoming: Vec<Incoming>) {
        let now = Instant::now();
        let table = self.routing.borrow().clone();
        // A batch is almost always of one subscription: no map, no key clone per delivery.
        let mut by_sub: Vec<(String, Vec<Incoming>)> = Vec::new();
        let total = incoming.len();
        for i in incoming {
            match by_sub
                .iter_mut()
                .find(|(sub, _)| *sub == i.deliver.subscription)
            {
                Some((_, items)) => items.push(i),
                None => {
                    let mut items = Vec::with_capacity(total);
                    let sub = i.deliver.subscription.clone();
                    items.push(i);
                    by_sub.push((sub, items));
                }
            }
        }
        let mut replies = Vec::new();
        for (sub, items) in by_sub {
            let member = table
                .subscriptions
                .get(&sub)
                .and_then(|s| table.members.get(&s.group))
                .is_some_and(|m| m.contains_key(&self.pod));
            let inbox = match self.inbox(&sub, &table) {
                Ok(inbox) if member => inbox,
                result => {
                    let reason = match result {
                        Err(error) => error.to_string(),
                        Ok(_) => {
                            format!("pod {:?} is not a member of the group of {sub:?}", self.pod)
                        }
                    };
                    for i in items {
                        replies.push(Reply {
                            to: i.reply,
                            settled: rejected(i.deliver, reason.clone()),
                        });
                    }
                    continue;
                }
            };
            // The subscription's ackWait from this sidecar's own table, not the one a
            // delivery carries: a caller could otherwise pin deliveries here for as long as
            // it likes.
            let ack_wait = Duration::from_millis(
                table
                    .subscriptions
                    .get(&sub)
                    .map_or(1, |s| s.ack_wait_ms)
                    .max(1),
            );
            let mut last_producer: Option<Arc<str>> = None;
            let arrivals: Vec<Arrival> = items
                .into_iter()
                .map(|i| {
                    let (r, id) = self.ids.issue(inbox.index);
                    let d = i.deliver;
                    let m = d.message.unwrap_or_default();
                    // One shared name per producer, not an allocation per delivery.
                    let producer = match (&last_producer, &i.reply) {
                        (Some(p), _) if **p == *d.producer => p.clone(),
                        (_, ReplyTo::Remote(p)) if **p == *d.producer => p.clone(),
                        _ => Arc::from(d.producer.as_str()),
                    };
                    last_producer = Some(producer.clone());
                    Arrival {
                        seq: r.seq,
                        reply: i.reply,
                        producer,
                        offset: d.offset,
                        attempt: d.attempt,
                        incarnation: d.incarnation,
                        ack_wait,
                        delivery: Delivery {
                            delivery_id: id,
                            message_id: m.id,
                            topic: d.topic,
                            key: m.key,
                            headers: m.headers,
                            // A copy, not a slice of the forwarded batch's buffer (up
                            // to 2 MiB), which one held delivery would keep alive.
                            payload: bytes::Bytes::copy_from_slice(&m.payload),
                            publish_time_ms: m.publish_time_ms,
                            attempt: d.attempt,
                            key_sequence: m.key_sequence,
                            subscription: sub.clone(),
                            producer: d.producer,
                        },
                    }
                })
                .collect();
            let handed = {
                let mut state = lock(&inbox.state);
                state.accept(arrivals, now, &mut replies);
                state.take_handed()
            };
            self.count_delivered(&inbox, handed);
        }
        self.send(replies);
    }

    fn count_delivered(&self, inbox: &Inbox, n: u64) {
        if n > 0 {
            self.metrics
                .delivered
                .get_or_create(&Metrics::sub(&inbox.topic, &inbox.subscription))
                .inc_by(n);
        }
    }

    /// Acks (`nack = None`) or nacks a delivery by id.
    pub fn settle(&self, delivery_id: &str, nack: Option<u64>) -> Result<(), Error> {
        let unknown = || Error::UnknownDelivery(delivery_id.to_owned());
        let r = self.ids.parse(delivery_id).ok_or_else(unknown)?;
        let inbox = self
            .inboxes
            .read()
            .ok()
            .and_then(|i| i.by_index.get(r.inbox as usize).cloned())
            .ok_or_else(unknown)?;
        let mut replies = Vec::new();
        let result = {
            let mut state = lock(&inbox.state);
            match state.settle(r.seq, nack, Instant::now(), &mut replies) {
                Ok(persist) => Ok(persist),
                Err(_) => match state.finished(r.seq) {
                    Some(f) => Err(Error::ExpiredDelivery {
                        id: delivery_id.to_owned(),
                        why: f.why(),
                    }),
                    None => Err(unknown()),
                },
            }
        };
        if let Ok(Some(message_id)) = &result {
            self.persist_acked(&inbox, message_id);
            // Tests of `ExactlyOnce` across a crash (0 duplicates, docs/reliability.md's shared
            // criteria): die right here, after the ack is durable and before the producer
            // hears of it.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("consumer::acked_persisted", |_| -> Result<(), Error> {
                std::process::abort()
            });
        }
        self.send(replies);
        result.map(|_| ())
    }

    /// Answers a producer's `QueryDelivery` (see `InboxState::query`).
    pub fn query(&self, q: &QueryDeliveryRequest) -> DeliveryState {
        let inbox = self
            .inboxes
            .read()
            .ok()
            .and_then(|i| i.by_name.get(q.subscription.as_str()).cloned());
        match inbox {
            Some(inbox) => lock(&inbox.state).query(
                &q.producer,
                q.offset,
                q.attempt,
                &q.message_id,
                q.incarnation,
            ),
            None => DeliveryState::Unknown,
        }
    }

    /// Expires deliveries past their ackWait; run periodically.
    pub fn sweep(&self) {
        let inboxes: Vec<Arc<Inbox>> = self
            .inboxes
            .read()
            .map(|i| i.by_index.clone())
            .unwrap_or_default();
        let now = Instant::now();
        let mut replies = Vec::new();
        for inbox in inboxes {
            lock(&inbox.state).sweep(now, &mut replies);
        }
        self.send(replies);
    }

    /// Returns every held delivery to its producer (at shutdown).
    pub fn return_all(&self, reason: &str) {
        let inboxes: Vec<Arc<Inbox>> = self
            .inboxes
            .read()
            .map(|i| i.by_index.clone())
            .unwrap_or_default();
        let mut replies = Vec::new();
        for inbox in inboxes {
            lock(&inbox.state).return_all(reason, &mut replies);
        }
        self.send(replies);
    }
}
