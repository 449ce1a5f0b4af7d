//! `MemoryLog`: the log of `Memory` topics, and the reference implementation for tests.
//!
//! Nothing is durable, so `durable` always equals `written` (the topic's durability level is
//! "in memory"). Sizes are counted with the on-disk record size so that retention limits
//! mean the same thing for memory and disk topics.

use std::collections::VecDeque;
use std::ops::Range;

use super::record::message_record_len;
use super::settlement::Settlements;
use super::{Log, LogError, Offset, Settlement, StoredMessage};

/// What a `MemoryLog` does when its byte limit would be exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryRetention {
    /// No limit.
    #[default]
    Unbounded,
    /// Keep at most this many bytes; append drops the oldest records (settled or not) to
    /// make room and counts the unsettled ones in [`Log::dropped`]. The design: "Memory
    /// topics may drop the oldest".
    DropOldest { max_bytes: u64 },
    /// Reject appends that would push the backlog past this many bytes, like a disk log.
    Reject { max_backlog_bytes: u64 },
}

#[derive(Debug, Clone)]
struct Entry {
    message: StoredMessage,
    size: u64,
    /// Bytes appended to this log before this record, ever; makes byte ranges O(1).
    bytes_before: u64,
}

/// An in-memory log. See the module documentation.
#[derive(Debug, Default)]
pub struct MemoryLog {
    entries: VecDeque<Entry>,
    /// Offset of `entries[0]`.
    first: Offset,
    /// Bytes ever appended (the `bytes_before` of the next record).
    appended_bytes: u64,
    settlements: Settlements,
    retention: MemoryRetention,
    dropped: u64,
}

impl MemoryLog {
    /// An unbounded memory log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A memory log with a byte limit.
    pub fn with_retention(retention: MemoryRetention) -> Self {
        Self {
            retention,
            ..Self::default()
        }
    }

    fn next(&self) -> Offset {
        self.first + self.entries.len() as u64
    }

    /// Bytes currently held (settled or not).
    pub fn stored_bytes(&self) -> u64 {
        self.entries
            .front()
            .map_or(0, |e| self.appended_bytes - e.bytes_before)
    }

    fn entry(&self, offset: Offset) -> Option<&Entry> {
        let index = usize::try_from(offset.checked_sub(self.first)?).ok()?;
        self.entries.get(index)
    }

    /// Drops the oldest record; returns its size.
    fn pop_front(&mut self) -> u64 {
        let Some(entry) = self.entries.pop_front() else {
            return 0;
        };
        let ack = self.settlements.acknowledged();
        if self.first >= ack && !self.settlements.settled_by_all(self.first) {
            self.dropped += 1;
        }
        self.first += 1;
        entry.size
    }
}

impl Log for MemoryLog {
    fn append(&mut self, messages: &[StoredMessage]) -> Result<Range<Offset>, LogError> {
        let sizes: Vec<u64> = messages
            .iter()
            .map(|m| message_record_len(m) as u64)
            .collect();
        let batch: u64 = sizes.iter().sum();
        match self.retention {
            MemoryRetention::Unbounded => {}
            MemoryRetention::Reject { max_backlog_bytes } => {
                let current = self.backlog_bytes();
                if current.saturating_add(batch) > max_backlog_bytes {
                    return Err(LogError::BacklogFull {
                        limit: format!("retention.maxBytes = {max_backlog_bytes} bytes"),
                        current,
                    });
                }
            }
            MemoryRetention::DropOldest { max_bytes } => {
                while !self.entries.is_empty()
                    && self.stored_bytes().saturating_add(batch) > max_bytes
                {
                    self.pop_front();
                }
                self.settlements.advance_all_to(self.first);
            }
        }
        let start = self.next();
        for (message, size) in messages.iter().zip(sizes) {
            self.entries.push_back(Entry {
                message: message.clone(),
                size,
                bytes_before: self.appended_bytes,
            });
            self.appended_bytes += size;
        }
        Ok(start..self.next())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        Ok(())
    }

    fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, StoredMessage)>, LogError> {
        let next = self.next();
        if from > next {
            return Err(LogError::OffsetOutOfRange {
                offset: from,
                first: self.first,
                next,
            });
        }
        let mut out = Vec::with_capacity(max.min(self.entries.len()));
        let mut offset = from.max(self.first);
        while offset < next && out.len() < max {
            if !self.settlements.settled_by_all(offset)
                && let Some(entry) = self.entry(offset)
            {
                out.push((offset, entry.message.clone()));
            }
            offset += 1;
        }
        Ok(out)
    }

    fn settle(
        &mut self,
        subscription: &str,
        offset: Offset,
        _how: Settlement,
    ) -> Result<(), LogError> {
        let next = self.next();
        if offset >= next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                first: self.first,
                next,
            });
        }
        self.settlements.settle(subscription, offset).map(|_| ())
    }

    fn is_settled(&self, subscription: &str, offset: Offset) -> bool {
        self.settlements.is_settled(subscription, offset)
    }

    fn set_subscriptions(&mut self, subscriptions: &[String]) -> Result<(), LogError> {
        let ack = self.settlements.acknowledged();
        for name in subscriptions {
            self.settlements.register(name, ack);
        }
        let stale: Vec<String> = self
            .settlements
            .names()
            .filter(|n| !subscriptions.iter().any(|s| s == n))
            .map(str::to_owned)
            .collect();
        for name in stale {
            self.settlements.unregister(&name);
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<u64, LogError> {
        let ack = self.settlements.acknowledged();
        let mut freed = 0;
        while self.first < ack && !self.entries.is_empty() {
            freed += self.pop_front();
        }
        Ok(freed)
    }

    fn written(&self) -> Offset {
        self.next()
    }

    fn durable(&self) -> Offset {
        self.next()
    }

    fn acknowledged(&self) -> Offset {
        self.settlements.acknowledged()
    }

    fn backlog_bytes(&self) -> u64 {
        let start = self.settlements.acknowledged().max(self.first);
        self.entry(start)
            .map_or(0, |e| self.appended_bytes - e.bytes_before)
    }

    fn first(&self) -> Offset {
        self.first
    }

    fn cursor(&self, subscription: &str) -> Option<Offset> {
        self.settlements.cursor(subscription)
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::msg;

    fn subs(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn round_trip_and_offsets() -> Result<(), LogError> {
        let mut log = MemoryLog::new();
        assert_eq!(log.append(&[msg(0), msg(1)])?, 0..2);
        assert_eq!(log.append(&[msg(2)])?, 2..3);
        let got = log.read(0, 10)?;
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], (2, msg(2)));
        assert_eq!(log.read(1, 1)?, vec![(1, msg(1))]);
        assert!(log.read(3, 10)?.is_empty());
        assert!(matches!(
            log.read(4, 1),
            Err(LogError::OffsetOutOfRange { .. })
        ));
        assert_eq!(
            (log.written(), log.durable(), log.acknowledged()),
            (3, 3, 0)
        );
        Ok(())
    }

    #[test]
    fn settle_acknowledge_compact() -> Result<(), LogError> {
        let mut log = MemoryLog::new();
        log.append(&[msg(0), msg(1), msg(2)])?;
        log.set_subscriptions(&subs(&["a", "b"]))?;
        log.settle("a", 0, Settlement::Acked)?;
        log.settle("a", 1, Settlement::Acked)?;
        log.settle("b", 0, Settlement::DeadLettered)?;
        assert_eq!(log.acknowledged(), 1);
        assert_eq!(
            log.read(0, 10)?.len(),
            2,
            "offset 0 settled by all is skipped"
        );
        let before = log.backlog_bytes();
        assert_eq!(log.compact()?, message_record_len(&msg(0)) as u64);
        assert_eq!(log.first(), 1);
        assert_eq!(log.backlog_bytes(), before);
        assert!(matches!(
            log.settle("zzz", 1, Settlement::Acked),
            Err(LogError::UnknownSubscription { .. })
        ));
        Ok(())
    }

    #[test]
    fn late_subscription_sees_unacknowledged_messages() -> Result<(), LogError> {
        let mut log = MemoryLog::new();
        log.append(&[msg(0), msg(1), msg(2)])?;
        log.set_subscriptions(&subs(&["a"]))?;
        log.settle("a", 0, Settlement::Acked)?;
        log.set_subscriptions(&subs(&["a", "late"]))?;
        assert_eq!(log.cursor("late"), Some(1));
        assert_eq!(log.read(1, 10)?.len(), 2);
        Ok(())
    }

    #[test]
    fn reject_names_limit_and_stores_nothing() -> Result<(), LogError> {
        let one = message_record_len(&msg(0)) as u64;
        let mut log = MemoryLog::with_retention(MemoryRetention::Reject {
            max_backlog_bytes: one * 2,
        });
        log.append(&[msg(0)])?;
        let err = log.append(&[msg(0), msg(0)]);
        let Err(e @ LogError::BacklogFull { .. }) = err else {
            panic!("expected BacklogFull, got {err:?}");
        };
        assert!(e.to_string().contains("retention.maxBytes"), "{e}");
        assert_eq!(log.written(), 1);
        Ok(())
    }

    #[test]
    fn drop_oldest_counts_drops() -> Result<(), LogError> {
        let one = message_record_len(&msg(0)) as u64;
        let mut log = MemoryLog::with_retention(MemoryRetention::DropOldest { max_bytes: one * 3 });
        log.set_subscriptions(&subs(&["a"]))?;
        for _ in 0..5 {
            log.append(&[msg(0)])?;
        }
        assert_eq!(log.first(), 2);
        assert_eq!(log.dropped(), 2);
        assert_eq!(log.stored_bytes(), one * 3);
        assert_eq!(log.cursor("a"), Some(2));
        assert_eq!(log.read(0, 10)?.len(), 3);
        Ok(())
    }
}
