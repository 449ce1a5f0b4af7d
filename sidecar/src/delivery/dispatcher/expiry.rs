//! Expiry: a message whose TTL or the topic's `retention.maxAge` passed is never delivered
//! again. Its idle copies go to the subscription's dead-letter topic with the reason, or
//! are dropped when it has none, and it is counted in `ferry_sidecar_expired_total`.
//!
//! A message is checked whenever it is (re)dispatched. Messages that wait because no
//! member has room (or the group has no member at all) are not dispatched, so a sweep
//! also runs at the earliest expiry among the held messages, at most once per
//! [`SWEEP_EVERY`]. That bounds its cost (one pass over at most `WINDOW` held messages) and
//! keeps one timer for all of them instead of one per message.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use super::{CopyState, Dispatcher};
use crate::log::Offset;

/// Shortest time between two sweeps.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The timer entry of a sweep (no message has this offset).
pub(super) const SWEEP: Offset = Offset::MAX;

impl Dispatcher {
    /// Gives up the idle copies of an expired message.
    pub(super) fn expire(&mut self, offset: Offset, why: &'static str) {
        self.ready.remove(&offset);
        let idle: Vec<usize> = match self.entries.get(&offset) {
            Some(e) if !e.copies.is_empty() => (0..e.copies.len())
                .filter(|k| matches!(e.copies[*k].state, CopyState::Idle))
                .collect(),
            Some(_) => vec![0],
            None => return,
        };
        if idle.is_empty() {
            return;
        }
        self.counters.expired.inc();
        tracing::debug!(subscription = %self.sub, offset, why, "message expired before delivery");
        for k in idle {
            self.give_up(offset, k, why.into());
        }
    }

    /// Makes sure a sweep runs at `at` or earlier (never sooner than [`SWEEP_EVERY`] after
    /// the last one).
    pub(super) fn schedule_sweep(&mut self, at: Instant) {
        let at = at.max(self.last_sweep + SWEEP_EVERY);
        if self.next_sweep.is_none_or(|s| at < s) {
            self.next_sweep = Some(at);
            self.timers.push(Reverse((at, SWEEP)));
        }
    }

    /// Handles a sweep timer that fired at `at`; stale ones (superseded by an earlier
    /// schedule) are ignored.
    pub(super) fn sweep(&mut self, at: Instant, now: Instant) {
        if self.next_sweep != Some(at) {
            return;
        }
        self.next_sweep = None;
        self.last_sweep = now;
        let due: Vec<(Offset, &'static str)> = self
            .ready
            .iter()
            .filter_map(|o| {
                let (t, why) = self.entries.get(o)?.expires?;
                (t <= now).then_some((*o, why))
            })
            .collect();
        for (offset, why) in due {
            self.expire(offset, why);
        }
        if let Some(next) = self
            .entries
            .values()
            .filter_map(|e| e.expires)
            .map(|(t, _)| t)
            .min()
        {
            self.schedule_sweep(next);
        }
    }
}
