//! The loop on a topic's store thread. See the parent module for the group-commit rules.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ferry_api::crd::{Durability, Ordering};
use ferry_api::routing::TopicEntry;
use tokio::sync::{oneshot, watch};

use super::dedup::DedupWindow;
use super::settled_index::SettledIndex;
use super::tail::Tail;
use super::{AppendItem, AppendOutcome, Command, ReadBatch, StoreOptions, StoreStats};
use crate::error::Error;
use crate::log::record::message_record_len;
use crate::log::{Log, Offset};

/// Most commands handled in one round; bounds the latency of the first one.
const MAX_ROUND: usize = 4096;
/// How often settled segments are compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(1);
/// How many records one read may scan past records this subscription already settled.
const READ_SCAN_ROUNDS: usize = 8;

pub(super) struct StoreThread {
    topic: String,
    log: Box<dyn Log>,
    durability: Durability,
    ordered: bool,
    max_backlog: u64,
    sync_interval: Duration,
    dedup: DedupWindow,
    key_sequences: HashMap<String, u64>,
    subscriptions: Vec<String>,
    delivered_waiters: HashMap<Offset, Vec<oneshot::Sender<()>>>,
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
}

impl StoreThread {
    pub(super) fn new(
        entry: &TopicEntry,
        log: Box<dyn Log>,
        dedup: DedupWindow,
        options: &StoreOptions,
        stats: Arc<StoreStats>,
        written_tx: watch::Sender<Offset>,
    ) -> Self {
        let mut s = Self {
            topic: ferry_api::routing::object_ref(&entry.namespace, &entry.name),
            durability: entry.durability,
            ordered: entry.ordering == Ordering::Key,
            max_backlog: entry.retention_max_bytes,
            sync_interval: options.async_sync_interval.max(Duration::from_millis(1)),
            dedup,
            key_sequences: HashMap::new(),
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
        };
        s.settled_index = SettledIndex::for_topic(entry, s.log.as_ref(), options);
        if s.ordered {
            s.rebuild_key_sequences();
        }
        s.publish_stats();
        s
    }

    /// Ordered topics number messages per key; after a restart numbering continues from the
    /// highest sequence still in the log.
    fn rebuild_key_sequences(&mut self) {
        let mut from = self.log.first();
        while from < self.log.written() {
            let Ok(batch) = self.log.read(from, 1024) else {
                return;
            };
            let Some((last, _)) = batch.last() else {
                return;
            };
            from = last + 1;
            for (_, m) in batch {
                if let Some(k) = m.key {
                    let seq = self.key_sequences.entry(k).or_default();
                    *seq = (*seq).max(m.key_sequence);
                }
            }
        }
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
                Command::Settle(items) => {
                    settled_any |= !items.is_empty();
                    if self.settled_index.is_some() {
                        touched.extend(items.iter().map(|(_, o, _)| *o));
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
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        // Counters first, so that whoever hears back sees them current.
        self.publish_stats();
        if appended {
            self.written_tx.send_replace(self.log.written());
        }
        for (reply, result, waiters) in replies {
            let result = match (&sync_error, result) {
                (Some(msg), Ok(_)) if self.durability != Durability::DiskAsync => Err(
                    Error::Internal(format!("fsync of topic {} failed: {msg}", self.topic)),
                ),
                (_, r) => r,
            };
            if result.is_ok() {
                for (offset, tx) in waiters {
                    self.delivered_waiters.entry(offset).or_default().push(tx);
                }
            }
            let _ = reply.send(result);
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

    /// Answers a read-only command (`Read`, `Cursor`, `Unsettled`).
    fn answer(&self, c: Command) {
        match c {
            Command::Read {
                subscription,
                from,
                max,
                reply,
            } => {
                let _ = reply.send(self.read(&subscription, from, max));
            }
            Command::Cursor {
                subscription,
                reply,
            } => {
                let _ = reply.send(self.log.cursor(&subscription));
            }
            Command::Unsettled {
                subscription,
                below,
                reply,
            } => {
                let from = self.log.cursor(&subscription).unwrap_or(below);
                let n = (from.max(self.log.first())..below.min(self.log.written()))
                    .filter(|o| !self.log.is_settled(&subscription, *o))
                    .count();
                let _ = reply.send(n as u64);
            }
            Command::Holds { ids, reply } => {
                let index = self.settled_index.as_ref();
                let unsettled = index.map_or_else(|| vec![false; ids.len()], |i| i.holds(&ids));
                // Settled ids leave the index; the dedup window still says this log stored
                // them (it forgets the ids of records recovery lost), so a re-learn does not
                // take back what was already delivered here.
                let lost = self.log.lost();
                let written = self.log.written();
                let stored = |id: &String| {
                    self.dedup.stored_at(id).is_some_and(|o| {
                        o < written && !lost.iter().any(|range| range.contains(&o))
                    })
                };
                let held = ids
                    .iter()
                    .zip(unsettled)
                    .map(|(id, unsettled)| unsettled || stored(id))
                    .collect();
                let _ = reply.send(held);
            }
            Command::Append { .. }
            | Command::Settle(_)
            | Command::SetSubscriptions(_)
            | Command::Flush(_) => {}
        }
    }

    #[allow(clippy::type_complexity)]
    fn append(
        &mut self,
        requests: Vec<(
            Vec<AppendItem>,
            oneshot::Sender<Result<Vec<AppendOutcome>, Error>>,
        )>,
    ) -> Vec<(
        oneshot::Sender<Result<Vec<AppendOutcome>, Error>>,
        Result<Vec<AppendOutcome>, Error>,
        Vec<(Offset, oneshot::Sender<()>)>,
    )> {
        let now = Instant::now();
        let base = self.log.written();
        let mut batch = Vec::new();
        let mut pending_bytes = 0u64;
        // Without a dedup window there is nothing to remember per id (no map, no clone).
        let dedup = self.dedup.enabled();
        let mut round_ids: HashMap<String, Offset> = HashMap::new();
        let mut round_keys: HashMap<String, u64> = HashMap::new();
        let mut accepted = Vec::new();
        let mut out = Vec::new();
        for (items, reply) in requests {
            let bytes: u64 = items
                .iter()
                .map(|i| message_record_len(&i.message) as u64)
                .sum();
            let backlog = self.log.backlog_bytes();
            if self.durability != Durability::Memory
                && backlog.saturating_add(pending_bytes).saturating_add(bytes) > self.max_backlog
            {
                let _ = reply.send(Err(Error::BacklogFull {
                    topic: self.topic.clone(),
                    limit: format!("retention.maxBytes = {} bytes", self.max_backlog),
                    current: backlog.saturating_add(pending_bytes),
                }));
                continue;
            }
            pending_bytes += bytes;
            let mut outcomes = Vec::with_capacity(items.len());
            let mut waiters = Vec::new();
            for item in items {
                let offset = base + batch.len() as u64;
                if dedup && !item.bypass_dedup {
                    let id = &item.message.id;
                    let seen = round_ids
                        .get(id)
                        .copied()
                        .or_else(|| self.dedup.get(id, now));
                    if let Some(offset) = seen {
                        outcomes.push(AppendOutcome::Duplicate(offset));
                        continue;
                    }
                    round_ids.insert(id.clone(), offset);
                }
                let mut message = item.message;
                if self.ordered
                    && let Some(k) = &message.key
                {
                    let seq = round_keys
                        .get(k)
                        .copied()
                        .or_else(|| self.key_sequences.get(k).copied())
                        .unwrap_or(0)
                        + 1;
                    round_keys.insert(k.clone(), seq);
                    message.key_sequence = seq;
                }
                batch.push(message);
                if let Some(tx) = item.delivered {
                    waiters.push((offset, tx));
                }
                outcomes.push(AppendOutcome::Stored(offset));
            }
            accepted.push((reply, outcomes, waiters));
        }
        if batch.is_empty() {
            for (reply, outcomes, waiters) in accepted {
                out.push((reply, Ok(outcomes), waiters));
            }
            return out;
        }
        match self.log.append(&batch) {
            Ok(range) if range.start == base => {
                self.dirty = true;
                if let Some(index) = &mut self.settled_index {
                    index.appended(base, batch.iter().map(|m| m.id.as_str()));
                }
                if let Some(tail) = &mut self.tail {
                    tail.extend(base, batch);
                }
                for (id, offset) in round_ids {
                    self.dedup.insert(id, offset, now);
                }
                self.dedup.flush();
                self.key_sequences.extend(round_keys);
                for (reply, outcomes, waiters) in accepted {
                    out.push((reply, Ok(outcomes), waiters));
                }
            }
            Ok(range) => {
                if let Some(tail) = &mut self.tail {
                    tail.clear();
                }
                // The log numbered the batch differently from what we told publishers.
                let msg = format!(
                    "log of {} appended at {range:?}, expected {base}",
                    self.topic
                );
                tracing::error!("{msg}");
                for (reply, _, _) in accepted {
                    out.push((reply, Err(Error::Internal(msg.clone())), Vec::new()));
                }
            }
            Err(e) => {
                let e = Error::from_log(&self.topic, e);
                tracing::warn!(topic = %self.topic, error = %e, "append failed");
                let msg = e.to_string();
                let code_full = matches!(e, Error::BacklogFull { .. });
                let mut first = Some(e);
                for (reply, _, _) in accepted {
                    let err = first.take().unwrap_or_else(|| {
                        if code_full {
                            Error::BacklogFull {
                                topic: self.topic.clone(),
                                limit: msg.clone(),
                                current: self.log.backlog_bytes(),
                            }
                        } else {
                            Error::Internal(msg.clone())
                        }
                    });
                    out.push((reply, Err(err), Vec::new()));
                }
            }
        }
        out
    }

    fn settle(&mut self, items: Vec<super::SettleItem>) {
        for (sub, offset, how) in items {
            match self.log.settle(&sub, offset, how) {
                Ok(()) => self.dirty = true,
                // A subscription removed from the table meanwhile: nothing to keep.
                Err(e) => {
                    tracing::debug!(topic = %self.topic, subscription = %sub, offset, error = %e, "settle ignored")
                }
            }
        }
    }

    fn fire_delivered_waiters(&mut self) {
        if self.delivered_waiters.is_empty() {
            return;
        }
        let subs = &self.subscriptions;
        let log = &self.log;
        self.delivered_waiters.retain(|offset, waiters| {
            let done =
                *offset < log.acknowledged() || subs.iter().all(|s| log.is_settled(s, *offset));
            if done {
                for tx in waiters.drain(..) {
                    let _ = tx.send(());
                }
            }
            !done
        });
    }

    fn read(&self, subscription: &str, from: u64, max: usize) -> Result<ReadBatch, Error> {
        let max = max.max(1);
        if let Some(tail) = &self.tail
            && let Some((records, next)) = tail.read(from, max, max * READ_SCAN_ROUNDS, |o| {
                !self.log.is_settled(subscription, o)
            })
        {
            return Ok(ReadBatch { records, next });
        }
        let mut records = Vec::new();
        let mut next = from;
        for _ in 0..READ_SCAN_ROUNDS {
            let written = self.log.written();
            if next >= written {
                next = written;
                break;
            }
            let got = self
                .log
                .read(next, max - records.len())
                .map_err(|e| Error::from_log(&self.topic, e))?;
            let full = got.len() == max - records.len();
            match got.last() {
                Some((last, _)) if full => next = last + 1,
                _ => next = written,
            }
            records.extend(
                got.into_iter()
                    .filter(|(o, _)| !self.log.is_settled(subscription, *o)),
            );
            if records.len() >= max || !full {
                break;
            }
        }
        Ok(ReadBatch { records, next })
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
