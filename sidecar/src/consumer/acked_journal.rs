//! `ExactlyOnce`: the message ids this pod's app acked, kept in a file of the data dir
//! (`consumer/<namespace>/<subscription>/acked.ids`, the format of `store/dedup_journal.rs`)
//! so that the memory survives `kill -9` of this sidecar.
//!
//! Each ack is appended and fsynced *before* the ack is sent upstream to the producer. If
//! this sidecar dies between the two, the producer never hears of the ack and delivers the
//! message again after the restart; the restarted sidecar finds its id here and answers
//! ACKED without handing the app a second copy (an idempotent receiver).
//!
//! Ids are kept for the topic's `dedupWindow`. At startup each id gets the time it has
//! left, computed once from its stamp against the wall clock as read at startup, then
//! counted down on the monotonic clock (`crate::clock`). The file is rewritten with the
//! live ids once it holds many more expired ones. At most `max` ids are live (the newest;
//! `--dedup-max-ids`, as in memory: see `acked_ids.rs`), so that neither the file nor the
//! list of live ids kept for its rewrite grows without bound.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::Anchor;
use crate::store::dedup_journal::{DedupJournal, JournalEntry, JournalError};

/// The file's name in the subscription's folder.
pub const FILE: &str = "acked.ids";

/// Where the acked ids of `subscription` (`namespace/name`) live under `data_dir`.
pub fn path(data_dir: &Path, subscription: &str) -> PathBuf {
    let mut p = data_dir.join("consumer");
    for part in subscription.split('/') {
        p.push(part);
    }
    p.join(FILE)
}

/// The open journal of one subscription's acked ids.
#[derive(Debug)]
pub struct AckedJournal {
    journal: DedupJournal,
    window: Duration,
    /// Ids still inside the window, oldest first, for the rewrite.
    live: VecDeque<(Instant, JournalEntry)>,
    max: usize,
    anchor: Anchor,
}

impl AckedJournal {
    /// Opens (creating) the journal of `subscription`; returns it and the ids still inside
    /// `window` (the newest `max` of them), each with the instant it is forgotten.
    pub fn open(
        data_dir: &Path,
        subscription: &str,
        window: Duration,
        max: usize,
    ) -> Result<(Self, Vec<(String, Instant)>), JournalError> {
        let path = path(data_dir, subscription);
        if let Some(dir) = path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the acked-id folder");
        }
        let (journal, entries) = DedupJournal::open_at(path)?;
        let mut j = Self {
            journal,
            window,
            live: VecDeque::new(),
            max: max.max(1),
            anchor: crate::clock::anchor(),
        };
        let now = Instant::now();
        let mut seeded = Vec::new();
        let mut entries = entries;
        entries.sort_by_key(|e| e.time_ms);
        let skip = entries.len().saturating_sub(j.max);
        for e in entries.into_iter().skip(skip) {
            let until = j.until(e.time_ms, now);
            if until > now {
                seeded.push((e.id.clone(), until));
                j.live.push_back((until, e));
            }
        }
        tracing::info!(
            subscription,
            remembered = seeded.len(),
            "ExactlyOnce acked ids restored"
        );
        Ok((j, seeded))
    }

    fn until(&self, time_ms: u64, now: Instant) -> Instant {
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        now + self
            .anchor
            .until(time_ms.saturating_add(window_ms), now)
            .min(self.window)
    }

    /// Appends `id` and fsyncs it. Returns once it would survive a power loss.
    pub fn record(&mut self, id: &str, now: Instant) -> Result<(), JournalError> {
        let entry = JournalEntry {
            id: id.to_owned(),
            offset: 0,
            time_ms: self.anchor.wall_ms_at(now),
        };
        self.journal.append(&entry);
        self.live.push_back((now + self.window, entry));
        while self.live.len() > self.max
            || self.live.front().is_some_and(|(until, _)| *until <= now)
        {
            self.live.pop_front();
        }
        if self.journal.wants_rewrite(self.live.len()) {
            self.journal.rewrite(self.live.iter().map(|(_, e)| e))
        } else {
            self.journal.sync()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_ids_survive_reopening_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(60);
        let (mut j, none) = AckedJournal::open(dir.path(), "ns/sub", window, 10).unwrap();
        assert!(none.is_empty());
        let now = Instant::now();
        j.record("m1", now).unwrap();
        j.record("m2", now).unwrap();
        drop(j);
        let (_, ids) = AckedJournal::open(dir.path(), "ns/sub", window, 10).unwrap();
        let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["m1", "m2"]);
        assert!(
            ids.iter()
                .all(|(_, until)| *until <= Instant::now() + window)
        );
        assert!(path(dir.path(), "ns/sub").ends_with("consumer/ns/sub/acked.ids"));
    }

    #[test]
    fn at_most_the_newest_max_ids_are_kept_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(60);
        let (mut j, _) = AckedJournal::open(dir.path(), "ns/sub", window, 3).unwrap();
        let now = Instant::now();
        for i in 0..200 {
            j.record(&format!("m{i}"), now).unwrap();
            assert!(j.live.len() <= 3);
        }
        drop(j);
        let (_, ids) = AckedJournal::open(dir.path(), "ns/sub", window, 3).unwrap();
        let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["m197", "m198", "m199"]);
    }
}
