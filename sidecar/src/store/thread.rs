//! The loop on a topic's store thread. See the parent module for the group-commit rules.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ferry_api::crd::Durability;
use ferry_api::routing::TopicEntry;
use tokio::sync::watch;

use super::dedup::DedupWindow;
use super::key_sequences::KeySequences;
use super::settled_index::SettledIndex;
use super::tail::Tail;
use super::{
    Answer, AppendOutcome, AppendReply, Command, DeliveryReport, Held, HeldReply, Outcome,
    StoreOptions, StoreStats,
};
use crate::error::Error;
use crate::log::{Log, Offset};

/// Most commands handled in one round; bounds the latency of the first one.
const MAX_ROUND: usize = 4096;
/// How often settled segments are compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(1);
/// How many records one read may scan past records this subscription already settled.
const READ_SCAN_ROUNDS: usize = 8;

mod answer;
mod append;
mod poison;
mod waiters;

/// An append's answer, ready to send once the high watermark moved.
enum Ready {
    Plain(AppendReply, Result<Vec<AppendOutcome>, Error>),
    Held(HeldReply, super::HeldResult),
}

impl Ready {
    fn send(self) {
        match self {
            Ready::Plain(reply, result) => {
                let _ = reply.send(result);
            }
            // A publisher gone meanwhile drops the answer, and with it the hold, which
            // refuses the records at the next round.
            Ready::Held(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }
}

pub(super) struct StoreThread {
    topic: String,
    log: Box<dyn Log>,
    durability: Durability,
    max_backlog: u64,
    sync_interval: Duration,
    dedup: DedupWindow,
    /// Ordered topics: the per-key numbering (see `key_sequences.rs`).
    key_sequences: Option<KeySequences>,
    subscriptions: Vec<String>,
    /// `DELIVERED` publishes waiting, by offset (`waiters.rs`).
    delivered_waiters: HashMap<Offset, Vec<watch::Sender<DeliveryReport>>>,
    stats: Arc<StoreStats>,
    written_tx: watch::Sender<Offset>,
    /// Something written or settled since the last sync.
    dirty: bool,
    last_sync: Instant,
    last_compact: Instant,
    fsyncs: prometheus_client::metrics::counter::Counter,
    /// Newest records, for reads that keep up (disk topics only).
    tail: Option<Tail>,
    /// `Replicated` topics: unsettled ids, reported to the replicator once settled.
    settled_index: Option<SettledIndex>,
    /// The high watermark: dispatchers read only below it (see the parent module).
    visible: Offset,
    /// Offsets of held appends not yet released (`held.rs`).
    held: BTreeSet<Offset>,
    /// Offsets whose publish was refused after they were stored (copies not made); settled
    /// for every subscription, and skipped by reads until `acknowledged()` passes them.
    refused: BTreeSet<Offset>,
    /// Settlements made by this round's appends (custody moves), for `settled_index`.
    presettled: Vec<(Arc<str>, Offset)>,
}

impl StoreThread {
    pub(super) fn new(
        entry: &TopicEntry,
        log: Box<dyn Log>,
        dedup: DedupWindow,
        key_sequences: Option<KeySequences>,
        options: &StoreOptions,
        stats: Arc<StoreStats>,
        written_tx: watch::Sender<Offset>,
    ) -> Self {
        let mut s = Self {
            topic: ferry_api::routing::object_ref(&entry.namespace, &entry.name),
            durability: entry.durability,
            max_backlog: entry.retention_max_bytes,
            sync_interval: options.async_sync_interval.max(Duration::from_millis(1)),
            dedup,
            key_sequences,
            subscriptions: Vec::new(),
            delivered_waiters: HashMap::new(),
            log,
            stats,
            written_tx,
            dirty: false,
            last_sync: Instant::now(),
            last_compact: Instant::now(),
            fsyncs: options.fsyncs.clone(),
            tail: (entry.durability != Durability::Memory).then(Tail::default),
            settled_index: None,
            visible: 0,
            held: BTreeSet::new(),
            refused: BTreeSet::new(),
            presettled: Vec::new(),
        };
        s.visible = s.log.written();
        s.settled_index = SettledIndex::for_topic(entry, s.log.as_ref(), options);
        s.publish_stats();
        s
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
        let mut round = Vec::with_capacity(64);
        loop {
            let timeout = if self.dirty && self.durability != Durability::Memory {
                self.sync_interval.saturating_sub(self.last_sync.elapsed())
            } else {
                COMPACT_EVERY
            };
            match rx.recv_timeout(timeout) {
                Ok(c) => round.push(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while round.len() < MAX_ROUND {
                match rx.try_recv() {
                    Ok(c) => round.push(c),
                    Err(_) => break,
                }
            }
            self.round(&mut round);
        }
        self.fsyncs.inc();
        if let Err(e) = self.log.sync() {
            tracing::error!(topic = %self.topic, error = %e, "final sync failed");
        }
    }

    fn round(&mut self, round: &mut Vec<Command>) {
        let mut appends = Vec::new();
        let mut later = Vec::new();
        let mut settled_any = false;
        let mut touched = Vec::new();
        for c in round.drain(..) {
            match c {
                Command::Append { items, reply } => appends.push((items, reply)),
                Command::Release {
                    offsets,
                    replicated,
                } => {
                    if !replicated {
                        settled_any = true;
                        // Settled for every subscription by `release`.
                        for sub in &self.subscriptions {
                            let sub: Arc<str> = Arc::from(sub.as_str());
                            touched.extend(offsets.iter().map(|o| (sub.clone(), *o)));
                        }
                    }
                    self.release(offsets, replicated);
                }
                Command::Report(items) => {
                    self.record_outcomes(&items);
                    settled_any = true;
                }
                Command::Settle(items) => {
                    settled_any |= !items.is_empty();
                    if self.settled_index.is_some() {
                        touched.extend(items.iter().map(|(s, o, _)| (s.clone(), *o)));
                    }
                    self.settle(items);
                }
                Command::SetSubscriptions(subs) => {
                    if let Err(e) = self.log.set_subscriptions(&subs) {
                        tracing::error!(topic = %self.topic, error = %e, "registering subscriptions failed");
                    }
                    self.subscriptions = subs;
                    settled_any = true;
                }
                other => later.push(other),
            }
        }
        // Reads first: they only see records of earlier rounds (durable for Disk, whose
        // every appending round syncs), so they need not wait behind this round's fsync;
        // a dispatcher that asked while the last one ran gets its records one fsync sooner.
        let (reads, later): (Vec<Command>, Vec<Command>) = later.into_iter().partition(|c| {
            matches!(
                c,
                Command::Read { .. }
                    | Command::ReadAt { .. }
                    | Command::Cursor { .. }
                    | Command::Unsettled { .. }
                    | Command::Holds { .. }
            )
        });
        for c in reads {
            self.answer(c);
        }
        let appended = !appends.is_empty();
        let replies = if appended {
            self.append(appends)
        } else {
            Vec::new()
        };
        if !self.presettled.is_empty() {
            settled_any = true;
            touched.append(&mut self.presettled);
        }
        let must_sync = match self.durability {
            Durability::Memory => false,
            Durability::Disk | Durability::Replicated => {
                appended || (self.dirty && self.last_sync.elapsed() >= self.sync_interval)
            }
            Durability::DiskAsync => self.dirty && self.last_sync.elapsed() >= self.sync_interval,
        };
        let mut sync_error = None;
        let flush = later.iter().any(|c| matches!(c, Command::Flush(_)));
        if (must_sync || (flush && self.dirty)) && self.durability != Durability::Memory {
            self.fsyncs.inc();
            if let Err(e) = self.log.sync() {
                tracing::error!(topic = %self.topic, error = %e, "fsync failed");
                sync_error = Some(e.to_string());
                self.poisoned(&e);
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        // Counters first, so that whoever hears back sees them current.
        self.publish_stats();
        // Below this the records of the round met the topic's durability: a failed fsync
        // refuses the publishes of records above it (a `DiskAsync` publish was promised
        // only the write).
        let durable = match self.durability {
            Durability::Disk | Durability::Replicated => self.log.durable(),
            Durability::DiskAsync | Durability::Memory => Offset::MAX,
        };
        let mut answers = Vec::with_capacity(replies.len());
        for (reply, result, waiters) in replies {
            let result = match (&sync_error, result) {
                (Some(msg), Ok(outcomes)) if outcomes.iter().any(|o| o.offset() >= durable) => Err(
                    Error::Internal(format!("fsync of topic {} failed: {msg}", self.topic)),
                ),
                (_, r) => r,
            };
            if result.is_ok() {
                for (offset, tx) in waiters {
                    self.wait_for_delivery(offset, tx);
                }
            }
            answers.push(self.hold(reply, result));
        }
        // The mark moves before anyone hears back: a publisher told "stored" finds its
        // record deliverable (unless held for its copies).
        self.advance_visible();
        for answer in answers {
            answer.send();
        }
        if settled_any || appended {
            self.fire_delivered_waiters();
        }
        for c in later {
            if let Command::Flush(reply) = c {
                let _ = reply.send(match &sync_error {
                    Some(m) => Err(Error::Internal(format!(
                        "fsync of topic {} failed: {m}",
                        self.topic
                    ))),
                    None => Ok(()),
                });
            }
        }
        if self.last_compact.elapsed() >= COMPACT_EVERY {
            self.last_compact = Instant::now();
            // Before compaction may delete records: their ids must be durable first.
            self.dedup.sync();
            if let Err(e) = self.log.compact() {
                tracing::warn!(topic = %self.topic, error = %e, "compaction failed");
            }
        }
        if settled_any {
            self.publish_stats();
            if let Some(index) = &mut self.settled_index {
                index.settled(self.log.as_ref(), &self.subscriptions, &touched);
            }
        }
    }

    /// Prepares the answer to one append request: a held one registers its stored offsets.
    fn hold(&mut self, reply: Answer, result: Result<Vec<AppendOutcome>, Error>) -> Ready {
        match reply {
            Answer::Plain(reply) => Ready::Plain(reply, result),
            Answer::Held(reply, tx) => {
                let result = result.map(|outcomes| {
                    let stored: Vec<Offset> = outcomes
                        .iter()
                        .filter_map(|o| match o {
                            AppendOutcome::Stored(o) => Some(*o),
                            AppendOutcome::Duplicate(_) => None,
                        })
                        .collect();
                    self.held.extend(stored.iter().copied());
                    (outcomes, Held::new(stored, tx))
                });
                Ready::Held(reply, result)
            }
        }
    }

    /// Ends the hold on `offsets`; refused ones are settled for every subscription.
    fn release(&mut self, offsets: Vec<Offset>, replicated: bool) {
        for o in &offsets {
            self.held.remove(o);
        }
        if !replicated {
            let mut settles = Vec::new();
            for o in offsets {
                for sub in &self.subscriptions {
                    settles.push((Arc::from(sub.as_str()), o, Outcome::Dropped));
                }
                self.refused.insert(o);
            }
            self.settle(settles);
        }
        self.advance_visible();
    }

    /// Moves the high watermark up to what the topic's durability allows now.
    fn advance_visible(&mut self) {
        let mark = match self.durability {
            Durability::Disk | Durability::Replicated => self.log.durable(),
            Durability::DiskAsync | Durability::Memory => self.log.written(),
        };
        let mark = self.held.first().map_or(mark, |h| mark.min(*h));
        let acknowledged = self.log.acknowledged();
        if self.refused.first().is_some_and(|o| *o < acknowledged) {
            self.refused = self.refused.split_off(&acknowledged);
        }
        if mark > self.visible {
            self.visible = mark;
            self.written_tx.send_replace(mark);
        }
    }

    fn settle(&mut self, items: Vec<super::SettleItem>) {
        self.record_outcomes(&items);
        for (sub, offset, how) in items {
            match self.log.settle(&sub, offset, how.settlement()) {
                Ok(()) => self.dirty = true,
                // A subscription removed from the table meanwhile: nothing to keep.
                Err(e) => {
                    tracing::debug!(topic = %self.topic, subscription = %sub, offset, error = %e, "settle ignored")
                }
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.written.store(self.log.written(), AtomicOrdering::Relaxed);
        s.acknowledged
            .store(self.log.acknowledged(), AtomicOrdering::Relaxed);
        s.backlog_bytes
            .store(self.log.backlog_bytes(), AtomicOrdering::Relaxed);
        s.dropped.store(self.log.dropped(), AtomicOrdering::Relaxed);
        let drained =
            self.subscriptions.is_empty() || self.log.acknowledged() >= self.log.written();
        s.drained.store(drained, AtomicOrdering::Relaxed);
    }
}
