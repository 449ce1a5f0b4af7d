//! The sidecar's local log: one segmented, append-only log per topic.
//!
//! Layout of this module:
//! - `record.rs`: the on-disk record format (length, CRC-32C, offset, kind, body); public so
//!   that a fuzz target can reach the decoder.
//! - `segment.rs`: `ActiveSegment` (appendable) and `SealedSegment` (read-only), each with an
//!   offset index.
//! - `scan.rs`: verifying a segment's bytes and resynchronising after a corrupt region.
//! - `recovery.rs`: opening a directory's segments: torn-tail truncation, reporting of
//!   corruption, and the `RecoveryReport`.
//! - `disk.rs`: `DiskLog`, the segmented implementation with recovery and retention.
//! - `backlog.rs`: the backlog of a `DiskLog`, kept per segment as records settle.
//! - `compaction.rs`: deleting old segments, carrying their few unsettled records forward.
//! - `relocated.rs`: `relocated.dat`, where those carried records live.
//! - `ranges.rs`: offset sets kept as ranges (settled offsets, gone and lost ones).
//! - `memory.rs`: `MemoryLog`, for `Memory` topics and unit tests.
//! - `settlement.rs`: per-subscription settlement state (cursor + out-of-order ranges).
//! - `settlement_store.rs`: the settlement file that makes that state survive restarts.
//! - `io.rs`: I/O error context, directory fsync and failpoints (feature `failpoints`).
//! - `powerloss.rs`: a simulated disk that drops un-fsynced writes (feature `powerloss`).
//!
//! Offsets: every record gets a dense, increasing `Offset`. Three positions matter and are
//! kept apart on purpose: `written` (appended, perhaps only in the page cache), `durable`
//! (covered by an fsync, so the producer may be acked) and `acknowledged` (everything below
//! it is settled by every subscription). Above `acknowledged`, records are settled one by
//! one (individual acks): the backlog counts only those some subscription has not settled.

use std::ops::Range;

mod backlog;
mod compaction;
mod disk;
mod io;
mod memory;
pub mod powerloss;
mod ranges;
mod reaper;
pub mod record;
mod recovery;
mod relocated;
mod scan;
mod segment;
mod settlement;
mod settlement_store;

#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod disk_tests;
#[cfg(test)]
mod recovery_tests;

pub use disk::{DiskLog, DiskLogConfig};
pub use memory::{MemoryLog, MemoryRetention};
pub use recovery::{CorruptRegion, RecoveryReport, Truncation};
pub use settlement::Settlements;

pub type Offset = u64;

/// A stored message as the log sees it: everything needed to deliver it again after a
/// restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: bytes::Bytes,
    /// Publish time, milliseconds since the Unix epoch (informational; never used for timers).
    pub publish_time_ms: u64,
    /// Per-key sequence number for ordered topics, 0 otherwise.
    pub key_sequence: u64,
    /// Time-to-live in milliseconds from publish, 0 = none.
    pub ttl_ms: u64,
    /// Delay before first delivery in milliseconds, 0 = none.
    pub delay_ms: u64,
}

/// What happened to a message for one subscription, recorded durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The consuming app acked it.
    Acked,
    /// Moved to the dead-letter topic after `maxDeliveries`.
    DeadLettered,
    /// Dropped (AtMostOnce delivery attempted, TTL expired with no dead-letter topic, ...).
    Dropped,
}

/// Errors of the log, named for what failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O failed during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backlog full: {limit} (undelivered {current} bytes)")]
    BacklogFull { limit: String, current: u64 },
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("offset {offset} is not in the log (first {first}, next {next})")]
    OffsetOutOfRange {
        offset: Offset,
        first: Offset,
        next: Offset,
    },
    #[error("corrupt record at {path}:{position}: {reason}")]
    Corrupt {
        path: std::path::PathBuf,
        position: u64,
        reason: String,
    },
    #[error("subscription {subscription:?} is not registered with this log")]
    UnknownSubscription { subscription: String },
    #[error("the log was abandoned after an earlier fsync failure; restart to recover")]
    Poisoned,
}

/// A topic's log. Synchronous on purpose: callers run it on a dedicated blocking thread and
/// batch appends so that one `sync` (fsync) covers many messages (group commit).
pub trait Log: Send + std::fmt::Debug {
    /// Appends records; they are `written` but not necessarily durable. Returns their offsets.
    fn append(&mut self, messages: &[StoredMessage]) -> Result<Range<Offset>, LogError>;
    /// Makes everything written so far durable (fsync). A no-op for memory logs.
    fn sync(&mut self) -> Result<(), LogError>;
    /// Reads up to `max` records starting at `from` (inclusive), skipping offsets settled by
    /// every subscription and known-lost offsets. `from` below `first()` starts at `first()`;
    /// `from` beyond `written()` is `OffsetOutOfRange`. Callers filter per subscription with
    /// `is_settled`.
    fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, StoredMessage)>, LogError>;
    /// Records that `subscription` settled `offset`. Durable at the next `sync`. Fails with
    /// `UnknownSubscription` if it is not registered, `OffsetOutOfRange` if not yet written.
    fn settle(
        &mut self,
        subscription: &str,
        offset: Offset,
        how: Settlement,
    ) -> Result<(), LogError>;
    /// Whether `subscription` has settled `offset`.
    fn is_settled(&self, subscription: &str, offset: Offset) -> bool;
    /// Registers the subscriptions that must settle every record; records are kept until
    /// all of them have. Subscriptions missing from the list are removed. A newly registered
    /// subscription starts at `acknowledged()`: it sees every record some other subscription
    /// still holds, including those written before it existed (with no subscription at
    /// all, nothing is acknowledged, so it sees everything still stored).
    fn set_subscriptions(&mut self, subscriptions: &[String]) -> Result<(), LogError>;
    /// Frees what every subscription has settled: sealed segments holding nothing else are
    /// deleted, and a segment whose few unsettled records are held back while consumers
    /// moved on has them carried forward first (same offsets), then is deleted. Returns
    /// bytes freed.
    fn compact(&mut self) -> Result<u64, LogError>;
    /// Next offset to be written.
    fn written(&self) -> Offset;
    /// Everything below this offset is durable.
    fn durable(&self) -> Offset;
    /// Everything below this offset is settled by every subscription.
    fn acknowledged(&self) -> Offset;
    /// The backlog: bytes of the records that some subscription has not settled (their
    /// on-disk record size), wherever they are. Records settled by every subscription out of
    /// order do not count, even while a stuck record below them keeps `acknowledged()` back
    /// (Pulsar's individual acks). The union over subscriptions, not their maximum: it is
    /// what this sidecar must keep for them. Cheap: called for every publish request.
    fn backlog_bytes(&self) -> u64;
    /// Oldest offset still stored; reads from below it start here.
    fn first(&self) -> Offset;
    /// Every offset below the returned one is settled by `subscription`; `None` if it is not
    /// registered. After a restart, a subscription resumes reading here.
    fn cursor(&self, subscription: &str) -> Option<Offset>;
    /// Offsets the log knows it lost (corrupt records found by recovery or on read). They
    /// are never returned by `read`, count as settled, and are reported, never hidden.
    fn lost(&self) -> Vec<Range<Offset>> {
        Vec::new()
    }
    /// Whether an fsync failed: the log then refuses appends, reads and settlements until
    /// the sidecar restarts (see `disk.rs`).
    fn poisoned(&self) -> bool {
        false
    }
    /// After a failed fsync: forgets every record at or above `durable()`, in memory and in
    /// the file, so that nothing a publisher was refused comes back after a restart.
    /// Returns how many records were dropped. A no-op for logs that never sync.
    fn discard_unsynced(&mut self) -> Result<u64, LogError> {
        Ok(0)
    }
    /// Records dropped unsettled by retention (`Memory` topics that drop the oldest).
    fn dropped(&self) -> u64 {
        0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::StoredMessage;

    /// xorshift64*: a seeded, dependency-free generator so that randomized tests are
    /// reproducible (each prints its seed).
    #[derive(Debug)]
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed.max(1))
        }

        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A small test message whose size does not depend on `i`'s value below 10.
    pub(crate) fn msg(i: u64) -> StoredMessage {
        StoredMessage {
            id: format!("m{i:08}"),
            key: Some("k".into()),
            headers: vec![("h".into(), "v".into())],
            payload: bytes::Bytes::from(format!("payload-{i:08}")),
            publish_time_ms: i,
            key_sequence: 0,
            ttl_ms: 0,
            delay_ms: 0,
        }
    }
}
