//! The backlog of a `DiskLog`: bytes of the records some subscription has not settled,
//! kept per segment (and for `relocated.dat`) as records are appended and settled, so that
//! `backlog_bytes` costs nothing per publish and compaction knows at once how much of a
//! segment is still live. Rebuilt from the settlement state on open and when the
//! subscriptions change.

use std::ops::Range;

use super::disk::DiskLog;
use super::relocated::Relocated;
use super::settlement::Settlements;
use super::{Log, Offset};

impl DiskLog {
    /// Takes the record at `offset` out of the backlog: every subscription settled it (or
    /// it is lost).
    pub(super) fn discount(&mut self, offset: Offset) {
        if offset < self.dense_first() {
            if let Some(len) = self.relocated.record_len(offset) {
                let live = self.relocated.live().saturating_sub(len);
                self.relocated.set_live(live);
            }
        } else if offset >= self.active.base() {
            if let Some(len) = self.active.record_len(offset) {
                let live = self.active.live().saturating_sub(len);
                self.active.set_live(live);
            }
        } else if let Some((_, seg)) = self.sealed.range_mut(..=offset).next_back()
            && let Some(len) = seg.record_len(offset)
        {
            let live = seg.live().saturating_sub(len);
            seg.set_live(live);
        }
    }

    /// Recomputes every `live` count from the settlement state: after opening, and when
    /// the subscriptions changed (a new one holds what the others settled; a removed one
    /// held what only it had not). Walks the records above `acknowledged()` once.
    pub(super) fn recount(&mut self) {
        let ack = self.acknowledged();
        let s = &self.settlements;
        let count = |from: Offset, to: Offset, len: &dyn Fn(Offset) -> Option<u64>| -> u64 {
            (from.max(ack)..to)
                .filter(|o| !s.settled_by_all(*o))
                .filter_map(len)
                .sum()
        };
        let relocated: u64 = self
            .relocated
            .offsets()
            .filter(|o| !s.settled_by_all(*o))
            .filter_map(|o| self.relocated.record_len(o))
            .sum();
        self.relocated.set_live(relocated);
        for seg in self.sealed.values_mut() {
            let live = count(seg.base(), seg.next(), &|o| seg.record_len(o));
            seg.set_live(live);
        }
        let active = &self.active;
        let live = count(active.base(), active.next(), &|o| active.record_len(o));
        self.active.set_live(live);
    }

    /// Base of the oldest segment on disk (for tests).
    #[cfg(test)]
    pub(super) fn first_segment(&self) -> Offset {
        self.dense_first()
    }

    /// Base of the oldest segment on disk (relocated records are all below it).
    pub(super) fn dense_first(&self) -> Offset {
        self.sealed
            .keys()
            .next()
            .copied()
            .unwrap_or(self.active.base())
    }
}

/// Offsets below the first segment that some subscription has not settled but that no
/// relocated record holds: compaction carried them forward, and their copy did not survive.
pub(super) fn missing_relocated(
    settlements: &Settlements,
    relocated: &Relocated,
    dense_first: Offset,
) -> Vec<Range<Offset>> {
    // Before `advance_all_to`: the cursors as the settlement file left them.
    let Some(ack) = settlements.min_cursor().filter(|c| *c < dense_first) else {
        return Vec::new();
    };
    let mut gaps = Vec::new();
    let mut at = ack;
    for o in relocated
        .offsets()
        .filter(|o| (ack..dense_first).contains(o))
    {
        if o > at {
            gaps.push(at..o);
        }
        at = o + 1;
    }
    if at < dense_first {
        gaps.push(at..dense_first);
    }
    let mut missing = super::ranges::RangeSet::new();
    for gap in gaps {
        for name in settlements.names() {
            for r in settlements.unsettled_within(name, gap.clone()) {
                missing.insert_range(r);
            }
        }
    }
    missing.iter().collect()
}
