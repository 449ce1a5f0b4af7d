//! Per-subscription settlements that reach a replica before the copy they name.
//!
//! A producer delivers a record as soon as its own log holds it, and sends its copies in
//! parallel; a fast consumer's ack can then be reported (a trim every
//! [`super::replicator::TRIM_EVERY`]) before the copy reached the replica. Such a trim is
//! kept here for a short while and applied when the copy arrives, instead of being lost
//! (which would make a takeover deliver that copy to that subscription again). Kept in
//! memory only, for at most [`KEEP_FOR`] and [`MAX_EARLY`] entries per replica log: a
//! copy that does not come by then most likely went to another replica.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a settlement waits for its copy.
pub const KEEP_FOR: Duration = Duration::from_secs(10);
/// Most settlements waiting per replica log; the oldest go first.
pub const MAX_EARLY: usize = 16 * 1024;

/// Settlements of ids not held (yet), by id.
#[derive(Debug, Default)]
pub struct Early {
    by_id: HashMap<String, Vec<String>>,
    /// (when noted, id), oldest first; one entry per noted settlement.
    order: VecDeque<(Instant, String)>,
}

impl Early {
    /// Notes that `sub` settled `id`, which is not held.
    pub fn note(&mut self, sub: &str, id: &str, now: Instant) {
        self.expire(now);
        while self.order.len() >= MAX_EARLY {
            self.pop_oldest();
        }
        let subs = self.by_id.entry(id.to_owned()).or_default();
        if !subs.iter().any(|s| s == sub) {
            subs.push(sub.to_owned());
            self.order.push_back((now, id.to_owned()));
        }
    }

    /// The subscriptions that settled `id` before its copy came, forgotten here.
    pub fn take(&mut self, id: &str) -> Vec<String> {
        self.by_id.remove(id).unwrap_or_default()
    }

    /// Settlements waiting.
    pub fn len(&self) -> usize {
        self.by_id.values().map(Vec::len).sum()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Forgets settlements older than [`KEEP_FOR`].
    pub fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= KEEP_FOR)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((_, id)) = self.order.pop_front() else {
            return;
        };
        // The id's oldest subscription; a taken id has none left (its order entries
        // outlive it and are skipped here).
        if let Some(subs) = self.by_id.get_mut(&id) {
            if !subs.is_empty() {
                subs.remove(0);
            }
            if subs.is_empty() {
                self.by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlements_wait_for_their_copy_a_while_and_within_a_bound() {
        let t0 = Instant::now();
        let mut e = Early::default();
        e.note("ns/a", "m1", t0);
        e.note("ns/b", "m1", t0);
        e.note("ns/a", "m1", t0);
        e.note("ns/a", "m2", t0 + KEEP_FOR / 2);
        assert_eq!(e.len(), 3);
        assert_eq!(e.take("m1"), ["ns/a", "ns/b"]);
        assert!(e.take("m1").is_empty());
        // m2 expires after its own wait.
        e.expire(t0 + KEEP_FOR);
        assert_eq!(e.len(), 1);
        e.expire(t0 + KEEP_FOR / 2 + KEEP_FOR);
        assert!(e.is_empty());

        for i in 0..MAX_EARLY + 5 {
            e.note("ns/a", &format!("x{i}"), t0 + KEEP_FOR * 2);
        }
        assert_eq!(e.len(), MAX_EARLY);
        assert!(e.take("x0").is_empty());
        assert_eq!(e.take(&format!("x{}", MAX_EARLY + 4)), ["ns/a"]);
    }
}
