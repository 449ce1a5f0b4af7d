//! The durable form of `Settlements`: a file of settlement records beside the segments.
//!
//! Why a separate file rather than settle records in the segment stream: compaction
//! deletes segments, and a subscription's progress must outlive the segments it settled.
//! The file uses the segment record format (length, CRC-32C, offset, kind):
//!
//! - `Subscribe`: header offset = the subscription's starting cursor, body = name.
//! - `Unsubscribe`: body = name.
//! - `Settle`: header offset = the settled offset, body = how (u8) + name.
//! - `SettleRange`: header offset = first settled offset, body = end (u64, exclusive) +
//!   name (snapshots: one per range settled above a cursor).
//! - `Gone`: header offset = first offset, body = end (u64, exclusive): records compaction
//!   removed after every subscription settled them (written before the removal).
//!
//! Entries are buffered by `settle` and written with one write and one fdatasync at the
//! log's `sync`, after the segment's fsync: so a durable settlement never refers to a
//! record that is not durable. Once the file is much larger than the state it encodes,
//! `rewrite` replaces it with a snapshot (a `Subscribe` per subscription plus a `Settle`
//! range settled above its cursor, and a `Gone` per gone range) via write-to-temp, fsync, rename, fsync directory.
//! A torn or corrupt entry only loses a settlement, which at worst causes a redelivery.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::io::{failpoint, io_err, sync_data, sync_dir, write_synced_temp};
use super::record::{self, Frame, Kind, Reader};
use super::settlement::Settlements;
use super::{LogError, Offset, Settlement};

pub const FILE_NAME: &str = "settlements.dat";
const TMP_NAME: &str = "settlements.tmp";
/// Bound on a settlement record; subscription names are short.
const MAX_LEN: u32 = 64 * 1024;
/// Below this size the file is never rewritten.
const REWRITE_MIN: u64 = 1 << 20;

/// What replaying the file found.
#[derive(Debug, Default)]
pub struct Replay {
    pub truncated_bytes: u64,
    pub corrupt_records: usize,
}

/// The settlement file of one log.
#[derive(Debug)]
pub struct SettlementStore {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    /// Entries recorded since the last `sync`.
    pending: Vec<u8>,
}

impl SettlementStore {
    /// Opens (or creates) the file in `dir` and replays it into `state`, ignoring entries
    /// for offsets at or beyond `next` (never written durably).
    pub fn open(
        dir: &Path,
        state: &mut Settlements,
        next: Offset,
    ) -> Result<(Self, Replay), LogError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(TMP_NAME);
        if tmp.exists() {
            std::fs::remove_file(&tmp).map_err(io_err("remove stale snapshot", &tmp))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open settlement file", &path))?;
        let buf = std::fs::read(&path).map_err(io_err("read settlement file", &path))?;
        let buf = Bytes::from(buf);
        let mut replay = Replay::default();
        let mut pos = 0;
        let mut good_end = 0;
        while pos < buf.len() {
            match record::parse_frame(&buf[pos..], MAX_LEN) {
                Ok(frame) => {
                    let body = buf.slice(pos + frame.body_start..pos + frame.total_len);
                    if apply(state, &frame, &body, next).is_err() {
                        replay.corrupt_records += 1;
                    }
                    pos += frame.total_len;
                    good_end = pos;
                }
                Err(e) => match (pos + 1..buf.len())
                    .find(|&p| record::parse_frame(&buf[p..], MAX_LEN).is_ok())
                {
                    Some(p) => {
                        tracing::error!(path = %path.display(), position = pos, error = %e,
                            "corrupt settlement record skipped; its settlement may be redelivered");
                        replay.corrupt_records += 1;
                        pos = p;
                    }
                    None => break,
                },
            }
        }
        let len = good_end as u64;
        if len < buf.len() as u64 {
            replay.truncated_bytes = buf.len() as u64 - len;
            tracing::warn!(
                "truncated {} bytes at position {len} in {}",
                replay.truncated_bytes,
                path.display()
            );
            file.set_len(len)
                .map_err(io_err("truncate settlement file", &path))?;
            sync_data(&file, &path)?;
        }
        let store = Self {
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            pending: Vec::new(),
        };
        Ok((store, replay))
    }

    pub fn subscribe(&mut self, name: &str, cursor: Offset) -> Result<(), LogError> {
        record::encode_record(&mut self.pending, cursor, Kind::Subscribe, MAX_LEN, |b| {
            record::put_bytes(b, name.as_bytes())
        })
        .map(|_| ())
    }

    pub fn unsubscribe(&mut self, name: &str) -> Result<(), LogError> {
        record::encode_record(&mut self.pending, 0, Kind::Unsubscribe, MAX_LEN, |b| {
            record::put_bytes(b, name.as_bytes())
        })
        .map(|_| ())
    }

    pub fn settle(&mut self, name: &str, offset: Offset, how: Settlement) -> Result<(), LogError> {
        record::encode_record(&mut self.pending, offset, Kind::Settle, MAX_LEN, |b| {
            b.push(how_to_u8(how));
            record::put_bytes(b, name.as_bytes());
        })
        .map(|_| ())
    }

    /// Records that compaction removes the records of `range` (every subscription settled
    /// them); must be synced before the records are deleted.
    pub fn gone(&mut self, range: std::ops::Range<Offset>) -> Result<(), LogError> {
        record::encode_record(&mut self.pending, range.start, Kind::Gone, MAX_LEN, |b| {
            b.extend_from_slice(&range.end.to_le_bytes())
        })
        .map(|_| ())
    }

    /// Writes the pending entries and fdatasyncs. An fsync error must poison the log.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = failpoint("log::write", &self.path)
            .and_then(|()| self.file.write_all_at(&self.pending, self.len));
        if let Err(source) = written {
            // Keep the entries pending; cut off whatever part was written.
            let _ = self.file.set_len(self.len);
            return Err(LogError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            });
        }
        self.len += self.pending.len() as u64;
        self.pending.clear();
        sync_data(&self.file, &self.path)
    }

    /// Whether the file is large enough that `rewrite` is worth it.
    pub fn wants_rewrite(&self, state: &Settlements) -> bool {
        if self.len < REWRITE_MIN {
            return false;
        }
        let longest = state.names().map(str::len).max().unwrap_or(0) as u64;
        let estimate = (longest + 40) * state.snapshot_entries();
        estimate.saturating_mul(4) < self.len
    }

    /// Replaces the file with a snapshot of `state` (which includes pending entries).
    /// Errors before the rename leave the old file intact and the log usable; an fsync
    /// error on the directory after the rename must poison the log.
    pub fn rewrite(&mut self, state: &Settlements) -> Result<(), LogError> {
        let mut buf = Vec::new();
        for name in state.names() {
            let cursor = state.cursor(name).unwrap_or(0);
            record::encode_record(&mut buf, cursor, Kind::Subscribe, MAX_LEN, |b| {
                record::put_bytes(b, name.as_bytes())
            })?;
            for range in state.settled_above(name) {
                record::encode_record(&mut buf, range.start, Kind::SettleRange, MAX_LEN, |b| {
                    b.extend_from_slice(&range.end.to_le_bytes());
                    record::put_bytes(b, name.as_bytes());
                })?;
            }
        }
        for range in state.gone_ranges() {
            record::encode_record(&mut buf, range.start, Kind::Gone, MAX_LEN, |b| {
                b.extend_from_slice(&range.end.to_le_bytes())
            })?;
        }
        let tmp = self.dir.join(TMP_NAME);
        let result = write_synced_temp(
            &tmp,
            &buf,
            ["create snapshot", "write snapshot", "fsync snapshot"],
        )
        .and_then(|file| {
            failpoint("log::rename", &tmp)
                .and_then(|()| std::fs::rename(&tmp, &self.path))
                .map_err(io_err("rename snapshot", &tmp))?;
            super::powerloss::renamed(&tmp, &self.path);
            Ok(file)
        });
        let file = match result {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.file = file;
        self.len = buf.len() as u64;
        self.pending.clear();
        sync_dir(&self.dir)
    }
}

fn how_to_u8(how: Settlement) -> u8 {
    match how {
        Settlement::Acked => 1,
        Settlement::DeadLettered => 2,
        Settlement::Dropped => 3,
    }
}

/// Applies one verified entry to `state`. An `Err` means the entry did not make sense.
fn apply(state: &mut Settlements, frame: &Frame, body: &Bytes, next: Offset) -> Result<(), String> {
    let mut r = Reader::new(body);
    match frame.kind {
        Kind::Subscribe => {
            let name = r.string("subscription").map_err(|e| e.to_string())?;
            r.finish().map_err(|e| e.to_string())?;
            state.unregister(&name);
            state.register(&name, frame.offset.min(next));
        }
        Kind::Unsubscribe => {
            let name = r.string("subscription").map_err(|e| e.to_string())?;
            r.finish().map_err(|e| e.to_string())?;
            state.unregister(&name);
        }
        Kind::Settle => {
            let how = r.u8("settlement").map_err(|e| e.to_string())?;
            let name = r.string("subscription").map_err(|e| e.to_string())?;
            r.finish().map_err(|e| e.to_string())?;
            if !(1..=3).contains(&how) || frame.offset >= next {
                return Err(format!(
                    "settlement {how} of offset {} (next {next})",
                    frame.offset
                ));
            }
            // A settlement of an unregistered subscription is stale, not corrupt.
            let _ = state.settle(&name, frame.offset);
        }
        Kind::SettleRange => {
            let end = r.u64("end").map_err(|e| e.to_string())?;
            let name = r.string("subscription").map_err(|e| e.to_string())?;
            r.finish().map_err(|e| e.to_string())?;
            if end < frame.offset || end > next {
                return Err(format!(
                    "settled range {}..{end} (next {next})",
                    frame.offset
                ));
            }
            // A settlement of an unregistered subscription is stale, not corrupt.
            let _ = state.settle_range(&name, frame.offset..end);
        }
        Kind::Gone => {
            let end = r.u64("end").map_err(|e| e.to_string())?;
            r.finish().map_err(|e| e.to_string())?;
            if end < frame.offset || end > next {
                return Err(format!("gone range {}..{end} (next {next})", frame.offset));
            }
            state.mark_gone(frame.offset..end);
        }
        Kind::Message => return Err("message record in the settlement file".into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn replay_restores_state_and_survives_rewrite() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut state = Settlements::new(0);
        let (mut store, _) = SettlementStore::open(dir.path(), &mut state, 100)?;
        state.register("a", 0);
        store.subscribe("a", 0)?;
        for o in [0, 1, 2, 5, 7] {
            state.settle("a", o)?;
            store.settle("a", o, Settlement::Acked)?;
        }
        store.sync()?;
        let mut again = Settlements::new(0);
        let (_, replay) = SettlementStore::open(dir.path(), &mut again, 100)?;
        assert_eq!(replay.truncated_bytes, 0);
        assert_eq!(again.cursor("a"), Some(3));
        assert!(again.is_settled("a", 7) && !again.is_settled("a", 6));

        store.rewrite(&state)?;
        let mut third = Settlements::new(0);
        let (_, _) = SettlementStore::open(dir.path(), &mut third, 100)?;
        assert_eq!(third.cursor("a"), Some(3));
        assert_eq!(
            third.settled_above("a").collect::<Vec<_>>(),
            vec![5..6, 7..8]
        );
        Ok(())
    }

    #[test]
    fn torn_tail_is_truncated() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut state = Settlements::new(0);
        let (mut store, _) = SettlementStore::open(dir.path(), &mut state, 100)?;
        store.subscribe("a", 0)?;
        store.settle("a", 0, Settlement::Acked)?;
        store.sync()?;
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))?;
        f.write_all(&[0xAB; 11])?;
        let mut again = Settlements::new(0);
        let (_, replay) = SettlementStore::open(dir.path(), &mut again, 100)?;
        assert_eq!(replay.truncated_bytes, 11);
        assert_eq!(again.cursor("a"), Some(1));
        Ok(())
    }
}
