//! Per-subscription settlement state: which offsets each subscription has settled.
//!
//! Each subscription keeps a *cursor* (every offset below it is settled) plus the set of
//! offsets settled above the cursor. Settlements mostly arrive nearly in order, so the set
//! stays small: it only holds the out-of-order window (messages acked while an earlier one
//! is still in flight or being retried). The log's `acknowledged` offset is the minimum
//! cursor over all subscriptions, which is what decides when a segment may be deleted.
//!
//! This module is pure in-memory state shared by `MemoryLog` and `DiskLog`; the durable
//! form (a file of settlement records replayed on open) lives in `settlement_store.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{LogError, Offset};

/// One subscription's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    /// Every offset below this one is settled.
    cursor: Offset,
    /// Offsets at or above `cursor` that are settled (the out-of-order window).
    above: BTreeSet<Offset>,
}

/// Settlement state of one log.
///
/// A subscription registered after messages were written starts at the log's
/// `acknowledged` offset at registration time, not at the end of the log: it therefore
/// sees every message that some other subscription still holds, including those written
/// before it existed, and never resurrects messages already settled by everyone (their
/// segments may be gone). With no subscription registered at all, nothing is settled and
/// `acknowledged` stays at its floor (the oldest stored offset), so messages published
/// before the first subscription appears are kept for it.
#[derive(Debug, Clone, Default)]
pub struct Settlements {
    subs: BTreeMap<String, Progress>,
    /// Offsets the log knows it lost (corrupt records), `start -> end`. They count as
    /// settled for every subscription so that one bad record cannot block
    /// acknowledgement (and hence compaction) forever; they are reported, never hidden.
    lost: BTreeMap<Offset, Offset>,
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
            above: BTreeSet::new(),
        };
        advance(&mut progress, &self.lost);
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

    /// Marks `offset` settled for `name`. Returns whether it was newly settled.
    pub fn settle(&mut self, name: &str, offset: Offset) -> Result<bool, LogError> {
        let Some(progress) = self.subs.get_mut(name) else {
            return Err(LogError::UnknownSubscription {
                subscription: name.to_owned(),
            });
        };
        if offset < progress.cursor || !progress.above.insert(offset) {
            return Ok(false);
        }
        advance(progress, &self.lost);
        Ok(true)
    }

    /// Whether `name` has settled `offset` (known-lost offsets count as settled).
    pub fn is_settled(&self, name: &str, offset: Offset) -> bool {
        self.subs
            .get(name)
            .is_some_and(|p| offset < p.cursor || p.above.contains(&offset))
            || self.is_lost(offset)
    }

    /// Whether every registered subscription has settled `offset`. False when no
    /// subscription is registered, except for known-lost offsets.
    pub fn settled_by_all(&self, offset: Offset) -> bool {
        if self.is_lost(offset) {
            return true;
        }
        !self.subs.is_empty()
            && self
                .subs
                .values()
                .all(|p| offset < p.cursor || p.above.contains(&offset))
    }

    /// `name`'s cursor: every offset below it is settled by `name`.
    pub fn cursor(&self, name: &str) -> Option<Offset> {
        self.subs.get(name).map(|p| p.cursor)
    }

    /// The offsets `name` settled above its cursor (for snapshots).
    pub fn settled_above(&self, name: &str) -> impl Iterator<Item = Offset> + '_ {
        self.subs
            .get(name)
            .into_iter()
            .flat_map(|p| p.above.iter().copied())
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
                progress.above = progress.above.split_off(&first);
                advance(progress, &self.lost);
            }
        }
    }

    /// Records that the offsets in `range` are lost (corrupt): they count as settled.
    pub fn mark_lost(&mut self, range: Range<Offset>) {
        if range.is_empty() {
            return;
        }
        let end = self.lost.entry(range.start).or_insert(range.end);
        *end = (*end).max(range.end);
        for progress in self.subs.values_mut() {
            advance(progress, &self.lost);
        }
    }

    /// Known-lost offset ranges, sorted.
    pub fn lost_ranges(&self) -> Vec<Range<Offset>> {
        self.lost.iter().map(|(&start, &end)| start..end).collect()
    }

    /// Whether `offset` is known lost.
    pub fn is_lost(&self, offset: Offset) -> bool {
        lost_end(&self.lost, offset).is_some()
    }
}

/// End of the lost range containing `offset`, if any.
fn lost_end(lost: &BTreeMap<Offset, Offset>, offset: Offset) -> Option<Offset> {
    lost.range(..=offset)
        .next_back()
        .and_then(|(_, &end)| (end > offset).then_some(end))
}

/// Moves the cursor over settled and lost offsets.
fn advance(progress: &mut Progress, lost: &BTreeMap<Offset, Offset>) {
    loop {
        if progress.above.first() == Some(&progress.cursor) {
            progress.above.pop_first();
            progress.cursor += 1;
        } else if let Some(end) = lost_end(lost, progress.cursor) {
            progress.cursor = end;
            progress.above = progress.above.split_off(&end);
        } else {
            return;
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
        assert_eq!(s.settled_above("a").collect::<Vec<_>>(), vec![12]);
        assert_eq!(s.acknowledged(), 10);
    }
}
