//! `ExactlyOnce`: the message ids this inbox's app acked, each remembered until its window
//! (the topic's `dedupWindow`) ends, and at most `max` of them (`--dedup-max-ids`): beyond
//! that the oldest is forgotten first, counted by `ferry_sidecar_exactly_once_evicted_total`.
//! A forgotten id's message, should its producer deliver it again, reaches the app again:
//! at a high ack rate the window is shortened, rather than memory grown without bound (the
//! same trade as the producer's publish dedup window).
//!
//! Expiry pops from the front of an insertion-ordered queue, so its cost follows what
//! expires, not what is kept.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

// Seeded per process, several times faster than SipHash on these per-delivery lookups.
use foldhash::HashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::DEFAULT_DEDUP_MAX_IDS;

/// Acked message ids, each with the instant it is forgotten.
#[derive(Debug)]
pub struct AckedIds {
    until: HashMap<Arc<str>, Instant>,
    /// Insertions, oldest first; an entry whose instant no longer matches its id's is stale.
    order: VecDeque<(Instant, Arc<str>)>,
    max: usize,
    size: Gauge,
    evicted: Counter,
}

impl Default for AckedIds {
    fn default() -> Self {
        Self {
            until: HashMap::default(),
            order: VecDeque::new(),
            max: DEFAULT_DEDUP_MAX_IDS,
            size: Gauge::default(),
            evicted: Counter::default(),
        }
    }
}

impl AckedIds {
    /// Keeps at most `max` ids; `size` follows how many, `evicted` counts those forgotten
    /// before their time.
    pub fn limit(&mut self, max: usize, size: Gauge, evicted: Counter) {
        self.max = max.max(1);
        self.size = size;
        self.evicted = evicted;
        self.trim(None);
    }

    /// Remembers `id` until `until`.
    pub fn insert(&mut self, id: &str, until: Instant) {
        let id: Arc<str> = id.into();
        self.until.insert(id.clone(), until);
        self.order.push_back((until, id));
        self.trim(None);
    }

    /// Whether `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.until.contains_key(id)
    }

    /// Forgets the ids whose instant passed.
    pub fn expire(&mut self, now: Instant) {
        self.trim(Some(now));
    }

    fn trim(&mut self, now: Option<Instant>) {
        loop {
            let over = self.order.len() > self.max;
            let expired = match (now, self.order.front()) {
                (Some(now), Some((until, _))) => *until <= now,
                _ => false,
            };
            if !over && !expired {
                break;
            }
            let Some((until, id)) = self.order.pop_front() else {
                break;
            };
            // A later insert of the same id is the one that removes it.
            if self.until.get(&id) == Some(&until) {
                self.until.remove(&id);
                if !expired {
                    self.evicted.inc();
                }
            }
        }
        self.size.set(self.until.len() as i64);
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ids_are_forgotten_when_their_window_ends() {
        let now = Instant::now();
        let mut a = AckedIds::default();
        a.insert("m1", now + Duration::from_secs(1));
        a.insert("m2", now + Duration::from_secs(2));
        a.expire(now + Duration::from_secs(1));
        assert!(!a.contains("m1") && a.contains("m2"));
        a.expire(now + Duration::from_secs(2));
        assert!(a.is_empty());
    }

    #[test]
    fn beyond_the_bound_the_oldest_are_forgotten_and_counted() {
        let now = Instant::now();
        let (size, evicted) = (Gauge::default(), Counter::default());
        let mut a = AckedIds::default();
        a.limit(100, size.clone(), evicted.clone());
        let later = now + Duration::from_secs(60);
        for i in 0..1000 {
            a.insert(&format!("m{i}"), later);
        }
        assert_eq!((a.len(), size.get(), evicted.get()), (100, 100, 900));
        assert!(a.contains("m999") && !a.contains("m899"));
        // Re-acking an id keeps the newest instant (and makes room: m900 goes).
        a.insert("m999", later + Duration::from_secs(1));
        assert_eq!((a.len(), evicted.get()), (99, 901));
        a.expire(later);
        assert_eq!(a.len(), 1);
        assert!(a.contains("m999"));
        assert_eq!(evicted.get(), 901, "expiry is not eviction");
    }
}
