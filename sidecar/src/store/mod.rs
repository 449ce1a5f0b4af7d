//! Per-topic stores: each owns the topic's `Box<dyn Log>` on a dedicated thread (the log is
//! synchronous on purpose) and serves appends, reads and settlements sent to it over a
//! channel.
//!
//! Group commit: the thread drains every pending command, appends all pending messages with
//! one `Log::append`, makes them durable with one `sync()` (`Disk`), and only then answers
//! each publisher. `DiskAsync` syncs on an interval, `Memory` never. Settlements are made
//! durable at the next sync or within the async interval: losing one to a crash means a
//! redelivery, never a loss.
//!
//! - `thread.rs`: the loop on the store thread.
//! - `dedup.rs`: the producer-side dedup window.
//! - `dedup_journal.rs`: the file that makes the dedup window survive a restart.
//! - `tail.rs`: the newest records kept in memory for dispatchers that keep up.
//! - `settled_index.rs`: ids of a `Replicated` topic's unsettled records, for the replicas.
//! - `held.rs`: records of a `Replicated` publish kept from dispatchers until copied.
//!
//! High watermark: dispatchers see only records that met the topic's durability (DESIGN,
//! "Only durable records are delivered"): `Disk` below the last successful fsync,
//! `Replicated` that and not held for copies still being made, `DiskAsync` and `Memory`
//! once written (their publishers are acked then, too). [`TopicStore::watch_written`]
//! carries that mark; reads never return a record at or above it.

pub mod dedup;
pub mod dedup_journal;
mod held;
pub mod key_sequences;
pub mod outcome;
mod settled_index;
mod tail;
#[cfg(test)]
mod tests;
mod thread;
#[cfg(test)]
mod watermark_tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use ferry_api::crd::{Durability, Ordering};
use ferry_api::routing::TopicEntry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{oneshot, watch};

use self::dedup::DedupWindow;
pub use self::held::Held;
use self::key_sequences::KeySequences;
pub use self::outcome::{DeliveryReport, Outcome};
use crate::error::Error;
use crate::log::{DiskLog, DiskLogConfig, Log, MemoryLog, MemoryRetention, Offset, StoredMessage};

/// A message to append, with the publisher's wish to hear about its delivery.
#[derive(Debug)]
pub struct AppendItem {
    pub message: StoredMessage,
    /// Ack level `DELIVERED`: told each subscription's outcome as it settles the message,
    /// and `done` once every one did (see `outcome.rs`).
    pub delivered: Option<watch::Sender<DeliveryReport>>,
    /// Stored even if its id is in the dedup window: a producer re-learning messages it
    /// lost cannot trust a window that may name records the log no longer has.
    pub bypass_dedup: bool,
    /// Subscriptions that settled the message where it comes from (a custody move): it is
    /// settled for them in the round that stores it, before any dispatcher can read it, so
    /// that only the others receive it.
    pub settled_by: Vec<String>,
}

/// What happened to one appended message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored(Offset),
    /// Its id was stored within the dedup window at this offset; nothing new was stored.
    Duplicate(Offset),
}

impl AppendOutcome {
    /// Where the message is stored (for a duplicate, where its first copy is).
    pub fn offset(self) -> Offset {
        match self {
            Self::Stored(o) | Self::Duplicate(o) => o,
        }
    }
}

/// Records read for one subscription.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// Records not yet settled by the subscription, in offset order.
    pub records: Vec<(Offset, StoredMessage)>,
    /// Where the next read starts.
    pub next: Offset,
}

/// Counters the store thread updates after every round, read without asking it.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub written: AtomicU64,
    pub acknowledged: AtomicU64,
    pub backlog_bytes: AtomicU64,
    pub dropped: AtomicU64,
    /// Every registered subscription settled every record (or there is none to deliver to).
    pub drained: std::sync::atomic::AtomicBool,
    /// An fsync of the log failed: it takes no publish until the sidecar restarts
    /// (`ferry_sidecar_log_poisoned`, and `/readyz` says not ready).
    pub poisoned: std::sync::atomic::AtomicBool,
}

impl StoreStats {
    /// Bytes not settled by every subscription.
    pub fn backlog(&self) -> u64 {
        self.backlog_bytes.load(AtomicOrdering::Relaxed)
    }

    /// Whether the log is poisoned by a failed fsync.
    pub fn poisoned(&self) -> bool {
        self.poisoned.load(AtomicOrdering::Relaxed)
    }

    /// Whether every written record is settled by every subscription.
    pub fn drained(&self) -> bool {
        self.drained.load(AtomicOrdering::Relaxed)
    }
}

/// Settlement of one offset by one subscription, and how (the log keeps
/// [`Outcome::settlement`]; a `DELIVERED` publish hears the outcome).
pub type SettleItem = (Arc<str>, Offset, Outcome);

/// The answer to an append once the topic's durability is met.
pub type AppendReply = oneshot::Sender<Result<Vec<AppendOutcome>, Error>>;
/// What a held append is answered: the outcomes and the hold on the stored records.
pub type HeldResult = Result<(Vec<AppendOutcome>, Held), Error>;
/// The answer to a held append.
pub type HeldReply = oneshot::Sender<HeldResult>;

/// Where an append's answer goes.
pub(crate) enum Answer {
    Plain(AppendReply),
    /// The stored records stay hidden from dispatchers until the [`Held`] sent back is
    /// released; `tx` is what the hold reports its release through.
    Held(HeldReply, std::sync::mpsc::Sender<Command>),
}

impl Answer {
    /// Refuses the whole request.
    pub(crate) fn fail(self, e: Error) {
        match self {
            Answer::Plain(reply) => {
                let _ = reply.send(Err(e));
            }
            Answer::Held(reply, _) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

pub(crate) enum Command {
    Append {
        items: Vec<AppendItem>,
        reply: Answer,
    },
    /// Records of a held append: copied as the topic's durability asks (`replicated`), or
    /// not, in which case their publisher was refused and they are never delivered.
    Release {
        offsets: Vec<Offset>,
        replicated: bool,
    },
    Settle(Vec<SettleItem>),
    /// Outcomes of offsets already settled (an `AtMostOnce` app's answer after the send),
    /// for `DELIVERED` publishes only; the log is not touched.
    Report(Vec<SettleItem>),
    Read {
        subscription: Arc<str>,
        from: Offset,
        max: usize,
        reply: oneshot::Sender<Result<ReadBatch, Error>>,
    },
    /// The records at these offsets that `subscription` has not settled.
    ReadAt {
        subscription: Arc<str>,
        offsets: Vec<Offset>,
        reply: oneshot::Sender<Result<Vec<(Offset, StoredMessage)>, Error>>,
    },
    Cursor {
        subscription: Arc<str>,
        reply: oneshot::Sender<Option<Offset>>,
    },
    SetSubscriptions(Vec<String>),
    Unsettled {
        subscription: Arc<str>,
        below: Offset,
        reply: oneshot::Sender<u64>,
    },
    Flush(oneshot::Sender<Result<(), Error>>),
    /// Which of these ids the log holds unsettled (`Replicated` topics only; others answer
    /// all false).
    Holds {
        ids: Vec<String>,
        reply: oneshot::Sender<Vec<bool>>,
    },
}

/// What a `Replicated` topic's store reports as settled, for the replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettledReport {
    /// `namespace/name`.
    pub topic: String,
    /// Ids every subscription settled: the replicas drop their copies.
    pub ids: Vec<String>,
    /// Ids that one subscription settled while another has not yet: the replicas keep the
    /// copy and remember who settled it, so that a takeover delivers it to the others only.
    pub by_subscription: Vec<(Arc<str>, String)>,
}

/// Where a `Replicated` topic's store reports what became settled, so that the replicator
/// tells the replicas (trims).
pub type SettledIds = tokio::sync::mpsc::UnboundedSender<SettledReport>;

/// A record some subscription has not settled, with the subscriptions that have.
#[derive(Debug, Clone)]
pub struct UnsettledRecord {
    pub offset: Offset,
    pub message: StoredMessage,
    pub settled_by: Vec<Arc<str>>,
}

/// Settings of a store that do not come from the topic entry.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub async_sync_interval: Duration,
    /// Counts every fsync of the log (`ferry_sidecar_fsyncs_total{topic}`), so that group
    /// commit can be seen working: fsyncs per second against messages per second.
    pub fsyncs: Counter,
    /// For `Replicated` topics: where settled ids go (see [`SettledIds`]).
    pub settled_ids: Option<SettledIds>,
    /// Most ids the dedup window keeps (`--dedup-max-ids`).
    pub dedup_max_ids: usize,
    /// Counts ids forgotten before their window ended (`ferry_sidecar_dedup_evicted_total`).
    pub dedup_evicted: Counter,
    /// Ordered topics: most keys whose last sequence number is remembered
    /// (`--ordered-max-keys`).
    pub ordered_max_keys: usize,
    /// Keys remembered (`ferry_sidecar_ordered_keys`).
    pub ordered_keys: Gauge,
    /// Keys forgotten beyond the bound (`ferry_sidecar_ordered_keys_evicted_total`).
    pub ordered_keys_evicted: Counter,
}

impl StoreOptions {
    fn sequences_in_memory(&self, entry: &TopicEntry) -> Option<KeySequences> {
        (entry.ordering == Ordering::Key).then(|| {
            KeySequences::in_memory(
                self.ordered_max_keys,
                self.ordered_keys.clone(),
                self.ordered_keys_evicted.clone(),
            )
        })
    }
}

/// Handle to one topic's store thread. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct TopicStore {
    /// `namespace/name`.
    pub topic: String,
    pub durability: Durability,
    tx: std::sync::mpsc::Sender<Command>,
    pub stats: Arc<StoreStats>,
    written: watch::Receiver<Offset>,
    /// Offsets below this were in the log when it was opened: written by an earlier
    /// process of this sidecar, which may have forwarded them already.
    pub recovered: Offset,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl TopicStore {
    /// Opens (recovering) the topic's log under `data_dir/topics/<ns>/<name>` and starts
    /// its thread. Blocking: call from `spawn_blocking` in async code.
    pub fn open(
        entry: &TopicEntry,
        data_dir: &Path,
        options: &StoreOptions,
    ) -> Result<Arc<Self>, Error> {
        let topic = ferry_api::routing::object_ref(&entry.namespace, &entry.name);
        let window = Duration::from_millis(entry.dedup_window_ms);
        let mut dedup = DedupWindow::new(window);
        let dir = data_dir
            .join("topics")
            .join(&entry.namespace)
            .join(&entry.name);
        // Kept for `Memory` topics too: their messages do not survive a restart, the
        // promise that a key's numbers only go up does.
        let sequences = if entry.ordering == Ordering::Key {
            let s = KeySequences::open(
                &dir,
                options.ordered_max_keys,
                options.ordered_keys.clone(),
                options.ordered_keys_evicted.clone(),
            )
            .map_err(|e| Error::Io {
                what: format!("opening the key sequence mark of {topic}"),
                source: std::io::Error::other(e),
            })?;
            Some(s)
        } else {
            None
        };
        let log: Box<dyn Log> = match entry.durability {
            Durability::Memory => {
                Box::new(MemoryLog::with_retention(MemoryRetention::DropOldest {
                    max_bytes: entry.retention_max_bytes,
                }))
            }
            Durability::Disk | Durability::DiskAsync | Durability::Replicated => {
                let config = DiskLogConfig {
                    // Checked per publish request by the store thread, so that one
                    // publisher's refusal does not fail the others of the same round.
                    max_backlog_bytes: None,
                    ..DiskLogConfig::default()
                };
                let (log, report) =
                    DiskLog::open(&dir, config).map_err(|e| Error::from_log(&topic, e))?;
                tracing::info!(topic = %topic, ?report, "opened topic log");
                dedup = DedupWindow::open(window, &dir, &log).map_err(|e| Error::Io {
                    what: format!("opening the dedup journal of {topic}"),
                    source: std::io::Error::other(e),
                })?;
                Box::new(log)
            }
        };
        let dedup = dedup.limit(options.dedup_max_ids, options.dedup_evicted.clone());
        Self::start_with_dedup(entry, log, dedup, sequences, options)
    }

    /// Starts a store thread around an already open log, with an in-memory dedup window.
    pub fn start(
        entry: &TopicEntry,
        log: Box<dyn Log>,
        options: &StoreOptions,
    ) -> Result<Arc<Self>, Error> {
        let dedup = DedupWindow::new(Duration::from_millis(entry.dedup_window_ms))
            .limit(options.dedup_max_ids, options.dedup_evicted.clone());
        let sequences = options.sequences_in_memory(entry);
        Self::start_with_dedup(entry, log, dedup, sequences, options)
    }

    /// Starts a store thread around an already open log, its dedup window and (ordered
    /// topics) its key numbering.
    pub fn start_with_dedup(
        entry: &TopicEntry,
        log: Box<dyn Log>,
        dedup: DedupWindow,
        sequences: Option<KeySequences>,
        options: &StoreOptions,
    ) -> Result<Arc<Self>, Error> {
        let topic = ferry_api::routing::object_ref(&entry.namespace, &entry.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(StoreStats::default());
        let recovered = log.written();
        let (written_tx, written) = watch::channel(recovered);
        let state = thread::StoreThread::new(
            entry,
            log,
            dedup,
            sequences,
            options,
            stats.clone(),
            written_tx,
        );
        let handle = std::thread::Builder::new()
            .name(format!("store-{}", entry.name))
            .spawn(move || state.run(rx))
            .map_err(|source| Error::Io {
                what: format!("spawning the store thread of {topic}"),
                source,
            })?;
        Ok(Arc::new(Self {
            topic,
            durability: entry.durability,
            tx,
            stats,
            written,
            recovered,
            thread: std::sync::Mutex::new(Some(handle)),
        }))
    }

    fn send(&self, c: Command) -> Result<(), Error> {
        self.tx
            .send(c)
            .map_err(|_| Error::Internal(format!("the store of {} has stopped", self.topic)))
    }

    /// Queues an append; the receiver answers once the topic's durability is met.
    pub fn append(
        &self,
        items: Vec<AppendItem>,
    ) -> Result<oneshot::Receiver<Result<Vec<AppendOutcome>, Error>>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append {
            items,
            reply: Answer::Plain(reply),
        })?;
        Ok(rx)
    }

    /// Queues an append whose stored records dispatchers do not see until the returned
    /// [`Held`] is released: a `Replicated` publish, confirmed once its copies are made.
    /// Dropping the hold unreleased refuses the records (never delivered).
    pub fn append_held(
        &self,
        items: Vec<AppendItem>,
    ) -> Result<oneshot::Receiver<HeldResult>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append {
            items,
            reply: Answer::Held(reply, self.tx.clone()),
        })?;
        Ok(rx)
    }

    /// Records settlements (durable at the next sync).
    pub fn settle(&self, items: Vec<SettleItem>) {
        if !items.is_empty() && self.send(Command::Settle(items)).is_err() {
            tracing::warn!(topic = %self.topic, "settlement after the store stopped; it will be redelivered");
        }
    }

    /// Reports outcomes of offsets settled earlier (see [`Command::Report`]).
    pub fn report(&self, items: Vec<SettleItem>) {
        if !items.is_empty() {
            let _ = self.send(Command::Report(items));
        }
    }

    /// Reads up to `max` records at or after `from` not yet settled by `subscription`.
    pub async fn read(
        &self,
        subscription: Arc<str>,
        from: Offset,
        max: usize,
    ) -> Result<ReadBatch, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Read {
            subscription,
            from,
            max,
            reply,
        })?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// The records at `offsets` (sorted) that `subscription` has not settled, in order:
    /// what a dispatcher reads back for the messages it parked (`delivery::dispatcher`).
    pub async fn read_at(
        &self,
        subscription: Arc<str>,
        offsets: Vec<Offset>,
    ) -> Result<Vec<(Offset, StoredMessage)>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ReadAt {
            subscription,
            offsets,
            reply,
        })?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Where `subscription` resumes: every offset below is settled.
    pub async fn cursor(&self, subscription: Arc<str>) -> Result<Option<Offset>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Cursor {
            subscription,
            reply,
        })?;
        rx.await.map_err(|_| self.stopped())
    }

    /// How many records below `below` `subscription` has not settled (for the restart log
    /// line; it walks them, so call it once, not per message).
    pub async fn unsettled_below(
        &self,
        subscription: Arc<str>,
        below: Offset,
    ) -> Result<u64, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Unsettled {
            subscription,
            below,
            reply,
        })?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Registers the subscriptions that must settle every record.
    pub fn set_subscriptions(&self, subscriptions: Vec<String>) {
        if self.send(Command::SetSubscriptions(subscriptions)).is_err() {
            tracing::warn!(topic = %self.topic, "store stopped before subscriptions were set");
        }
    }

    /// Makes everything durable now.
    pub async fn flush(&self) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Flush(reply))?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Which of `ids` this log stored and did not lose: unsettled (`Replicated` topics), or
    /// settled and still remembered by the dedup window. A re-learning producer takes back
    /// only the others.
    pub async fn holds(&self, ids: Vec<String>) -> Result<Vec<bool>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Holds { ids, reply })?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Every record some subscription in `subscriptions` has not settled, in offset order,
    /// each with those of `subscriptions` that have (what a stopping sidecar hands to a
    /// peer: the peer delivers it to the others only).
    pub async fn unsettled(
        &self,
        subscriptions: &[Arc<str>],
    ) -> Result<Vec<UnsettledRecord>, Error> {
        let mut all: std::collections::BTreeMap<Offset, (StoredMessage, Vec<&Arc<str>>)> =
            std::collections::BTreeMap::new();
        let written = *self.written.borrow();
        for sub in subscriptions {
            let mut from = self.cursor(sub.clone()).await?.unwrap_or(0);
            while from < written {
                let batch = self.read(sub.clone(), from, 1024).await?;
                if batch.next <= from {
                    break;
                }
                from = batch.next;
                for (o, m) in batch.records {
                    all.entry(o).or_insert_with(|| (m, Vec::new())).1.push(sub);
                }
            }
        }
        Ok(all
            .into_iter()
            .map(|(offset, (message, needed_by))| UnsettledRecord {
                offset,
                message,
                settled_by: settled_by(subscriptions, &needed_by),
            })
            .collect())
    }

    /// Watches the offset below which records may be delivered: the high watermark (see
    /// the module documentation), not the end of the log.
    pub fn watch_written(&self) -> watch::Receiver<Offset> {
        self.written.clone()
    }

    fn stopped(&self) -> Error {
        Error::Internal(format!(
            "the store of {} stopped while answering",
            self.topic
        ))
    }

    /// Flushes and stops the thread (after every handle's commands are handled).
    pub async fn close(self: &Arc<Self>) {
        if let Err(e) = self.flush().await {
            tracing::error!(topic = %self.topic, error = %e, "final flush failed");
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            // The thread exits when every sender is gone; we only wait if it already is.
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

/// The subscriptions of `all` that are not in `needed_by`.
fn settled_by(all: &[Arc<str>], needed_by: &[&Arc<str>]) -> Vec<Arc<str>> {
    all.iter()
        .filter(|s| !needed_by.contains(s))
        .cloned()
        .collect()
}
