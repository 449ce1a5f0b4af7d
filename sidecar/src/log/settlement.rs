//! Per-subscription settlement state: which offsets each subscription has settled.
//!
//! Each subscription keeps a *cursor* (every offset below it is settled) plus the offsets
//! settled above the cursor, as ranges (`ranges.rs`): acks arrive nearly in order, so a
//! message stuck for minutes (nacked with a delay, retried, or waiting for a member in its
//! zone) while thousands after it are acked costs two ranges, not thousands of entries.
//! The log's `acknowledged` offset is the minimum cursor over all subscriptions; a record
//! is *settled by all* when every subscription settled it, wherever the cursors are, which
//! is what the backlog counts (Pulsar's individual acks) and what compaction may remove.
//!
//! Two kinds of offsets count as settled for every subscription: *lost* ones (corrupt
//! records, reported) and *gone* ones (records compaction removed once every subscription
//! had settled them; a subscription registered later must not wait for them).
//!
//! This module is pure in-memory state shared by `MemoryLog` and `DiskLog`; the durable
//! form (a file of settlement records replayed on open) lives in `settlement_store.rs`.

use std::collections::BTreeMap;
use std::ops::Range;

use super::ranges::RangeSet;
use super::{LogError, Offset};

/// One subscription's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    /// Every offset below this one is settled.
    cursor: Offset,
    /// Offsets at or above `cursor` that are settled (the out-of-order window).
    above: RangeSet,
}

/// What a settlement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The subscription had settled it already (or it is lost or gone).
    Before,
    /// Newly settled; another subscription still holds it.
    Now,
    /// Newly settled, and now settled by every subscription.
    NowByAll,
}

impl Settled {
    /// Whether the settlement was new (and must be made durable).
    pub fn is_new(self) -> bool {
        self != Self::Before
    }
}

/// Settlement state of one log.
///
/// A subscription registered after messages were written starts at the log's
/// `acknowledged` offset at registration time, not at the end of the log: it therefore
/// sees every message that some other subscription still holds, including those written
/// before it existed, and never resurrects messages already settled by everyone whose
/// records are gone. With no subscription registered at all, nothing is settled and
/// `acknowledged` stays at its floor (the oldest stored offset), so messages published
/// before the first subscription appears are kept for it.
#[derive(Debug, Clone, Default)]
pub struct Settlements {
    subs: BTreeMap<String, Progress>,
    /// Offsets the log knows it lost (corrupt records). They count as settled for every
    /// subscription so that one bad record cannot block acknowledgement (and hence
    /// compaction) forever; they are reported, never hidden.
    lost: RangeSet,
    /// Offsets whose records compaction removed after every subscription settled them.
    gone: RangeSet,
    /// `acknowledged` when no subscription is registered; never moves backwards.
    floor: Offset,
}

impl Settlements {
    /// Empty state whose `acknowledged` offset starts at `floor` (the oldest stored offset).
    pub fn new(floor: Offset) -> Self {
        Self {
            floor,
            ..Self::default()
        }
    }

    /// Registers `name` with every offset below `cursor` settled. Returns false (and
    /// changes nothing) if it was already registered.
    pub fn register(&mut self, name: &str, cursor: Offset) -> bool {
        if self.subs.contains_key(name) {
            return false;
        }
        let mut progress = Progress {
            cursor,
            above: RangeSet::new(),
        };
        advance(&mut progress, &self.lost, &self.gone);
        self.subs.insert(name.to_owned(), progress);
        true
    }

    /// Removes `name`; returns whether it was registered.
    pub fn unregister(&mut self, name: &str) -> bool {
        // Raise the floor first: with the last subscription gone, `acknowledged` must not
        // fall back below what was already settled (those segments may be deleted).
        self.floor = self.acknowledged();
        self.subs.remove(name).is_some()
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.subs.contains_key(name)
    }

    /// Names of the registered subscriptions, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.subs.keys().map(String::as_str)
    }

    /// Whether any subscription is registered.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Marks `offset` settled for `name`.
    pub fn settle(&mut self, name: &str, offset: Offset) -> Result<Settled, LogError> {
        let forgotten = self.lost.contains(offset) || self.gone.contains(offset);
        let Some(progress) = self.subs.get_mut(name) else {
            return Err(LogError::UnknownSubscription {
                subscription: name.to_owned(),
            });
        };
        if forgotten || offset < progress.cursor {
            return Ok(Settled::Before);
        }
        if offset == progress.cursor {
            // In order, the common case: no range to build.
            progress.cursor += 1;
        } else if !progress.above.insert(offset) {
            return Ok(Settled::Before);
        }
        advance(progress, &self.lost, &self.gone);
        Ok(if self.settled_by_all(offset) {
            Settled::NowByAll
        } else {
            Settled::Now
        })
    }

    /// Marks every offset of `range` settled for `name` (replaying a snapshot). Returns
    /// false if `name` is not registered.
    pub fn settle_range(&mut self, name: &str, range: Range<Offset>) -> bool {
        let Some(progress) = self.subs.get_mut(name) else {
            return false;
        };
        let start = range.start.max(progress.cursor);
        if start < range.end {
            progress.above.insert_range(start..range.end);
            advance(progress, &self.lost, &self.gone);
        }
        true
    }

    /// Whether `name` has settled `offset` (known-lost and gone offsets count as settled).
    pub fn is_settled(&self, name: &str, offset: Offset) -> bool {
        self.subs
            .get(name)
            .is_some_and(|p| offset < p.cursor || p.above.contains(offset))
            || self.is_forgotten(offset)
    }

    /// Whether every registered subscription has settled `offset`. False when no
    /// subscription is registered, except for known-lost and gone offsets.
    pub fn settled_by_all(&self, offset: Offset) -> bool {
        if self.is_forgotten(offset) {
            return true;
        }
        !self.subs.is_empty()
            && self
                .subs
                .values()
                .all(|p| offset < p.cursor || p.above.contains(offset))
    }

    /// `name`'s cursor: every offset below it is settled by `name`.
    pub fn cursor(&self, name: &str) -> Option<Offset> {
        self.subs.get(name).map(|p| p.cursor)
    }

    /// The ranges `name` settled above its cursor (for snapshots).
    pub fn settled_above(&self, name: &str) -> impl Iterator<Item = Range<Offset>> + '_ {
        self.subs.get(name).into_iter().flat_map(|p| p.above.iter())
    }

    /// The parts of `within` that `name` has not settled (lost and gone offsets count as
    /// settled); all of `within` if `name` is not registered.
    pub fn unsettled_within(&self, name: &str, within: Range<Offset>) -> Vec<Range<Offset>> {
        let Some(p) = self.subs.get(name) else {
            return vec![within];
        };
        let start = within.start.max(p.cursor);
        if start >= within.end {
            return Vec::new();
        }
        p.above
            .gaps(start..within.end)
            .into_iter()
            .flat_map(|g| self.lost.gaps(g))
            .flat_map(|g| self.gone.gaps(g))
            .collect()
    }

    /// Whether every subscription has settled something at or after `end - 1`: its
    /// consumer has moved past `..end`, so what it left unsettled there is held back
    /// (delayed, retried, waiting for a member), not merely not yet read. False with no
    /// subscription.
    pub fn passed(&self, end: Offset) -> bool {
        !self.subs.is_empty()
            && self
                .subs
                .values()
                .all(|p| p.cursor.max(p.above.last_end().unwrap_or(0)) >= end)
    }

    /// Minimum cursor over all subscriptions, ignoring the floor; `None` without any.
    pub fn min_cursor(&self) -> Option<Offset> {
        self.subs.values().map(|p| p.cursor).min()
    }

    /// Minimum cursor over all subscriptions, or the floor when there are none.
    pub fn acknowledged(&self) -> Offset {
        self.subs
            .values()
            .map(|p| p.cursor)
            .min()
            .map_or(self.floor, |min| min.max(self.floor))
    }

    /// Treats every offset below `first` as settled by everyone: used when the oldest
    /// records are gone (dropped by a memory log's retention, or deleted segments).
    pub fn advance_all_to(&mut self, first: Offset) {
        self.floor = self.floor.max(first);
        for progress in self.subs.values_mut() {
            if progress.cursor < first {
                progress.cursor = first;
                progress.above.remove_below(first);
                advance(progress, &self.lost, &self.gone);
            }
        }
    }

    /// Records that the offsets in `range` are lost (corrupt): they count as settled.
    pub fn mark_lost(&mut self, range: Range<Offset>) {
        if range.is_empty() {
            return;
        }
        self.lost.insert_range(range);
        self.advance_everyone();
    }

    /// Records that compaction removed the records of `range`, which every subscription
    /// had settled: they count as settled, also for subscriptions registered later.
    pub fn mark_gone(&mut self, range: Range<Offset>) {
        if range.is_empty() {
            return;
        }
        self.gone.insert_range(range);
        self.advance_everyone();
    }

    /// Forgets gone ranges below `acknowledged()`: every cursor is past them, and a
    /// subscription registered later starts there.
    pub fn prune_gone(&mut self) {
        let ack = self.acknowledged();
        self.gone.remove_below(ack);
    }

    fn advance_everyone(&mut self) {
        for progress in self.subs.values_mut() {
            advance(progress, &self.lost, &self.gone);
        }
    }

    /// Known-lost offset ranges, sorted.
    pub fn lost_ranges(&self) -> Vec<Range<Offset>> {
        self.lost.iter().collect()
    }

    /// Gone offset ranges, sorted.
    pub fn gone_ranges(&self) -> impl Iterator<Item = Range<Offset>> + '_ {
        self.gone.iter()
    }

    /// Number of ranges held for `name` and for gone offsets (what a snapshot writes).
    pub fn snapshot_entries(&self) -> u64 {
        let subs: usize = self.subs.values().map(|p| 1 + p.above.ranges()).sum();
        (subs + self.gone.ranges()) as u64
    }

    /// Whether `offset` is known lost.
    pub fn is_lost(&self, offset: Offset) -> bool {
        self.lost.contains(offset)
    }

    fn is_forgotten(&self, offset: Offset) -> bool {
        self.lost.contains(offset) || self.gone.contains(offset)
    }
}

/// Moves the cursor over settled, lost and gone offsets.
fn advance(progress: &mut Progress, lost: &RangeSet, gone: &RangeSet) {
    loop {
        let next = match progress.above.first() {
            Some(r) if r.start <= progress.cursor => Some(r.end),
            _ => lost
                .range_of(progress.cursor)
                .or_else(|| gone.range_of(progress.cursor))
                .map(|r| r.end),
        };
        match next {
            Some(end) if end > progress.cursor => {
                progress.cursor = end;
                progress.above.remove_below(end);
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_advances_over_out_of_order_settlements() -> Result<(), LogError> {
        let mut s = Settlements::new(0);
        s.register("a", 0);
        s.settle("a", 2)?;
        s.settle("a", 1)?;
        assert_eq!(s.cursor("a"), Some(0));
        assert!(s.is_settled("a", 2));
        s.settle("a", 0)?;
        assert_eq!(s.cursor("a"), Some(3));
        assert_eq!(s.settled_above("a").count(), 0);
        assert_eq!(s.settle("a", 1)?, Settled::Before);
        Ok(())
    }

    #[test]
    fn acknowledged_is_min_cursor_and_new_subscription_starts_there() -> Result<(), LogError> {
        let mut s = Settlements::new(0);
        assert_eq!(s.acknowledged(), 0);
        s.register("a", s.acknowledged());
        s.register("b", s.acknowledged());
        for o in 0..5 {
            s.settle("a", o)?;
        }
        for o in 0..3 {
            s.settle("b", o)?;
        }
        assert_eq!(s.acknowledged(), 3);
        s.register("c", s.acknowledged());
        assert_eq!(s.cursor("c"), Some(3));
        assert!(s.settled_by_all(2));
        assert!(!s.settled_by_all(3));
        s.unregister("a");
        s.unregister("b");
        s.unregister("c");
        assert_eq!(
            s.acknowledged(),
            3,
            "floor keeps acknowledged from moving back"
        );
        Ok(())
    }

    #[test]
    fn lost_offsets_count_as_settled() -> Result<(), LogError> {
        let mut s = Settlements::new(0);
        s.register("a", 0);
        s.mark_lost(1..4);
        s.settle("a", 0)?;
        assert_eq!(s.cursor("a"), Some(4));
        assert!(s.is_settled("a", 2));
        assert!(matches!(
            s.settle("nope", 0),
            Err(LogError::UnknownSubscription { .. })
        ));
        Ok(())
    }

    #[test]
    fn advance_all_drops_old_window() {
        let mut s = Settlements::new(0);
        s.register("a", 0);
        let _ = s.settle("a", 5);
        let _ = s.settle("a", 12);
        s.advance_all_to(10);
        assert_eq!(s.cursor("a"), Some(10));
        assert_eq!(s.settled_above("a").collect::<Vec<_>>(), vec![12..13]);
        assert_eq!(s.acknowledged(), 10);
    }

    #[test]
    fn a_stuck_offset_costs_ranges_not_entries() -> Result<(), LogError> {
        let mut s = Settlements::new(0);
        s.register("a", 0);
        s.register("b", 0);
        for o in 1..100_000 {
            assert_eq!(s.settle("a", o)?, Settled::Now);
            assert_eq!(s.settle("b", o)?, Settled::NowByAll);
        }
        assert_eq!(s.acknowledged(), 0);
        assert_eq!(
            s.snapshot_entries(),
            4,
            "a cursor and one range per subscription"
        );
        assert!(s.settled_by_all(99_999) && !s.settled_by_all(0));
        assert!(s.passed(100_000) && !s.passed(100_001));
        s.settle("a", 0)?;
        assert_eq!(s.settle("b", 0)?, Settled::NowByAll);
        assert_eq!(s.acknowledged(), 100_000);
        Ok(())
    }

    #[test]
    fn gone_offsets_are_settled_for_later_subscriptions() -> Result<(), LogError> {
        let mut s = Settlements::new(0);
        s.register("a", 0);
        for o in 1..10 {
            s.settle("a", o)?;
        }
        s.mark_gone(1..10);
        s.register("late", s.acknowledged());
        assert_eq!(s.cursor("late"), Some(0));
        assert!(s.is_settled("late", 5) && !s.is_settled("late", 0));
        assert_eq!(s.unsettled_within("late", 0..12), vec![0..1, 10..12]);
        assert_eq!(s.settle("late", 5)?, Settled::Before);
        s.settle("a", 0)?;
        s.settle("late", 0)?;
        assert_eq!(s.acknowledged(), 10);
        s.prune_gone();
        assert_eq!(s.gone_ranges().count(), 0);
        Ok(())
    }
}
