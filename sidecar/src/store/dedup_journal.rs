//! The dedup window's journal: an append-only file of the ids a topic stored, with their
//! offset and time, so that the window survives a restart (`kill -9` or power loss) of the
//! producer's sidecar.
//!
//! Why a file of its own rather than the log's records (which carry id and publish time):
//! the log skips and then deletes records every subscription settled, and a message that
//! was delivered and acked is exactly the one whose publisher may still retry it.
//!
//! Record: `u32 body length | u32 CRC-32C of the body | body`, body =
//! `u64 time_ms | u64 offset | id bytes`, little endian. A torn or corrupt tail (a crash
//! mid-write) ends the replay and is cut off; the ids in it were not acknowledged as
//! durable, so forgetting them can only let a duplicate in, never drop a message.
//!
//! Writes go to the OS each store round ([`DedupJournal::flush`]: survives `kill -9`) and are
//! fsynced about once a second and before the log deletes settled segments
//! ([`DedupJournal::sync`]), not with every log fsync: that would double the fsyncs of
//! group commit. Two rules at startup keep that safe (`dedup.rs`): ids whose offset lies
//! past the end of the recovered log are dropped (their records were lost, and a retry of
//! them must be stored again), and the log's records after the last journalled offset
//! are read back, so that a power loss forgets only ids of records that were already
//! settled and not yet journalled durably (at most about one second of them).
//!
//! The consuming side keeps the ids its app acked on `ExactlyOnce` subscriptions in the
//! same format (`consumer/acked_journal.rs`).
//!
//! The file is rewritten with only the ids still inside the window once it holds many more
//! records than that (temporary file, fsync, rename, directory fsync).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::log::{Offset, powerloss};

/// The journal's file name inside the topic's log directory.
pub const FILE: &str = "dedup.ids";
/// Rewrite once the file holds this many records more than twice the live ones.
const COMPACT_SLACK: u64 = 4096;
const HEADER: usize = 8;
const FIXED: usize = 16;
/// Longest id accepted back from the file (ids are far shorter; this bounds a bad length).
const MAX_BODY: usize = 64 << 10;

/// Errors of the journal, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("dedup journal {path}: {op} failed: {source}")]
pub struct JournalError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError { op, path, source }
}

/// One remembered id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub id: String,
    pub offset: Offset,
    pub time_ms: u64,
}

/// The open journal of one topic.
#[derive(Debug)]
pub struct DedupJournal {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Records in the file (and the buffer).
    records: u64,
    /// Written to the OS since the last fsync.
    dirty: bool,
}

fn encode(out: &mut Vec<u8>, e: &JournalEntry) {
    let mut body = Vec::with_capacity(FIXED + e.id.len());
    body.extend_from_slice(&e.time_ms.to_le_bytes());
    body.extend_from_slice(&e.offset.to_le_bytes());
    body.extend_from_slice(e.id.as_bytes());
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Decodes records from `bytes`; returns them and the length of the valid prefix.
fn decode(bytes: &[u8]) -> (Vec<JournalEntry>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let word = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[at + i..at + i + 4]);
            u32::from_le_bytes(w)
        };
        let len = word(0) as usize;
        let crc = word(4);
        if !(FIXED..=MAX_BODY).contains(&len) || bytes.len() - at - HEADER < len {
            break;
        }
        let body = &bytes[at + HEADER..at + HEADER + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&body[0..8]);
        let time_ms = u64::from_le_bytes(n);
        n.copy_from_slice(&body[8..16]);
        let offset = u64::from_le_bytes(n);
        let Ok(id) = std::str::from_utf8(&body[FIXED..]) else {
            break;
        };
        out.push(JournalEntry {
            id: id.to_owned(),
            offset,
            time_ms,
        });
        at += HEADER + len;
    }
    (out, at)
}

impl DedupJournal {
    /// Opens (creating) the journal in `dir`, returning every valid record; a torn tail is
    /// cut off and reported in the log.
    pub fn open(dir: &Path) -> Result<(Self, Vec<JournalEntry>), JournalError> {
        Self::open_at(dir.join(FILE))
    }

    /// Opens (creating) the journal file `path`; see [`DedupJournal::open`]. The consumer's
    /// ExactlyOnce acked ids use the same format in their own file.
    pub fn open_at(path: PathBuf) -> Result<(Self, Vec<JournalEntry>), JournalError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err("open", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err("read", &path))?;
        let (entries, valid) = decode(&bytes);
        if valid < bytes.len() {
            tracing::warn!(path = %path.display(), valid, cut = bytes.len() - valid, "dedup journal: cutting a torn tail");
            file.set_len(valid as u64).map_err(err("truncate", &path))?;
            file.sync_data().map_err(err("fsync", &path))?;
            powerloss::synced(&path);
        }
        let records = entries.len() as u64;
        Ok((
            Self {
                path,
                file,
                buf: Vec::new(),
                records,
                dirty: false,
            },
            entries,
        ))
    }

    /// Queues a record (written by the next `flush`).
    pub fn append(&mut self, entry: &JournalEntry) {
        encode(&mut self.buf, entry);
        self.records += 1;
    }

    /// Writes queued records to the OS (they survive `kill -9`, not a power loss).
    pub fn flush(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .map_err(err("write", &self.path))?;
        self.buf.clear();
        self.dirty = true;
        Ok(())
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        if self.dirty {
            self.file.sync_data().map_err(err("fsync", &self.path))?;
            powerloss::synced(&self.path);
            self.dirty = false;
        }
        Ok(())
    }

    /// Whether the file holds so many expired records that `rewrite` pays off.
    pub fn wants_rewrite(&self, live: usize) -> bool {
        self.records > 2 * live as u64 + COMPACT_SLACK
    }

    /// Replaces the file with `live` records only (atomically: temp file, fsync, rename).
    pub fn rewrite<'a>(
        &mut self,
        live: impl Iterator<Item = &'a JournalEntry>,
    ) -> Result<(), JournalError> {
        self.sync()?;
        let tmp = self.path.with_extension("ids.tmp");
        let mut bytes = Vec::new();
        let mut n = 0u64;
        for e in live {
            encode(&mut bytes, e);
            n += 1;
        }
        let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(&bytes).map_err(err("write", &tmp))?;
        f.sync_data().map_err(err("fsync", &tmp))?;
        powerloss::synced(&tmp);
        std::fs::rename(&tmp, &self.path).map_err(err("rename", &self.path))?;
        powerloss::renamed(&tmp, &self.path);
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err("fsync directory", dir))?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(err("reopen", &self.path))?;
        self.records = n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> JournalEntry {
        JournalEntry {
            id: format!("id-{i}"),
            offset: i,
            time_ms: 1_000 + i,
        }
    }

    #[test]
    fn replays_what_was_flushed_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, none) = DedupJournal::open(dir.path()).unwrap();
        assert!(none.is_empty());
        for i in 0..3 {
            j.append(&entry(i));
        }
        j.flush().unwrap();
        drop(j);
        // A torn record at the end, as a crash mid-write leaves it.
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut j, got) = DedupJournal::open(dir.path()).unwrap();
        assert_eq!(got, (0..3).map(entry).collect::<Vec<_>>());
        j.append(&entry(3));
        j.sync().unwrap();
        let (_, got) = DedupJournal::open(dir.path()).unwrap();
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn rewrite_keeps_only_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = DedupJournal::open(dir.path()).unwrap();
        for i in 0..10 {
            j.append(&entry(i));
        }
        j.flush().unwrap();
        let live: Vec<JournalEntry> = (8..10).map(entry).collect();
        j.rewrite(live.iter()).unwrap();
        j.append(&entry(10));
        j.sync().unwrap();
        let (_, got) = DedupJournal::open(dir.path()).unwrap();
        assert_eq!(got, (8..11).map(entry).collect::<Vec<_>>());
    }
}
