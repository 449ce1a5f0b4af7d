//! Producer-side deduplication: a message id seen within the topic's `dedupWindow` is not
//! stored twice; the publisher gets the first copy's offset back, flagged as a duplicate.
//!
//! Time is monotonic (`Instant`), so wall-clock jumps neither expire ids early nor keep them
//! forever (docs/reliability.md row 14). For disk topics the window also lives in a journal
//! (`dedup_journal.rs`) so that it survives a restart: at startup each journalled id gets
//! the time it has left, computed once from its wall-clock stamp against the wall clock as
//! read at this startup (`crate::clock`), and counts down on the monotonic clock from there.
//! A wall-clock step *between* two runs of the sidecar shifts those remaining times once; a
//! step while it runs changes nothing.

use std::collections::VecDeque;

// Seeded per process (ids come from apps), several times faster than SipHash per publish.
use foldhash::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::dedup_journal::{DedupJournal, JournalEntry, JournalError};
use crate::clock::Anchor;
use crate::log::{Log, Offset};

/// Most log records read back at startup for ids the journal may not have made durable.
const LOG_TAIL_SCAN: u64 = 1 << 20;

/// Ids seen within a sliding window.
#[derive(Debug)]
pub struct DedupWindow {
    window: Duration,
    /// Offset of each id and its wall-clock stamp (for the journal's rewrite).
    seen: HashMap<String, (Offset, u64)>,
    /// When each id is forgotten, oldest first.
    order: VecDeque<(Instant, String)>,
    journal: Option<DedupJournal>,
    anchor: Anchor,
    /// Most ids kept; the oldest go first, before their time, past it.
    max_ids: usize,
    /// Ids forgotten before their time.
    evicted: Counter,
}

impl DedupWindow {
    /// An in-memory window of `window`; zero turns deduplication off.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: HashMap::default(),
            order: VecDeque::new(),
            journal: None,
            anchor: crate::clock::anchor(),
            max_ids: usize::MAX,
            evicted: Counter::default(),
        }
    }

    /// Keeps at most `max_ids` ids (at least one), counting those forgotten early in
    /// `evicted`: memory stays bounded whatever the publish rate, at the cost of a shorter
    /// window when the rate is high.
    pub fn limit(mut self, max_ids: usize, evicted: Counter) -> Self {
        self.max_ids = max_ids.max(1);
        self.evicted = evicted;
        self.evict_over_limit();
        self
    }

    fn evict_over_limit(&mut self) {
        while self.seen.len() > self.max_ids {
            let Some((_, id)) = self.order.pop_front() else {
                return;
            };
            if self.seen.remove(&id).is_some() {
                self.evicted.inc();
            }
        }
    }

    /// A window kept in a journal in `dir` too, re-seeded from it and from the records of
    /// `log` (the topic's recovered log) that come after the last journalled one. A zero
    /// window opens no journal.
    ///
    /// Journalled ids whose offset is past the end of the recovered log are dropped: their
    /// records were lost (a power loss, a torn tail), and remembering them would answer a
    /// publisher's retry "duplicate" for a message that no longer exists. This check is what
    /// lets the journal be fsynced on its own schedule rather than after every log fsync.
    pub fn open(window: Duration, dir: &Path, log: &dyn Log) -> Result<Self, JournalError> {
        let mut w = Self::new(window);
        if !w.enabled() {
            return Ok(w);
        }
        let (journal, entries) = DedupJournal::open(dir)?;
        let journalled = entries.len();
        let written = log.written();
        let mut entries: Vec<JournalEntry> =
            entries.into_iter().filter(|e| e.offset < written).collect();
        let dropped = journalled - entries.len();
        // Records after the last journalled offset: their ids may not have reached the
        // journal's disk before a crash.
        let from = entries
            .iter()
            .map(|e| e.offset + 1)
            .max()
            .unwrap_or(0)
            .max(log.first())
            .max(written.saturating_sub(LOG_TAIL_SCAN));
        let mut at = from;
        while at < written {
            let Ok(batch) = log.read(at, 1024) else {
                break;
            };
            let Some((last, _)) = batch.last() else {
                break;
            };
            at = last + 1;
            entries.extend(batch.into_iter().map(|(offset, m)| JournalEntry {
                id: m.id,
                offset,
                time_ms: m.publish_time_ms,
            }));
        }
        w.seed(entries, Instant::now());
        tracing::info!(dir = %dir.display(), journalled, dropped, from_log = written.saturating_sub(from),
            remembered = w.len(), "dedup window restored");
        w.journal = Some(journal);
        Ok(w)
    }

    /// Remembers journalled ids for the time they have left (see the module documentation).
    fn seed(&mut self, mut entries: Vec<JournalEntry>, now: Instant) {
        entries.sort_by_key(|e| e.time_ms);
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        for e in entries {
            let left = self
                .anchor
                .until(e.time_ms.saturating_add(window_ms), now)
                .min(self.window);
            if left.is_zero() {
                continue;
            }
            if self
                .seen
                .insert(e.id.clone(), (e.offset, e.time_ms))
                .is_none()
            {
                self.order.push_back((now + left, e.id));
            }
        }
    }

    /// The offset `id` was stored at, if the window still remembers it (expired or not yet
    /// swept): for telling a re-learning producer that its own log stored the id.
    pub fn stored_at(&self, id: &str) -> Option<Offset> {
        self.seen.get(id).map(|(offset, _)| *offset)
    }

    /// Whether deduplication is on.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The offset of `id` if it was stored within the window.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<Offset> {
        self.expire(now);
        self.seen.get(id).map(|(o, _)| *o)
    }

    /// Remembers `id` as stored at `offset` (journalled at the next `flush`).
    pub fn insert(&mut self, id: String, offset: Offset, now: Instant) {
        if !self.enabled() {
            return;
        }
        let time_ms = self.anchor.wall_ms_at(now);
        if self.seen.insert(id.clone(), (offset, time_ms)).is_none() {
            if let Some(j) = &mut self.journal {
                j.append(&JournalEntry {
                    id: id.clone(),
                    offset,
                    time_ms,
                });
            }
            self.order.push_back((now + self.window, id));
            self.evict_over_limit();
        }
    }

    /// Writes journalled ids to the OS (they survive `kill -9`). Called once per store round
    /// that stored something; a failure is logged: it can only let a duplicate in after a
    /// restart.
    pub fn flush(&mut self) {
        if let Some(j) = &mut self.journal
            && let Err(e) = j.flush()
        {
            tracing::warn!(error = %e, "dedup journal write failed; ids may be forgotten at restart");
        }
    }

    /// Makes journalled ids durable; called about once a second by the store thread, and
    /// always before the log deletes settled segments, so that an id outlives its record.
    /// Rewrites the journal when it is mostly expired ids.
    pub fn sync(&mut self) {
        let Some(j) = &mut self.journal else {
            return;
        };
        let result = if j.wants_rewrite(self.seen.len()) {
            let live: Vec<JournalEntry> = self
                .order
                .iter()
                .filter_map(|(_, id)| {
                    self.seen.get(id).map(|(offset, time_ms)| JournalEntry {
                        id: id.clone(),
                        offset: *offset,
                        time_ms: *time_ms,
                    })
                })
                .collect();
            j.rewrite(live.iter())
        } else {
            j.sync()
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "dedup journal sync failed; ids may be forgotten after a power loss");
        }
    }

    /// Forgets ids older than the window.
    pub fn expire(&mut self, now: Instant) {
        while let Some((until, _)) = self.order.front() {
            if now < *until {
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
    fn past_the_limit_the_oldest_ids_go_first_and_are_counted() {
        let evicted = Counter::default();
        let mut d = DedupWindow::new(Duration::from_secs(60)).limit(3, evicted.clone());
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            d.insert(id.into(), i as Offset, t0);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(evicted.get(), 2);
        assert_eq!(d.get("a", t0), None);
        assert_eq!(d.get("b", t0), None);
        assert_eq!(d.get("c", t0), Some(2));
        assert_eq!(d.get("e", t0), Some(4));
    }

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

    fn log_of(ids: &[&str]) -> crate::log::MemoryLog {
        let mut log = crate::log::MemoryLog::new();
        let messages: Vec<_> = ids
            .iter()
            .map(|id| crate::log::StoredMessage {
                id: (*id).into(),
                publish_time_ms: crate::clock::now_ms(),
                ..crate::log::tests::msg(0)
            })
            .collect();
        log.append(&messages).unwrap();
        log
    }

    #[test]
    fn the_journal_restores_the_window_with_the_time_left() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(60);
        let log = log_of(&["x", "a", "b"]);
        let mut d = DedupWindow::open(window, dir.path(), &log).unwrap();
        let t0 = Instant::now();
        d.insert("a".into(), 1, t0);
        d.insert("b".into(), 2, t0);
        d.flush();
        drop(d);
        // A journalled id stamped long ago is not restored.
        let (mut j, _) = DedupJournal::open(dir.path()).unwrap();
        j.append(&JournalEntry {
            id: "old".into(),
            offset: 0,
            time_ms: crate::clock::now_ms().saturating_sub(120_000),
        });
        j.sync().unwrap();
        drop(j);
        let mut d = DedupWindow::open(window, dir.path(), &log).unwrap();
        let now = Instant::now();
        assert_eq!(d.get("a", now), Some(1));
        assert_eq!(d.get("b", now), Some(2));
        assert_eq!(d.get("old", now), None);
        // At most the window is left, counted on the monotonic clock.
        assert_eq!(d.get("a", now + window), None);
    }

    #[test]
    fn ids_whose_records_were_lost_are_dropped_and_unjournalled_records_added() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(60);
        let (mut j, _) = DedupJournal::open(dir.path()).unwrap();
        let time_ms = crate::clock::now_ms();
        for (id, offset) in [("a", 0), ("ghost", 5)] {
            j.append(&JournalEntry {
                id: id.into(),
                offset,
                time_ms,
            });
        }
        j.sync().unwrap();
        drop(j);
        // The log kept a, b and c; b and c never reached the journal's disk, and the
        // record of "ghost" (offset 5) was lost.
        let log = log_of(&["a", "b", "c"]);
        let mut d = DedupWindow::open(window, dir.path(), &log).unwrap();
        let now = Instant::now();
        assert_eq!(d.get("a", now), Some(0));
        assert_eq!(d.get("b", now), Some(1));
        assert_eq!(d.get("c", now), Some(2));
        assert_eq!(d.get("ghost", now), None);
    }

    #[test]
    fn seeding_keeps_the_time_left_not_a_full_window() {
        let mut d = DedupWindow::new(Duration::from_secs(60));
        let now = Instant::now();
        let stamp = d.anchor.wall_ms_at(now).saturating_sub(50_000);
        d.seed(
            vec![JournalEntry {
                id: "x".into(),
                offset: 4,
                time_ms: stamp,
            }],
            now,
        );
        assert_eq!(d.get("x", now + Duration::from_secs(9)), Some(4));
        assert_eq!(d.get("x", now + Duration::from_secs(11)), None);
    }
}
