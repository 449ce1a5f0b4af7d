//! `DiskLog`: a directory of segment files plus a settlement file.
//!
//! - `append` encodes the whole batch into one reused buffer and writes it with one
//!   positional write; nothing is allocated per byte and there is one syscall per batch.
//! - `sync` fdatasyncs the active segment, then writes and fdatasyncs the settlement file.
//!   Callers append many batches and sync once: that is the group commit.
//! - After any fsync error the log is *poisoned*: every later call fails with
//!   `LogError::Poisoned`. Linux may drop dirty pages after a failed writeback and report
//!   success on the next fsync, so retrying could ack data that is gone (PostgreSQL's
//!   "fsyncgate"; docs/reliability.md row 10). Restarting re-reads what is really on disk.
//! - A batch never straddles segments: the roll happens before it, so an append is all or
//!   nothing. A segment can therefore exceed `segment_bytes` by up to one batch.
//! - The backlog is the bytes of records some subscription has not settled, counted per
//!   segment (`live`) as records are appended and settled, wherever they sit: one stuck
//!   record counts its own bytes, not those of everything after it.
//! - Compaction (`compaction.rs`) deletes the oldest segments once they hold nothing live,
//!   or once the few records left in them are held back while consumers moved on; those
//!   are carried forward into `relocated.dat` (`relocated.rs`) with their offsets.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::io::{io_err, sync_dir};
use super::reaper::Reaper;
use super::record::{self, message_record_len};
use super::recovery::{self, CorruptRegion, Recovered, RecoveryReport};
use super::relocated::Relocated;
use super::segment::{ActiveSegment, CUT_BACK, SealedSegment};
use super::settlement::{Settled, Settlements};
use super::settlement_store::SettlementStore;
use super::{Log, LogError, Offset, Settlement, StoredMessage};

/// Tuning of a `DiskLog`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLogConfig {
    /// Roll to a new segment once the active one would exceed this many bytes. Clamped to
    /// 4 KiB ..= 1 GiB (segment positions are 32-bit).
    pub segment_bytes: u64,
    /// Largest record, header included. Clamped to 1 KiB ..= 64 MiB. The default leaves
    /// room for the largest payload the API accepts (4 MiB) plus id, key and headers.
    pub max_record_bytes: u32,
    /// The topic's `retention.maxBytes`: appends that would push the backlog (bytes of the
    /// records some subscription has not settled) past it fail with `LogError::BacklogFull`.
    pub max_backlog_bytes: Option<u64>,
}

impl Default for DiskLogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_record_bytes: 8 << 20,
            max_backlog_bytes: None,
        }
    }
}

/// A durable, segmented log in one directory. See the module documentation.
#[derive(Debug)]
pub struct DiskLog {
    pub(super) dir: PathBuf,
    pub(super) config: DiskLogConfig,
    pub(super) sealed: BTreeMap<Offset, SealedSegment>,
    pub(super) active: ActiveSegment,
    /// Unsettled records of deleted segments, carried forward by compaction.
    pub(super) relocated: Relocated,
    pub(super) settlements: Settlements,
    pub(super) store: SettlementStore,
    durable: Offset,
    poisoned: bool,
    /// Offsets whose records failed verification on read (after open); merged into
    /// `settlements` as lost at the next `&mut self` call.
    read_lost: Mutex<Vec<Offset>>,
    /// Reused encoding buffer and record starts within it.
    batch: Vec<u8>,
    starts: Vec<u32>,
    /// Deletes settled segment files off the appending thread (`reaper.rs`).
    pub(super) reaper: Reaper,
}

impl DiskLog {
    /// Opens the log in `dir` (creating it if needed), recovering from a crash: a torn
    /// tail of the last segment is truncated, corruption elsewhere is reported and the
    /// records after it kept. See `recovery.rs`.
    pub fn open(
        dir: impl AsRef<Path>,
        config: DiskLogConfig,
    ) -> Result<(Self, RecoveryReport), LogError> {
        let dir = dir.as_ref().to_path_buf();
        let config = DiskLogConfig {
            segment_bytes: config.segment_bytes.clamp(4 << 10, 1 << 30),
            max_record_bytes: config.max_record_bytes.clamp(1 << 10, 64 << 20),
            ..config
        };
        let max_len = config.max_record_bytes - 8;
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_err("create log directory", &dir))?;
            // The new directory's own entry must survive a power loss too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let Recovered {
            sealed,
            active,
            mut report,
        } = recovery::recover_segments(&dir, max_len)?;
        let dense_first = sealed.keys().next().copied().unwrap_or(active.base());
        let (mut relocated, moved) = Relocated::open(&dir, max_len)?;
        relocated.retain_below(dense_first);
        report.relocated_truncated_bytes = moved.truncated_bytes;
        report.relocated_corrupt_regions = moved.corrupt_regions;
        let first = relocated
            .first()
            .map_or(dense_first, |r| r.min(dense_first));
        let mut settlements = Settlements::new(first);
        let (store, replay) = SettlementStore::open(&dir, &mut settlements, active.next())?;
        report.settlement_truncated_bytes = replay.truncated_bytes;
        report.settlement_corrupt_records = replay.corrupt_records;
        for missing in super::backlog::missing_relocated(&settlements, &relocated, dense_first) {
            tracing::error!(lost = ?missing, path = %relocated.path().display(),
                "unsettled records carried forward by compaction are missing; reported lost");
            report.corrupt.push(CorruptRegion {
                path: relocated.path().to_path_buf(),
                position: 0,
                bytes: 0,
                lost: missing,
                reason: "an unsettled record carried forward by compaction is missing".into(),
            });
        }
        settlements.advance_all_to(first);
        for range in report.lost() {
            settlements.mark_lost(range);
        }
        let durable = active.next();
        let reaper = Reaper::start(&dir.file_name().unwrap_or_default().to_string_lossy())
            .map_err(io_err("start the segment reaper", &dir))?;
        let mut log = Self {
            dir,
            config,
            sealed,
            active,
            relocated,
            settlements,
            store,
            durable,
            poisoned: false,
            reaper,
            read_lost: Mutex::new(Vec::new()),
            batch: Vec::new(),
            starts: Vec::new(),
        };
        log.recount();
        Ok((log, report))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of segment files, the active one included.
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// Whether an fsync failed; the log then refuses everything until reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn check_poisoned(&self) -> Result<(), LogError> {
        if self.poisoned {
            Err(LogError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the log if `e` is an fsync failure (or a failed write that could not be cut
    /// back), then passes `e` on.
    pub(super) fn fail(&mut self, e: LogError) -> LogError {
        let poisons = ["fsync", "fsync directory", CUT_BACK];
        if matches!(&e, LogError::Io { op, .. } if poisons.contains(op)) {
            tracing::error!(error = %e, "the log is poisoned until restart");
            self.poisoned = true;
        }
        e
    }

    /// Moves offsets found corrupt by `read` into the settlement state as lost.
    fn merge_read_lost(&mut self) {
        let lost = match self.read_lost.get_mut() {
            Ok(v) => std::mem::take(v),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for offset in lost {
            if !self.settlements.settled_by_all(offset) {
                self.discount(offset);
            }
            self.settlements.mark_lost(offset..offset + 1);
        }
    }

    fn read_lost_snapshot(&self) -> Vec<Offset> {
        match self.read_lost.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Seals the active segment and starts a new one at the next offset.
    pub(super) fn roll(&mut self) -> Result<(), LogError> {
        self.active.sync().map_err(|e| self.fail(e))?;
        self.durable = self.active.next();
        let fresh = ActiveSegment::create(&self.dir, self.active.next())?;
        sync_dir(&self.dir).map_err(|e| self.fail(e))?;
        let old = std::mem::replace(&mut self.active, fresh);
        let sealed = old.seal().map_err(|e| self.fail(e))?;
        self.sealed.insert(sealed.base(), sealed);
        Ok(())
    }
}

impl Log for DiskLog {
    fn append(&mut self, messages: &[StoredMessage]) -> Result<Range<Offset>, LogError> {
        self.check_poisoned()?;
        let start = self.active.next();
        if messages.is_empty() {
            return Ok(start..start);
        }
        let limit = self.config.max_record_bytes as usize;
        let mut total = 0u64;
        for m in messages {
            let size = message_record_len(m);
            if size > limit {
                return Err(LogError::RecordTooLarge { size, limit });
            }
            total += size as u64;
        }
        if let Some(max) = self.config.max_backlog_bytes {
            let current = self.backlog_bytes();
            if current.saturating_add(total) > max {
                return Err(LogError::BacklogFull {
                    limit: format!("retention.maxBytes = {max} bytes"),
                    current,
                });
            }
        }
        if self.active.len() > 0 && self.active.len() + total > self.config.segment_bytes {
            self.roll()?;
        }
        self.batch.clear();
        self.starts.clear();
        self.batch.reserve(total as usize);
        let max_len = self.config.max_record_bytes - 8;
        for (offset, m) in (start..).zip(messages) {
            self.starts.push(self.batch.len() as u32);
            record::encode_message(&mut self.batch, offset, m, max_len)?;
        }
        self.active
            .append(&self.batch, &self.starts)
            .map_err(|e| self.fail(e))?;
        let live = self.active.live() + total;
        self.active.set_live(live);
        if self.batch.capacity() > 4 * self.config.segment_bytes.min(16 << 20) as usize {
            self.batch = Vec::new(); // don't keep a huge one-off batch buffer around
        }
        Ok(start..self.active.next())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        self.merge_read_lost();
        self.active.sync().map_err(|e| self.fail(e))?;
        self.durable = self.active.next();
        self.store.sync().map_err(|e| self.fail(e))
    }

    fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, StoredMessage)>, LogError> {
        self.check_poisoned()?;
        let next = self.active.next();
        if from > next {
            return Err(LogError::OffsetOutOfRange {
                offset: from,
                first: self.first(),
                next,
            });
        }
        let start = from.max(self.first());
        let read_lost = self.read_lost_snapshot();
        let skip = |o: Offset| self.settlements.settled_by_all(o) || read_lost.contains(&o);
        let max_len = self.config.max_record_bytes - 8;
        let mut raw = Vec::new();
        let dense_first = self.dense_first();
        if start < dense_first {
            self.relocated
                .read(start, dense_first, max, &skip, max_len, &mut raw)?;
        }
        let from_base = self
            .sealed
            .range(..=start)
            .next_back()
            .map_or(start, |(b, _)| *b);
        for seg in self.sealed.range(from_base..).map(|(_, s)| s) {
            if raw.len() >= max {
                break;
            }
            seg.read(start, max, &skip, max_len, &mut raw)?;
        }
        if raw.len() < max {
            self.active.read(start, max, &skip, max_len, &mut raw)?;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut newly_lost = Vec::new();
        for (offset, outcome) in raw {
            match outcome {
                Ok(m) => out.push((offset, m)),
                Err(reason) => {
                    tracing::error!(offset, %reason, "record failed verification on read; reported lost");
                    newly_lost.push(offset);
                }
            }
        }
        if !newly_lost.is_empty() {
            match self.read_lost.lock() {
                Ok(mut v) => v.extend(newly_lost),
                Err(poisoned) => poisoned.into_inner().extend(newly_lost),
            }
        }
        Ok(out)
    }

    fn settle(
        &mut self,
        subscription: &str,
        offset: Offset,
        how: Settlement,
    ) -> Result<(), LogError> {
        self.check_poisoned()?;
        let next = self.active.next();
        if offset >= next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                first: self.first(),
                next,
            });
        }
        let settled = self.settlements.settle(subscription, offset)?;
        if settled == Settled::NowByAll {
            self.discount(offset);
        }
        if settled.is_new() {
            self.store.settle(subscription, offset, how)?;
        }
        Ok(())
    }

    fn is_settled(&self, subscription: &str, offset: Offset) -> bool {
        self.settlements.is_settled(subscription, offset)
    }

    fn set_subscriptions(&mut self, subscriptions: &[String]) -> Result<(), LogError> {
        self.check_poisoned()?;
        let ack = self.acknowledged();
        let mut changed = false;
        for name in subscriptions {
            if self.settlements.register(name, ack) {
                self.store.subscribe(name, ack)?;
                changed = true;
            }
        }
        let stale: Vec<String> = self
            .settlements
            .names()
            .filter(|n| !subscriptions.iter().any(|s| s == n))
            .map(str::to_owned)
            .collect();
        for name in stale {
            self.settlements.unregister(&name);
            self.store.unsubscribe(&name)?;
            changed = true;
        }
        if changed {
            self.recount();
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<u64, LogError> {
        self.check_poisoned()?;
        self.merge_read_lost();
        self.compact_segments()
    }

    fn written(&self) -> Offset {
        self.active.next()
    }

    fn durable(&self) -> Offset {
        self.durable
    }

    fn acknowledged(&self) -> Offset {
        self.settlements.acknowledged()
    }

    fn backlog_bytes(&self) -> u64 {
        self.sealed.values().map(SealedSegment::live).sum::<u64>()
            + self.active.live()
            + self.relocated.live()
    }

    fn first(&self) -> Offset {
        let dense = self.dense_first();
        self.relocated.first().map_or(dense, |r| r.min(dense))
    }

    fn cursor(&self, subscription: &str) -> Option<Offset> {
        self.settlements.cursor(subscription)
    }

    fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Works on a poisoned log on purpose: it is what a failed fsync calls for. Records
    /// below `durable` are all in sealed segments or the active one's synced part (a roll
    /// syncs the segment it seals), so only the active segment is cut.
    fn discard_unsynced(&mut self) -> Result<u64, LogError> {
        let dropped = self.active.truncate_to(self.durable)?;
        if dropped > 0 {
            // The cut records no longer count as backlog.
            self.recount();
            tracing::warn!(dir = %self.dir.display(), from = self.durable, dropped,
                "records whose fsync failed were cut from the log: their publishers were refused");
        }
        Ok(dropped)
    }

    fn lost(&self) -> Vec<Range<Offset>> {
        let mut lost = self.settlements.lost_ranges();
        lost.extend(self.read_lost_snapshot().into_iter().map(|o| o..o + 1));
        lost.sort_by_key(|r| r.start);
        lost
    }
}
