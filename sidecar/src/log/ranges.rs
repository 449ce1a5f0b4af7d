//! A set of offsets kept as disjoint, non-adjacent half-open ranges.
//!
//! Settlement state uses it so that memory follows the number of *gaps*, not the number of
//! offsets: one message stuck for ten minutes while a million after it are acked is two
//! ranges, not a million entries.

use std::collections::BTreeMap;
use std::ops::Range;

use super::Offset;

/// Disjoint ranges `start -> end`, never touching each other (adjacent ones are merged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<Offset, Offset>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The range containing `offset`, if any.
    pub fn range_of(&self, offset: Offset) -> Option<Range<Offset>> {
        self.ranges
            .range(..=offset)
            .next_back()
            .and_then(|(&s, &e)| (e > offset).then_some(s..e))
    }

    pub fn contains(&self, offset: Offset) -> bool {
        self.range_of(offset).is_some()
    }

    /// Adds `offset`; returns whether it was new.
    pub fn insert(&mut self, offset: Offset) -> bool {
        if self.contains(offset) {
            return false;
        }
        self.insert_range(offset..offset + 1);
        true
    }

    /// Adds every offset of `range`, merging with neighbours.
    pub fn insert_range(&mut self, range: Range<Offset>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // A range that starts at or before `start` and reaches it absorbs us.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        // Ranges starting inside (or right after) the merged one are absorbed.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Removes every offset below `floor`.
    pub fn remove_below(&mut self, floor: Offset) {
        while let Some(entry) = self.ranges.first_entry() {
            let (s, e) = (*entry.key(), *entry.get());
            if s >= floor {
                return;
            }
            entry.remove();
            if e > floor {
                self.ranges.insert(floor, e);
                return;
            }
        }
    }

    /// The first range, if any.
    pub fn first(&self) -> Option<Range<Offset>> {
        self.ranges.iter().next().map(|(&s, &e)| s..e)
    }

    /// End of the last range, if any.
    pub fn last_end(&self) -> Option<Offset> {
        self.ranges.values().next_back().copied()
    }

    /// Ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<Offset>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// Number of ranges (the memory this set costs).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Number of offsets.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The parts of `within` this set does not contain, in order.
    pub fn gaps(&self, within: Range<Offset>) -> Vec<Range<Offset>> {
        let mut out = Vec::new();
        let mut at = within.start;
        let from = self.range_of(at).map_or(at, |r| r.start);
        for (&s, &e) in self.ranges.range(from..within.end) {
            if s > at {
                out.push(at..s.min(within.end));
            }
            at = at.max(e);
            if at >= within.end {
                break;
            }
        }
        if at < within.end {
            out.push(at..within.end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_neighbours_and_counts_ranges() {
        let mut s = RangeSet::new();
        assert!(s.insert(5));
        assert!(s.insert(7));
        assert_eq!(s.ranges(), 2);
        assert!(s.insert(6));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..8]);
        assert!(!s.insert(6));
        s.insert_range(10..20);
        s.insert_range(8..10);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..20]);
        s.insert_range(0..3);
        s.insert_range(2..30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..30]);
        assert_eq!(s.len(), 30);
    }

    #[test]
    fn remove_below_splits_a_range() {
        let mut s = RangeSet::new();
        s.insert_range(0..10);
        s.insert_range(12..15);
        s.remove_below(5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..10, 12..15]);
        s.remove_below(13);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![13..15]);
        s.remove_below(20);
        assert!(s.is_empty());
    }

    #[test]
    fn gaps_are_the_complement_within() {
        let mut s = RangeSet::new();
        s.insert_range(3..5);
        s.insert_range(8..10);
        assert_eq!(s.gaps(0..12), vec![0..3, 5..8, 10..12]);
        assert_eq!(s.gaps(4..9), vec![5..8]);
        assert_eq!(s.gaps(3..5), Vec::<Range<Offset>>::new());
        assert_eq!(RangeSet::new().gaps(1..4), vec![1..4]);
    }

    #[test]
    fn many_random_inserts_match_a_plain_set() {
        let mut rng = crate::log::tests::Rng::new(7);
        let mut s = RangeSet::new();
        let mut plain = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let a = rng.below(300);
            let b = a + rng.below(5);
            s.insert_range(a..b);
            plain.extend(a..b);
        }
        for o in 0..320 {
            assert_eq!(s.contains(o), plain.contains(&o), "{o}");
        }
        assert_eq!(s.len(), plain.len() as u64);
    }
}
