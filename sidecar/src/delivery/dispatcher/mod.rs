//! One subscription's dispatcher on the producer's sidecar. A single task owns all of the
//! subscription's delivery state (no locks): it loads unsettled records from the store in
//! batches, sends them to members (one batch per peer per round), and reacts to
//! settlements, send failures, query answers and its own timers.
//!
//! Per message it keeps one *copy* per target: one for Unicast (whose member may change
//! between attempts), one per member for Broadcast (pinned to that member). A message is
//! settled in the log once every copy is done.
//!
//! Ack timeout: the producer first asks the consumer's sidecar (`QueryDelivery`); it
//! redelivers only when that sidecar says the delivery is unknown or cannot be reached, and
//! waits another `ackWait` when the app is still working on it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::crd::Ordering;
use ferry_api::proto::v1::Deliver;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::policy::matches_filter;
use super::select::Member;
use super::{Event, Setup};
use crate::consumer::{Incoming, ReplyTo};
use crate::engine::Engine;
use crate::log::{Offset, StoredMessage};
use crate::metrics::Metrics;
use crate::store::Outcome;
use crate::store::TopicStore;

mod events;
mod expiry;
mod parked;
mod send;
mod timers;

pub use send::peer_message;

/// Most messages a dispatcher holds in memory at once, in flight or ready to go; messages
/// that wait for a long delay, a backoff or a member that is down are parked outside it
/// (`parked.rs`).
const WINDOW: usize = 8192;
/// Most payload bytes a dispatcher holds in memory at once (large messages hit this first).
const WINDOW_BYTES: usize = 64 << 20;
/// Records read from the store per read.
const READ_BATCH: usize = 512;
/// Events handled per round before dispatching again.
const EVENTS_PER_ROUND: usize = 4096;
/// Delay before retrying a delivery the consumer sidecar refused or could not be sent.
const REJECT_RETRY: Duration = Duration::from_millis(200);
/// The "address" of in-process deliveries to this sidecar's own app.
const LOCAL_ADDR: &str = "in-process";
/// Delay before retrying a failed dead-letter publish.
const DLQ_RETRY: Duration = Duration::from_secs(1);

/// Wall time on the sidecar's monotonic-backed clock (`crate::clock`), never the raw
/// host clock: ages and deadlines must not move when the host clock steps.
pub(super) use crate::clock::now_ms;

#[derive(Debug)]
enum CopyState {
    Idle,
    Waiting(Instant),
    InFlight {
        addr: Arc<str>,
        pod: String,
        deadline: Instant,
        querying: bool,
    },
    DeadLettering,
    DeadLetterWait(Instant),
    Done(Outcome),
}

#[derive(Debug)]
struct Copy {
    pinned: Option<String>,
    /// Deliveries sent so far (the attempt number of the latest).
    attempt: u32,
    /// Deliveries that count toward maxDeliveries (refused ones do not).
    counted: u32,
    state: CopyState,
    history: Vec<String>,
    reason: String,
}

#[derive(Debug)]
struct Entry {
    message: StoredMessage,
    copies: Vec<Copy>,
    not_before: Option<Instant>,
    /// When the message stops being delivered, and why: its own TTL or the topic's
    /// `retention.maxAge`, whichever comes first. Checked whenever it is (re)dispatched.
    expires: Option<(Instant, &'static str)>,
    /// Written by an earlier process of this sidecar, which may have delivered it: its
    /// first delivery by this process is numbered as a redelivery (attempt 2), so that
    /// the consumer can tell it from a new message and every duplicate it causes is an
    /// explained one (docs/reliability.md's shared criteria).
    recovered: bool,
}

/// Counters of this subscription, resolved once.
#[derive(Debug)]
struct Counters {
    forwarded: prometheus_client::metrics::counter::Counter,
    acked: prometheus_client::metrics::counter::Counter,
    redelivered: prometheus_client::metrics::counter::Counter,
    mismatched: prometheus_client::metrics::counter::Counter,
    dead_lettered: prometheus_client::metrics::counter::Counter,
    dropped: prometheus_client::metrics::counter::Counter,
    expired: prometheus_client::metrics::counter::Counter,
    oldest: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    parked: prometheus_client::metrics::gauge::Gauge,
    latency: prometheus_client::metrics::histogram::Histogram,
}

/// Deliveries of one round, sent together.
#[derive(Default)]
struct Outbox {
    remote: HashMap<Arc<str>, Vec<Deliver>>,
    local: Vec<Incoming>,
    /// Capacity of each peer's batch: the messages ready this round (at most a read's
    /// worth), so that a batch is not regrown, and copied, as it fills.
    hint: usize,
}

impl Copy {
    /// A copy not sent yet by this process; `prior` deliveries may have been made before
    /// (1 for a message recovered from the log after a restart, which sends it again as
    /// attempt 2). They do not count toward maxDeliveries: nobody knows whether they
    /// happened.
    fn new(pinned: Option<String>, prior: u32) -> Self {
        Self {
            pinned,
            attempt: prior,
            counted: 0,
            state: CopyState::Idle,
            history: Vec::new(),
            reason: String::new(),
        }
    }
}

struct Dispatcher {
    engine: Arc<Engine>,
    store: Arc<TopicStore>,
    setup: Arc<Setup>,
    topic: Arc<str>,
    sub: Arc<str>,
    tx: mpsc::UnboundedSender<Event>,
    members: Vec<Member>,
    /// Boxed: the tree moves only pointers when it splits or merges nodes (an `Entry` is a
    /// few hundred bytes, and the window turns over at the delivery rate).
    entries: BTreeMap<Offset, Box<Entry>>,
    /// Payload bytes of `entries`.
    entry_bytes: usize,
    ready: BTreeSet<Offset>,
    timers: BinaryHeap<Reverse<(Instant, Offset)>>,
    key_busy: foldhash::HashMap<String, Offset>,
    /// Ordered topics: offsets held per key, to find the next message of a key at once.
    by_key: foldhash::HashMap<String, BTreeSet<Offset>>,
    /// Where in-process deliveries report back (built once).
    local_reply: ReplyTo,
    read_next: Offset,
    rr: usize,
    settles: Vec<crate::store::SettleItem>,
    /// `AtMostOnce` apps' answers to messages settled when sent (for `DELIVERED`
    /// publishes), sent with the settlements.
    reports: Vec<crate::store::SettleItem>,
    counters: Counters,
    /// When the next expiry sweep is due, and when the last one ran (`expiry.rs`).
    next_sweep: Option<Instant>,
    last_sweep: Instant,
    /// Messages waiting outside the window (`parked.rs`).
    parked: parked::Parked,
}

/// Runs the dispatcher of `setup.subscription` until `cancel`.
pub async fn run(
    engine: Arc<Engine>,
    store: Arc<TopicStore>,
    setup: Arc<Setup>,
    tx: mpsc::UnboundedSender<Event>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    cancel: CancellationToken,
) {
    let sub: Arc<str> =
        ferry_api::routing::object_ref(&setup.subscription.namespace, &setup.subscription.name)
            .into();
    let topic: Arc<str> = store.topic.as_str().into();
    let labels = Metrics::sub(&topic, &sub);
    let m = &engine.metrics;
    let counters = Counters {
        forwarded: m.forwarded.get_or_create(&labels).clone(),
        acked: m.acked.get_or_create(&labels).clone(),
        redelivered: m.redelivered.get_or_create(&labels).clone(),
        mismatched: m.settlements_mismatched.get_or_create(&labels).clone(),
        dead_lettered: m.dead_lettered.get_or_create(&labels).clone(),
        dropped: m.dropped.get_or_create(&labels).clone(),
        expired: m.expired.get_or_create(&labels).clone(),
        oldest: m.oldest_age_seconds.get_or_create(&labels).clone(),
        parked: m.parked.get_or_create(&labels).clone(),
        latency: m.publish_to_ack_seconds.get_or_create(&labels).clone(),
    };
    let read_next = match store.cursor(sub.clone()).await {
        Ok(c) => c.unwrap_or(0),
        Err(e) => {
            tracing::error!(subscription = %sub, error = %e, "cannot start dispatcher");
            return;
        }
    };
    if read_next < store.recovered {
        announce_redelivery(&store, &topic, &sub).await;
    }
    let local_reply = {
        let tx = tx.clone();
        let from: Arc<str> = LOCAL_ADDR.into();
        ReplyTo::Local(Arc::new(move |settled| {
            let _ = tx.send(Event::Settled {
                from: from.clone(),
                settled,
            });
        }))
    };
    let mut d = Dispatcher {
        engine,
        store,
        setup: setup.clone(),
        topic,
        sub,
        tx,
        members: Vec::new(),
        entries: BTreeMap::new(),
        entry_bytes: 0,
        ready: BTreeSet::new(),
        timers: BinaryHeap::new(),
        key_busy: Default::default(),
        by_key: Default::default(),
        local_reply,
        read_next,
        rr: 0,
        settles: Vec::new(),
        reports: Vec::new(),
        counters,
        next_sweep: None,
        last_sweep: Instant::now(),
        parked: parked::Parked::default(),
    };
    d.apply_setup(setup);
    let mut written = d.store.watch_written();
    let mut peers_changed = d.engine.peers.watch_liveness();
    loop {
        if d.has_window() && d.parked.has_due() {
            d.readmit().await;
        }
        if d.has_window() && d.read_next < *written.borrow_and_update() {
            d.fill().await;
        }
        d.dispatch();
        d.flush_settles();
        d.prune_timers();
        d.update_gauges();
        let next_timer = match (d.timers.peek(), d.parked.next_wake()) {
            (Some(Reverse((a, _))), Some(b)) => Some((*a).min(b)),
            (a, b) => a.map(|Reverse((a, _))| *a).or(b),
        };
        let more_to_read =
            d.has_window() && (d.read_next < *written.borrow() || d.parked.has_due());
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            e = rx.recv() => {
                let Some(e) = e else { break };
                d.handle(e);
                let mut n = 1;
                while n < EVENTS_PER_ROUND {
                    match rx.try_recv() {
                        Ok(e) => { d.handle(e); n += 1; }
                        Err(_) => break,
                    }
                }
            }
            _ = sleep_until(next_timer) => d.fire_timers(),
            r = written.changed(), if !more_to_read => if r.is_err() { break },
            _ = peers_changed.changed() => d.refresh_liveness(),
            _ = tokio::task::yield_now(), if more_to_read => {}
        }
    }
    d.flush_settles();
}

/// Logs, once per subscription when its dispatcher starts on a log recovered from an
/// earlier process, how many unsettled messages it will send again. The earlier process
/// may have delivered them (and the consumer's ack may have been lost with it), so each
/// is numbered as a redelivery; this line is what explains the duplicates that remain
/// possible after a crash.
async fn announce_redelivery(store: &TopicStore, topic: &str, sub: &Arc<str>) {
    match store.unsettled_below(sub.clone(), store.recovered).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            topic,
            subscription = %sub,
            unsettled = n,
            "redelivering {n} unsettled messages of {topic}/{sub} after restart"
        ),
        Err(e) => {
            tracing::warn!(subscription = %sub, error = %e, "cannot count unsettled messages after restart")
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Dispatcher {
    fn apply_setup(&mut self, setup: Arc<Setup>) {
        let old: HashMap<String, u32> = self
            .members
            .iter()
            .map(|m| (m.pod.clone(), m.in_flight))
            .collect();
        let me = &self.engine.identity;
        self.members = setup
            .members
            .iter()
            .map(|m| {
                let local = m.pod == me.pod && m.namespace == me.namespace;
                Member {
                    pod: m.pod.clone(),
                    address: m.address.clone(),
                    zone: m.zone.clone(),
                    local,
                    live: local || self.engine.peers.is_live(&m.address),
                    in_flight: old.get(&m.pod).copied().unwrap_or(0),
                }
            })
            .collect();
        self.setup = setup;
        self.wake_members();
        // Members may have joined: anything waiting for one may now go.
        let waiting: Vec<Offset> = self.entries.keys().copied().collect();
        self.ready.extend(waiting.into_iter().filter(|o| {
            self.entries.get(o).is_some_and(|e| {
                e.copies.is_empty() || e.copies.iter().any(|c| matches!(c.state, CopyState::Idle))
            })
        }));
    }

    fn refresh_liveness(&mut self) {
        let mut changed = false;
        for m in &mut self.members {
            let live = m.local || self.engine.peers.is_live(&m.address);
            changed |= live != m.live;
            m.live = live;
        }
        if changed {
            self.wake_members();
        }
    }

    async fn fill(&mut self) {
        let max = READ_BATCH.min(WINDOW - self.entries.len());
        let batch = match self.store.read(self.sub.clone(), self.read_next, max).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(subscription = %self.sub, error = %e, "reading the log failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        };
        self.read_next = self.read_next.max(batch.next);
        let now = Instant::now();
        // Deadlines become instants through the process's clock anchor, which read the wall
        // clock once at startup: for a message this process published, the instant is the
        // same whenever it is computed, so wall-clock steps since cannot expire or release
        // it early; a message recovered from the log is converted with the wall clock as
        // read at this startup (see `crate::clock`).
        let anchor = crate::clock::anchor();
        for (offset, message) in batch.records {
            if self.entries.contains_key(&offset) {
                continue;
            }
            if !matches_filter(&self.setup.subscription, &message) {
                self.settles
                    .push((self.sub.clone(), offset, Outcome::Filtered));
                continue;
            }
            let since =
                |ms: u64| anchor.instant_of(message.publish_time_ms.saturating_add(ms), now);
            let not_before = (message.delay_ms > 0).then(|| since(message.delay_ms));
            let ttl = (message.ttl_ms > 0).then(|| (since(message.ttl_ms), "ttl expired"));
            let max_age = self.setup.topic.retention_max_age_ms;
            let aged = (max_age > 0).then(|| (since(max_age), "retention.maxAge exceeded"));
            let expires = match (ttl, aged) {
                (Some(t), Some(a)) => Some(if a.0 < t.0 { a } else { t }),
                (t, a) => t.or(a),
            };
            if let Some((at, _)) = expires {
                self.schedule_sweep(at);
            }
            if self.setup.topic.ordering == Ordering::Key
                && let Some(k) = &message.key
            {
                self.by_key.entry(k.clone()).or_default().insert(offset);
            }
            // Messages whose custody moved here may have reached the app already.
            let recovered =
                offset < self.store.recovered || crate::replica::moved_custody(&message);
            self.entry_bytes += message.payload.len();
            self.entries.insert(
                offset,
                Box::new(Entry {
                    message,
                    copies: Vec::new(),
                    not_before,
                    expires,
                    recovered,
                }),
            );
            self.ready.insert(offset);
            self.park_behind_key(offset);
        }
    }

    /// Whether the window may take more messages from the log.
    fn has_window(&self) -> bool {
        self.entries.len() < WINDOW && self.entry_bytes < WINDOW_BYTES
    }

    fn has_room(&self) -> bool {
        let max = self.setup.subscription.max_in_flight;
        self.members.iter().any(|m| m.live && m.in_flight < max)
    }

    fn dispatch(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut out = Outbox {
            hint: self.ready.len().min(READ_BATCH),
            ..Outbox::default()
        };
        // Walk the ready set in offset order without copying it: most rounds stop early,
        // as soon as no member has room.
        let mut from = 0;
        while let Some(&offset) = self.ready.range(from..).next() {
            if !self.has_room() {
                break;
            }
            from = offset + 1;
            self.dispatch_one(offset, now, &mut out);
        }
        for (addr, batch) in out.remote {
            self.engine.peers.send(&addr, batch);
        }
        if !out.local.is_empty() {
            self.engine.consumer.accept(out.local);
        }
    }
}
