//! Compaction of a `DiskLog`: deleting the oldest segments.
//!
//! Only a prefix of the sealed segments is ever deleted, oldest first, so the offsets on
//! disk stay one contiguous run of segments plus the relocated records below it. The
//! oldest sealed segment goes when:
//!
//! - nothing in it is live (every subscription settled every record, in any order); or
//! - few of its bytes are live (at most half) and every subscription has settled something
//!   after it: its consumers moved on, and what they left is held back (a nack with a long
//!   delay, a message retried for a long time, one waiting for a member in its zone), not
//!   merely unread. Those records are copied into `relocated.dat` first, with their
//!   offsets, so one stuck message keeps its own bytes on disk and not its segment. A
//!   segment a slow consumer has not reached is never copied: that would rewrite the
//!   backlog instead of freeing it.
//!
//! Order, for crash safety (see `relocated.rs`): the copies are fsynced; the settlement file
//! records everything else of the segment as gone and is fsynced; then the file is deleted.

use std::ops::Range;

use super::disk::DiskLog;
use super::{LogError, Offset};

impl DiskLog {
    pub(super) fn compact_segments(&mut self) -> Result<u64, LogError> {
        let max_len = self.config.max_record_bytes - 8;
        let mut doomed: Vec<Offset> = Vec::new();
        let mut copies: Vec<(Offset, Vec<u8>)> = Vec::new();
        let mut unreadable: Vec<(Offset, String)> = Vec::new();
        for (&base, seg) in &self.sealed {
            if seg.live() > 0 {
                if seg.live() * 2 > seg.len() || !self.settlements.passed(seg.next()) {
                    break;
                }
                for offset in base..seg.next() {
                    if seg.record_len(offset).is_none() || self.settlements.settled_by_all(offset) {
                        continue;
                    }
                    match seg.raw(offset, max_len)? {
                        Ok(bytes) => copies.push((offset, bytes)),
                        Err(reason) => unreadable.push((offset, reason)),
                    }
                }
            }
            doomed.push(base);
        }
        for (offset, reason) in unreadable {
            tracing::error!(offset, %reason, "record failed verification while being carried forward; reported lost");
            self.discount(offset);
            self.settlements.mark_lost(offset..offset + 1);
        }
        let mut freed = 0;
        if !doomed.is_empty() {
            if !copies.is_empty() {
                tracing::debug!(records = copies.len(), "carrying unsettled records forward");
                self.relocated.append(&copies)?;
                self.relocated.sync().map_err(|e| self.fail(e))?;
            }
            let mut carried = copies.iter().map(|(o, _)| *o).peekable();
            for base in &doomed {
                let next = self.sealed.get(base).map_or(*base, |s| s.next());
                for range in without(*base..next, &mut carried) {
                    self.store.gone(range.clone())?;
                    self.settlements.mark_gone(range);
                }
            }
            // Settlements first: never delete data whose settlement could still be lost.
            self.store.sync().map_err(|e| self.fail(e))?;
            for base in doomed {
                if let Some(segment) = self.sealed.remove(&base) {
                    // Its live bytes, if any, were carried forward and count there now.
                    freed += segment.file_size();
                    tracing::debug!(path = %segment.path().display(), "deleting settled segment");
                    self.reaper.delete(segment.path().to_path_buf());
                }
            }
            self.settlements.prune_gone();
        }
        if self.relocated.wants_rewrite() {
            freed += self.rewrite_relocated()?;
        }
        if self.store.wants_rewrite(&self.settlements) {
            self.store
                .rewrite(&self.settlements)
                .map_err(|e| self.fail(e))?;
        }
        Ok(freed)
    }
}

impl DiskLog {
    /// Rewrites `relocated.dat` without the records every subscription settled. They are
    /// recorded as gone first, as for a deleted segment, so that a subscription registered
    /// later does not wait for them and recovery does not take them for lost.
    fn rewrite_relocated(&mut self) -> Result<u64, LogError> {
        let mut dropped = super::ranges::RangeSet::new();
        for o in self.relocated.offsets() {
            if self.settlements.settled_by_all(o) {
                dropped.insert(o);
            }
        }
        for range in dropped.iter() {
            self.store.gone(range)?;
        }
        self.store.sync().map_err(|e| self.fail(e))?;
        for range in dropped.iter() {
            self.settlements.mark_gone(range);
        }
        let before = self.relocated.file_len();
        let settlements = &self.settlements;
        let keep = |o: Offset| !settlements.settled_by_all(o);
        let rewritten = self.relocated.rewrite(&keep);
        rewritten.map_err(|e| self.fail(e))?;
        self.settlements.prune_gone();
        Ok(before.saturating_sub(self.relocated.file_len()))
    }
}

/// `range` without the offsets `carried` yields inside it (sorted), as ranges.
fn without(
    range: Range<Offset>,
    carried: &mut std::iter::Peekable<impl Iterator<Item = Offset>>,
) -> Vec<Range<Offset>> {
    let mut out = Vec::new();
    let mut at = range.start;
    while let Some(&o) = carried.peek() {
        if o >= range.end {
            break;
        }
        carried.next();
        if o > at {
            out.push(at..o);
        }
        at = o + 1;
    }
    if at < range.end {
        out.push(at..range.end);
    }
    out
}
