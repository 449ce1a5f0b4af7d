//! `MemoryLog`: the log of `Memory` topics, and the reference implementation for tests.
//!
//! Nothing is durable, so `durable` always equals `written` (the topic's durability level is
//! "in memory"). Sizes are counted with the on-disk record size so that retention limits
//! mean the same thing for memory and disk topics.
//!
//! A record is dropped from memory as soon as every subscription settled it, wherever it
//! sits: one message stuck at the front (nacked with a long delay) does not keep the
//! records acked after it, and does not make them count as backlog.

use std::collections::BTreeMap;
use std::ops::Range;

use super::record::message_record_len;
use super::settlement::{Settled, Settlements};
use super::{Log, LogError, Offset, Settlement, StoredMessage};

/// What a `MemoryLog` does when its byte limit would be exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryRetention {
    /// No limit.
    #[default]
    Unbounded,
    /// Keep at most this many bytes of unsettled records; append drops the oldest of them
    /// to make room and counts them in [`Log::dropped`]. The design: "Memory topics may
    /// drop the oldest".
    DropOldest { max_bytes: u64 },
    /// Reject appends that would push the backlog past this many bytes, like a disk log.
    Reject { max_backlog_bytes: u64 },
}

#[derive(Debug, Clone)]
struct Entry {
    message: StoredMessage,
    size: u64,
}

/// An in-memory log. See the module documentation.
#[derive(Debug, Default)]
pub struct MemoryLog {
    /// Records not yet settled by every subscription (all of them while there is none).
    entries: BTreeMap<Offset, Entry>,
    /// Next offset to be written.
    next: Offset,
    /// Oldest offset that may still be held: records below it were dropped or settled.
    first: Offset,
    /// Bytes of `entries`.
    held_bytes: u64,
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

    /// Bytes currently held: the records some subscription has not settled.
    pub fn stored_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Forgets the record at `offset`; returns its size (0 if it was not held).
    fn forget(&mut self, offset: Offset) -> u64 {
        let size = self.entries.remove(&offset).map_or(0, |e| e.size);
        self.held_bytes -= size;
        size
    }

    /// Drops the oldest record held, unsettled; returns its size.
    fn pop_front(&mut self) -> u64 {
        let Some((offset, entry)) = self.entries.pop_first() else {
            return 0;
        };
        self.held_bytes -= entry.size;
        if !self.settlements.settled_by_all(offset) {
            self.dropped += 1;
        }
        self.first = offset + 1;
        entry.size
    }

    /// Forgets every record now settled by all (after the subscriptions changed).
    fn sweep(&mut self) -> u64 {
        let settled: Vec<Offset> = self
            .entries
            .keys()
            .copied()
            .filter(|o| self.settlements.settled_by_all(*o))
            .collect();
        settled.into_iter().map(|o| self.forget(o)).sum()
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
                while !self.entries.is_empty() && self.held_bytes.saturating_add(batch) > max_bytes
                {
                    self.pop_front();
                }
                self.settlements.advance_all_to(self.first);
            }
        }
        let start = self.next;
        for (message, size) in messages.iter().zip(sizes) {
            self.entries.insert(
                self.next,
                Entry {
                    message: message.clone(),
                    size,
                },
            );
            self.next += 1;
            self.held_bytes += size;
        }
        Ok(start..self.next)
    }

    fn sync(&mut self) -> Result<(), LogError> {
        Ok(())
    }

    fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, StoredMessage)>, LogError> {
        if from > self.next {
            return Err(LogError::OffsetOutOfRange {
                offset: from,
                first: self.first(),
                next: self.next,
            });
        }
        Ok(self
            .entries
            .range(from..)
            .filter(|(o, _)| !self.settlements.settled_by_all(**o))
            .take(max)
            .map(|(o, e)| (*o, e.message.clone()))
            .collect())
    }

    fn settle(
        &mut self,
        subscription: &str,
        offset: Offset,
        _how: Settlement,
    ) -> Result<(), LogError> {
        if offset >= self.next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                first: self.first(),
                next: self.next,
            });
        }
        if self.settlements.settle(subscription, offset)? == Settled::NowByAll {
            self.forget(offset);
        }
        Ok(())
    }

    fn is_settled(&self, subscription: &str, offset: Offset) -> bool {
        self.settlements.is_settled(subscription, offset)
    }

    fn set_subscriptions(&mut self, subscriptions: &[String]) -> Result<(), LogError> {
        let ack = self.settlements.acknowledged();
        let mut changed = false;
        for name in subscriptions {
            changed |= self.settlements.register(name, ack);
        }
        let stale: Vec<String> = self
            .settlements
            .names()
            .filter(|n| !subscriptions.iter().any(|s| s == n))
            .map(str::to_owned)
            .collect();
        for name in stale {
            changed |= self.settlements.unregister(&name);
        }
        if changed {
            self.sweep();
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<u64, LogError> {
        // Settled records are forgotten as they settle; only the bookkeeping moves here.
        self.first = self.first.max(self.settlements.acknowledged());
        Ok(0)
    }

    fn written(&self) -> Offset {
        self.next
    }

    fn durable(&self) -> Offset {
        self.next
    }

    fn acknowledged(&self) -> Offset {
        self.settlements.acknowledged()
    }

    fn backlog_bytes(&self) -> u64 {
        self.held_bytes
    }

    fn first(&self) -> Offset {
        self.entries.keys().next().copied().unwrap_or(self.next)
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
        let before = log.backlog_bytes();
        log.settle("a", 0, Settlement::Acked)?;
        log.settle("a", 1, Settlement::Acked)?;
        log.settle("b", 0, Settlement::DeadLettered)?;
        assert_eq!(log.acknowledged(), 1);
        assert_eq!(
            log.read(0, 10)?.len(),
            2,
            "offset 0 settled by all is skipped"
        );
        let one = message_record_len(&msg(0)) as u64;
        assert_eq!(
            log.backlog_bytes(),
            before - one,
            "forgotten once settled by all"
        );
        assert_eq!(log.first(), 1);
        assert_eq!(log.compact()?, 0);
        assert!(matches!(
            log.settle("zzz", 1, Settlement::Acked),
            Err(LogError::UnknownSubscription { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_stuck_record_keeps_only_itself() -> Result<(), LogError> {
        let one = message_record_len(&msg(0)) as u64;
        let mut log = MemoryLog::with_retention(MemoryRetention::Reject {
            max_backlog_bytes: one * 4,
        });
        log.set_subscriptions(&subs(&["a"]))?;
        log.append(&[msg(0)])?;
        for i in 1..100 {
            log.append(&[msg(i % 10)])?;
            log.settle("a", i, Settlement::Acked)?;
        }
        assert_eq!(log.backlog_bytes(), one, "only the stuck record is held");
        assert_eq!(log.acknowledged(), 0);
        assert_eq!(log.read(0, 10)?, vec![(0, msg(0))]);
        log.settle("a", 0, Settlement::Acked)?;
        assert_eq!((log.backlog_bytes(), log.acknowledged()), (0, 100));
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
