//! The newest records of a disk topic, kept in memory after they are appended, so that
//! dispatchers that keep up read them from here instead of from the segment files.
//!
//! Without it every delivery read its record back from the log (a `pread`, a CRC check and
//! a decode per record) right after the store thread had encoded and written it; with
//! publishers far ahead, those reads also queued behind appends. A dispatcher that fell
//! further behind than the tail holds reads from the log as before. Memory topics keep
//! everything in memory anyway and use no tail.

use std::collections::VecDeque;

use crate::log::record::message_record_len;
use crate::log::{Offset, StoredMessage};

/// Most bytes of records kept (counted as their on-disk length).
const TAIL_BYTES: u64 = 16 << 20;
/// Most records kept.
const TAIL_RECORDS: usize = 64 * 1024;

/// The newest appended records, contiguous and ending at the log's `written()`.
#[derive(Debug, Default)]
pub(super) struct Tail {
    records: VecDeque<(Offset, StoredMessage, u64)>,
    bytes: u64,
}

impl Tail {
    /// Adds records just appended at `base..`; a gap (the log numbered differently) starts
    /// the tail over.
    pub(super) fn extend(&mut self, base: Offset, batch: Vec<StoredMessage>) {
        if self.next().is_some_and(|n| n != base) {
            self.clear();
        }
        for (k, m) in batch.into_iter().enumerate() {
            let len = message_record_len(&m) as u64;
            self.bytes += len;
            self.records.push_back((base + k as u64, m, len));
        }
        while self.bytes > TAIL_BYTES || self.records.len() > TAIL_RECORDS {
            match self.records.pop_front() {
                Some((_, _, len)) => self.bytes -= len,
                None => break,
            }
        }
    }

    /// Forgets everything (the log's numbering can no longer be trusted to match).
    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    /// Forgets the records at or above `offset` (cut from the log after a failed fsync).
    pub(super) fn truncate(&mut self, offset: Offset) {
        while self.records.back().is_some_and(|(o, _, _)| *o >= offset) {
            if let Some((_, _, len)) = self.records.pop_back() {
                self.bytes -= len;
            }
        }
    }

    fn next(&self) -> Option<Offset> {
        self.records.back().map(|(o, _, _)| o + 1)
    }

    /// Up to `max` records at or after `from` and below `below` (the high watermark) that
    /// `keep` accepts, scanning at most `scan` records; `None` when `from` is older than
    /// the tail. Returns the records and where the next read starts.
    pub(super) fn read(
        &self,
        from: Offset,
        below: Offset,
        max: usize,
        scan: usize,
        keep: impl Fn(Offset) -> bool,
    ) -> Option<(Vec<(Offset, StoredMessage)>, Offset)> {
        let (first, _, _) = self.records.front()?;
        if from < *first {
            return None;
        }
        let mut next = from.max(*first);
        let start = usize::try_from(from - first).ok()?;
        let mut out = Vec::with_capacity(max.min(self.records.len().saturating_sub(start)));
        for (o, m, _) in self
            .records
            .range(start.min(self.records.len())..)
            .take(scan)
        {
            if out.len() >= max || *o >= below {
                break;
            }
            next = o + 1;
            if keep(*o) {
                out.push((*o, m.clone()));
            }
        }
        Some((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::msg;

    #[test]
    fn serves_recent_records_and_refuses_older_ones() {
        let mut t = Tail::default();
        t.extend(10, (0..5).map(msg).collect());
        assert!(t.read(9, 99, 10, 100, |_| true).is_none());
        let (got, next) = t.read(11, 99, 2, 100, |_| true).unwrap();
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![11, 12]
        );
        assert_eq!(next, 13);
        let (got, next) = t.read(12, 99, 10, 100, |o| o != 13).unwrap();
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![12, 14]
        );
        assert_eq!(next, 15);
        let (got, next) = t.read(15, 99, 10, 100, |_| true).unwrap();
        assert!(got.is_empty());
        assert_eq!(next, 15);
        // Nothing at or above the high watermark, and the next read starts there.
        let (got, next) = t.read(10, 12, 10, 100, |_| true).unwrap();
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [10, 11]);
        assert_eq!(next, 12);
        let mut cut = Tail::default();
        cut.extend(10, (0..5).map(msg).collect());
        cut.truncate(12);
        assert_eq!(cut.read(10, 99, 10, 100, |_| true).unwrap().0.len(), 2);
        // A gap starts over.
        t.extend(20, vec![msg(1)]);
        assert!(t.read(14, 99, 10, 100, |_| true).is_none());
        assert_eq!(t.read(20, 99, 10, 100, |_| true).unwrap().0.len(), 1);
    }
}
