//! What a consumer inbox remembers about deliveries its app already acked, per producer and
//! offset, so that a producer that lost the ack (its stream broke, or it restarted after
//! `kill -9`) gets ACKED back at once instead of the app getting a second copy
//! (docs/reliability.md rows 2 and 3).
//!
//! Bounded twice: entries older than [`ACKED_MEMORY`] are forgotten, and so are the oldest
//! ones beyond [`ACKED_MEMORY_MAX`], so that memory stays bounded at any throughput (at
//! 200k msg/s the time bound alone would keep 120 million entries). Expiry pops from the
//! front of an insertion-ordered queue: its cost follows what expires, not what is kept.
//!
//! Each entry keeps a hash of the message id: a producer whose data dir was wiped numbers
//! its messages from 0 again (so does a `Memory` topic at every restart), and an offset alone
//! would then answer ACKED for a message the app never saw (a loss). A mismatching id is
//! treated as a new message, by repeats and by `QueryDelivery` alike.

use std::collections::VecDeque;

// Seeded per process, several times faster than SipHash on these per-delivery lookups.
use foldhash::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::log::Offset;

/// How long an acked (producer, offset) is remembered, for `QueryDelivery` and repeats.
pub const ACKED_MEMORY: Duration = Duration::from_secs(600);
/// Most acked (producer, offset) pairs remembered per subscription.
pub const ACKED_MEMORY_MAX: usize = 1 << 20;

/// Where a delivery comes from: the producer sidecar's identity and the offset in its log.
pub type Origin = (Arc<str>, Offset);

/// A stable hash of a message id (fixed keys, so equal ids hash equally in every inbox).
pub fn id_hash(message_id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(message_id)
}

/// Recently acked origins with the hash of their message id.
#[derive(Debug, Default)]
pub struct AckedOrigins {
    by_origin: HashMap<Origin, (Instant, u64)>,
    order: VecDeque<(Instant, Origin)>,
}

impl AckedOrigins {
    /// Remembers that the app acked `message_id` delivered from `origin`.
    pub fn insert(&mut self, origin: Origin, message_id: &str, now: Instant) {
        self.by_origin
            .insert(origin.clone(), (now, id_hash(message_id)));
        self.order.push_back((now, origin));
        while self.order.len() > ACKED_MEMORY_MAX {
            self.pop_front();
        }
    }

    /// Whether `origin` was acked for any message: only for the queries of a producer
    /// sidecar too old to name its message (see `InboxState::query`).
    pub fn contains(&self, origin: &Origin) -> bool {
        self.by_origin.contains_key(origin)
    }

    /// Whether `origin` was acked for this very message (what a repeat and `QueryDelivery`
    /// ask: never the offset alone).
    pub fn acked(&self, origin: &Origin, message_id: &str) -> bool {
        self.by_origin
            .get(origin)
            .is_some_and(|(_, h)| *h == id_hash(message_id))
    }

    /// Forgets entries older than [`ACKED_MEMORY`].
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < ACKED_MEMORY {
                break;
            }
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        let Some((at, origin)) = self.order.pop_front() else {
            return;
        };
        // A later ack of the same origin re-inserted it: only the newest entry removes it.
        if self.by_origin.get(&origin).is_some_and(|(t, _)| *t == at) {
            self.by_origin.remove(&origin);
        }
    }

    /// Origins remembered.
    pub fn len(&self) -> usize {
        self.by_origin.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_origin.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_by_origin_and_message_and_expires() {
        let now = Instant::now();
        let mut a = AckedOrigins::default();
        let o: Origin = ("ns/p".into(), 3);
        a.insert(o.clone(), "m3", now);
        assert!(a.acked(&o, "m3"));
        assert!(!a.acked(&o, "other"), "a reused offset is another message");
        assert!(a.contains(&o));
        a.expire(now + ACKED_MEMORY - Duration::from_secs(1));
        assert_eq!(a.len(), 1);
        a.expire(now + ACKED_MEMORY);
        assert!(a.is_empty());
    }

    #[test]
    fn reinserting_keeps_the_newest() {
        let now = Instant::now();
        let mut a = AckedOrigins::default();
        let o: Origin = ("ns/p".into(), 1);
        a.insert(o.clone(), "m", now);
        a.insert(o.clone(), "m", now + Duration::from_secs(300));
        a.expire(now + ACKED_MEMORY);
        assert!(
            a.acked(&o, "m"),
            "the second ack is younger than the window"
        );
    }
}
