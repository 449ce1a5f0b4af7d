//! Per-key sequence numbers of an ordered topic (`Delivery.key_sequence`), bounded in memory
//! and increasing per key across restarts of the sidecar.
//!
//! The promise (`app.proto`): every message of a key from this producer gets a higher number
//! than the one before it, also after a restart. While a key is remembered its numbers go up
//! by 1. At most `max_keys` keys are remembered (`--ordered-max-keys`); beyond that the least
//! recently published one is forgotten, and its number lifts a *floor*: every number ever
//! given to a key that is not remembered is at most the floor, and such a key continues at
//! floor + 1. A forgotten key's numbers therefore jump ahead, never back.
//!
//! Across restarts the floor is a reserved high mark kept in a small file next to the
//! topic's log ([`FILE`]): before a number above the mark is handed out, the mark is moved
//! [`RESERVE`] ahead and fsynced (once per `RESERVE` numbers). A restarted sidecar remembers
//! no key and continues every key above the mark, so a key's numbers jump by at most
//! `RESERVE` plus its gap at a restart. The log is not scanned for the last numbers instead:
//! compaction may have removed a key's newest record while an older one stays, and the scan
//! would hold every key of the backlog in memory.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::log::powerloss;

/// The high mark's file in the topic's folder: the mark in decimal.
pub const FILE: &str = "key_sequence.high";
/// How far the high mark is moved ahead of the highest number handed out.
pub const RESERVE: u64 = 1 << 20;

/// Why the high mark could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a number: {text:?}")]
    Corrupt { path: PathBuf, text: String },
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    sequence: u64,
    /// When the key was last published, in commits: the LRU order.
    touched: u64,
}

/// The numbering state of one ordered topic, owned by its store thread.
#[derive(Debug)]
pub struct KeySequences {
    max_keys: usize,
    keys: HashMap<Arc<str>, Remembered>,
    /// Keys by the commit that touched them, oldest first; an entry whose stamp no longer
    /// matches the key's is stale and skipped (rebuilt once stale entries dominate).
    order: VecDeque<(u64, Arc<str>)>,
    ticks: u64,
    floor: u64,
    reserved: u64,
    file: Option<PathBuf>,
    remembered: Gauge,
    evicted: Counter,
}

impl KeySequences {
    /// Numbering that is not kept across restarts (in-memory logs of tests).
    pub fn in_memory(max_keys: usize, remembered: Gauge, evicted: Counter) -> Self {
        Self {
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
            order: VecDeque::new(),
            ticks: 0,
            floor: 0,
            reserved: u64::MAX,
            file: None,
            remembered,
            evicted,
        }
    }

    /// Numbering continuing above the high mark kept in `dir` (created if missing).
    pub fn open(
        dir: &Path,
        max_keys: usize,
        remembered: Gauge,
        evicted: Counter,
    ) -> Result<Self, SequenceError> {
        let path = dir.join(FILE);
        let io = |op, source| SequenceError::Io {
            op,
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
        let floor = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| SequenceError::Corrupt {
                    path: path.clone(),
                    text: text.chars().take(40).collect(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("reading", e)),
        };
        let mut s = Self::in_memory(max_keys, remembered, evicted);
        s.floor = floor;
        s.reserved = floor;
        s.file = Some(path);
        Ok(s)
    }

    /// The last number of `key`, or the floor if it is not remembered.
    pub fn last(&self, key: &str) -> u64 {
        self.keys.get(key).map_or(self.floor, |r| r.sequence)
    }

    /// Makes sure numbers up to `highest` survive a restart as "used" before any is handed
    /// out: moves the high mark [`RESERVE`] past it and fsyncs it when needed.
    pub fn reserve(&mut self, highest: u64) -> Result<(), SequenceError> {
        if highest <= self.reserved {
            return Ok(());
        }
        let mark = highest.saturating_add(RESERVE);
        if let Some(path) = &self.file {
            write_durably(path, mark)?;
        }
        self.reserved = mark;
        Ok(())
    }

    /// Records the numbers a stored round handed out, then forgets the least recently
    /// published keys beyond the bound.
    pub fn commit(&mut self, round: impl IntoIterator<Item = (String, u64)>) {
        for (key, sequence) in round {
            self.ticks += 1;
            let key: Arc<str> = key.into();
            self.keys.insert(
                key.clone(),
                Remembered {
                    sequence,
                    touched: self.ticks,
                },
            );
            self.order.push_back((self.ticks, key));
        }
        while self.keys.len() > self.max_keys {
            let Some((touched, key)) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.keys.get(&key).copied()
                && r.touched == touched
            {
                self.keys.remove(&key);
                self.floor = self.floor.max(r.sequence);
                self.evicted.inc();
            }
        }
        if self.order.len() > 2 * self.keys.len() + 1024 {
            let mut fresh: Vec<(u64, Arc<str>)> = self
                .keys
                .iter()
                .map(|(k, r)| (r.touched, k.clone()))
                .collect();
            fresh.sort_unstable_by_key(|(t, _)| *t);
            self.order = fresh.into();
        }
        self.remembered.set(self.keys.len() as i64);
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Replaces the file at `path` with `mark` so that a crash leaves the old or the new mark.
fn write_durably(path: &Path, mark: u64) -> Result<(), SequenceError> {
    let tmp = path.with_extension("high.tmp");
    let io = |op, source| SequenceError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(format!("{mark}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    powerloss::synced(&tmp);
    std::fs::rename(&tmp, path).map_err(|e| io("renaming onto", e))?;
    powerloss::renamed(&tmp, path);
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the folder of", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(s: &mut KeySequences, keys: &[&str]) -> Vec<u64> {
        let mut out = Vec::new();
        for k in keys {
            let n = s.last(k) + 1;
            s.reserve(n).unwrap();
            s.commit([((*k).to_owned(), n)]);
            out.push(n);
        }
        out
    }

    #[test]
    fn numbers_go_up_by_one_per_key_while_remembered() {
        let mut s = KeySequences::in_memory(10, Gauge::default(), Counter::default());
        assert_eq!(
            numbered(&mut s, &["a", "b", "a", "a", "b"]),
            [1, 1, 2, 3, 2]
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn forgotten_keys_jump_ahead_never_back_and_memory_stays_bounded() {
        let evicted = Counter::default();
        let gauge = Gauge::default();
        let mut s = KeySequences::in_memory(3, gauge.clone(), evicted.clone());
        let mut last: HashMap<String, u64> = HashMap::new();
        for i in 0..5000u64 {
            // A hot key and a stream of cold ones.
            let k = if i % 2 == 0 {
                "hot".to_owned()
            } else {
                format!("k{}", i % 17)
            };
            let n = numbered(&mut s, &[&k])[0];
            if let Some(prev) = last.insert(k.clone(), n) {
                assert!(n > prev, "{k}: {n} after {prev}");
            }
            assert!(s.len() <= 3);
            assert!(s.order.len() <= 2 * 3 + 1024 + 1);
        }
        assert!(evicted.get() > 0);
        assert_eq!(gauge.get(), 3);
        // The hot key is never the least recently used: it kept counting by one.
        assert_eq!(last["hot"], 2500);
    }

    #[test]
    fn numbering_continues_above_the_high_mark_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let open = || KeySequences::open(dir.path(), 10, Gauge::default(), Counter::default());
        let mut s = open().unwrap();
        assert_eq!(numbered(&mut s, &["a", "a", "b"]), [1, 2, 1]);
        drop(s);
        let mut s = open().unwrap();
        let after = numbered(&mut s, &["a", "b", "a"]);
        assert!(after[0] > 2 && after[1] > 1, "{after:?}");
        assert_eq!(after[2], after[0] + 1);
        drop(s);
        // The mark moved past what the second start handed out: a third start is above it.
        let mut s = open().unwrap();
        assert!(numbered(&mut s, &["a"])[0] > after[2]);
    }

    #[test]
    fn a_corrupt_mark_is_an_error_not_a_restart_from_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        let r = KeySequences::open(dir.path(), 10, Gauge::default(), Counter::default());
        assert!(matches!(r, Err(SequenceError::Corrupt { .. })));
    }
}
