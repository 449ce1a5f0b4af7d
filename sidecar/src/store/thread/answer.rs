//! Read-only commands on the store thread: reads for dispatchers (from the tail when they
//! keep up), cursors, unsettled counts and the re-learn `Holds` question.

use super::{READ_SCAN_ROUNDS, StoreThread};
use crate::error::Error;
use crate::log::{Offset, StoredMessage};
use crate::store::{Command, ReadBatch};

impl StoreThread {
    /// Answers a read-only command (`Read`, `Cursor`, `Unsettled`).
    pub(super) fn answer(&self, c: Command) {
        match c {
            Command::Read {
                subscription,
                from,
                max,
                reply,
            } => {
                let _ = reply.send(self.read(&subscription, from, max));
            }
            Command::ReadAt {
                subscription,
                offsets,
                reply,
            } => {
                let _ = reply.send(self.read_at(&subscription, &offsets));
            }
            Command::Cursor {
                subscription,
                reply,
            } => {
                let _ = reply.send(self.log.cursor(&subscription));
            }
            Command::Unsettled {
                subscription,
                below,
                reply,
            } => {
                let from = self.log.cursor(&subscription).unwrap_or(below);
                let n = (from.max(self.log.first())..below.min(self.log.written()))
                    .filter(|o| !self.log.is_settled(&subscription, *o))
                    .count();
                let _ = reply.send(n as u64);
            }
            Command::Holds { ids, reply } => {
                let index = self.settled_index.as_ref();
                let unsettled = index.map_or_else(|| vec![false; ids.len()], |i| i.holds(&ids));
                // Settled ids leave the index; the dedup window still says this log stored
                // them (it forgets the ids of records recovery lost), so a re-learn does not
                // take back what was already delivered here.
                let lost = self.log.lost();
                let written = self.log.written();
                let stored = |id: &String| {
                    self.dedup.stored_at(id).is_some_and(|o| {
                        o < written && !lost.iter().any(|range| range.contains(&o))
                    })
                };
                let held = ids
                    .iter()
                    .zip(unsettled)
                    .map(|(id, unsettled)| unsettled || stored(id))
                    .collect();
                let _ = reply.send(held);
            }
            Command::Append { .. }
            | Command::Release { .. }
            | Command::Settle(_)
            | Command::Report(_)
            | Command::SetSubscriptions(_)
            | Command::Flush(_) => {}
        }
    }

    /// The records at `offsets` that `subscription` has not settled (parked messages read
    /// back), under the same rules as `read`.
    fn read_at(
        &self,
        subscription: &str,
        offsets: &[Offset],
    ) -> Result<Vec<(Offset, StoredMessage)>, Error> {
        let mut out = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            if offset >= self.visible
                || self.refused.contains(&offset)
                || self.log.is_settled(subscription, offset)
            {
                continue;
            }
            let found = self
                .log
                .read(offset, 1)
                .map_err(|e| Error::from_log(&self.topic, e))?;
            out.extend(found.into_iter().filter(|(o, _)| *o == offset));
        }
        Ok(out)
    }

    /// Reads for a dispatcher: only below the high watermark (`visible`), never a refused
    /// record, never one `subscription` settled.
    fn read(&self, subscription: &str, from: u64, max: usize) -> Result<ReadBatch, Error> {
        let max = max.max(1);
        let below = self.visible;
        let keep = |o: u64| !self.refused.contains(&o) && !self.log.is_settled(subscription, o);
        if let Some(tail) = &self.tail
            && let Some((records, next)) = tail.read(from, below, max, max * READ_SCAN_ROUNDS, keep)
        {
            return Ok(ReadBatch { records, next });
        }
        let mut records = Vec::new();
        let mut next = from;
        for _ in 0..READ_SCAN_ROUNDS {
            if next >= below {
                break;
            }
            let mut got = self
                .log
                .read(next, max - records.len())
                .map_err(|e| Error::from_log(&self.topic, e))?;
            got.retain(|(o, _)| *o < below);
            let full = got.len() == max - records.len();
            match got.last() {
                Some((last, _)) if full => next = last + 1,
                _ => next = below,
            }
            records.extend(got.into_iter().filter(|(o, _)| keep(*o)));
            if records.len() >= max || !full {
                break;
            }
        }
        Ok(ReadBatch { records, next })
    }
}
