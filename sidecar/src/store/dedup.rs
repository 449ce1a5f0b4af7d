//! Producer-side deduplication: a message id seen within the topic's `dedupWindow` is not
//! stored twice; the publisher gets the first copy's offset back, flagged as a duplicate.
//!
//! Time is monotonic (`Instant`), so wall-clock jumps neither expire ids early nor keep them
//! forever (RELIABILITY.md row 14). The window lives in memory: after a restart, ids
//! published before it are not remembered (a documented duplicate source).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::log::Offset;

/// Ids seen within a sliding window.
#[derive(Debug)]
pub struct DedupWindow {
    window: Duration,
    seen: HashMap<String, Offset>,
    order: VecDeque<(Instant, String)>,
}

impl DedupWindow {
    /// A window of `window`; zero turns deduplication off.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether deduplication is on.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The offset of `id` if it was stored within the window.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<Offset> {
        self.expire(now);
        self.seen.get(id).copied()
    }

    /// Remembers `id` as stored at `offset`.
    pub fn insert(&mut self, id: String, offset: Offset, now: Instant) {
        if !self.enabled() {
            return;
        }
        if self.seen.insert(id.clone(), offset).is_none() {
            self.order.push_back((now, id));
        }
    }

    /// Forgets ids older than the window.
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_window_and_forgets_after() {
        let mut d = DedupWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(d.get("a", t0), None);
        d.insert("a".into(), 7, t0);
        assert_eq!(d.get("a", t0 + Duration::from_secs(9)), Some(7));
        assert_eq!(d.get("a", t0 + Duration::from_secs(10)), None);
        assert!(d.is_empty());
    }

    #[test]
    fn zero_window_is_off() {
        let mut d = DedupWindow::new(Duration::ZERO);
        let t0 = Instant::now();
        d.insert("a".into(), 1, t0);
        assert_eq!(d.get("a", t0), None);
    }

    #[test]
    fn reinsert_keeps_first_offset_slot() {
        let mut d = DedupWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        d.insert("a".into(), 1, t0);
        d.insert("b".into(), 2, t0 + Duration::from_secs(5));
        assert_eq!(d.len(), 2);
        assert_eq!(d.get("b", t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(d.get("a", t0 + Duration::from_secs(11)), None);
    }
}
