//! Records carried forward by compaction: the few unsettled records of an old segment
//! (a message nacked with a long delay, one retried for a long time, one waiting for a
//! member in its zone), copied into `relocated.dat` so that the segment around them can be
//! deleted. Without it, one stuck record would keep its whole segment, and every segment
//! after it, on disk until it settles.
//!
//! Each record is copied byte for byte (segment record format, CRC and original offset
//! included), so it keeps its identity: readers, settlements and recovery see the same
//! offset. Every relocated offset is below the first segment still on disk, because only
//! the oldest segments are ever deleted.
//!
//! Crash safety, in the order `DiskLog::compact` does things: the copies are appended and
//! fsynced, then the settlement file records the rest of the segment as gone and is
//! fsynced, and only then is the segment deleted. After a crash in between, recovery finds
//! the record twice: the segment's copy wins (`retain_below`) and the relocated one is dead
//! bytes until the next rewrite. Nothing is delivered twice because of it: the offset is
//! one message. The file is rewritten without its settled records (write to a temporary
//! file, fsync, rename, fsync directory) once they are most of it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::io::{failpoint, io_err, sync_data, sync_dir, write_synced_temp};
use super::record::{self, Kind};
use super::segment::ReadOutcome;
use super::{LogError, Offset};

pub const FILE_NAME: &str = "relocated.dat";
const TMP_NAME: &str = "relocated.tmp";
/// Below this size the file is rewritten only once nothing in it is live.
const REWRITE_MIN: u64 = 1 << 20;

/// What opening the file found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelocatedReplay {
    /// Bytes cut off a torn tail (copies never fsynced, whose segment still exists).
    pub truncated_bytes: u64,
    /// Regions that failed verification and were skipped.
    pub corrupt_regions: usize,
}

/// The relocated records of one log.
#[derive(Debug)]
pub struct Relocated {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    /// Offset -> (position, length) of each record held.
    index: BTreeMap<Offset, (u64, u64)>,
    /// Bytes of held records not settled by every subscription (kept by `DiskLog`).
    live: u64,
    dirty: bool,
}

impl Relocated {
    /// Opens (or creates) the file in `dir` and indexes its records; a torn tail is cut.
    pub fn open(dir: &Path, max_len: u32) -> Result<(Self, RelocatedReplay), LogError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(TMP_NAME);
        if tmp.exists() {
            std::fs::remove_file(&tmp).map_err(io_err("remove stale relocation", &tmp))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open relocated records", &path))?;
        let buf = std::fs::read(&path).map_err(io_err("read relocated records", &path))?;
        let mut replay = RelocatedReplay::default();
        let mut index = BTreeMap::new();
        let (mut pos, mut good_end) = (0, 0);
        while pos < buf.len() {
            match record::parse_frame(&buf[pos..], max_len) {
                Ok(f) if f.kind == Kind::Message => {
                    // A later copy of the same offset (moved again) replaces the earlier.
                    index.insert(f.offset, (pos as u64, f.total_len as u64));
                    pos += f.total_len;
                    good_end = pos;
                }
                parsed => {
                    let next = (pos + 1..buf.len()).find(|&p| {
                        record::parse_frame(&buf[p..], max_len)
                            .is_ok_and(|f| f.kind == Kind::Message)
                    });
                    let Some(next) = next else { break };
                    tracing::error!(path = %path.display(), position = pos, error = ?parsed.err(),
                        "corrupt relocated record skipped; recovery reports what it held as lost");
                    replay.corrupt_regions += 1;
                    pos = next;
                }
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
                .map_err(io_err("truncate relocated records", &path))?;
            sync_data(&file, &path)?;
        }
        let relocated = Self {
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            index,
            live: 0,
            dirty: false,
        };
        Ok((relocated, replay))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets copies of offsets at or above `first_segment`: their segment still exists
    /// (compaction was interrupted before deleting it), and its copy is the one used.
    pub fn retain_below(&mut self, first_segment: Offset) {
        self.index.split_off(&first_segment);
    }

    /// Lowest offset held.
    pub fn first(&self) -> Option<Offset> {
        self.index.keys().next().copied()
    }

    /// Offsets held, in order.
    pub fn offsets(&self) -> impl Iterator<Item = Offset> + '_ {
        self.index.keys().copied()
    }

    /// Length of the record at `offset`, if held.
    pub fn record_len(&self, offset: Offset) -> Option<u64> {
        self.index.get(&offset).map(|&(_, len)| len)
    }

    pub fn live(&self) -> u64 {
        self.live
    }

    pub fn set_live(&mut self, live: u64) {
        self.live = live;
    }

    /// The file's size.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Appends verified encoded records (`(offset, bytes)`, each one whole record); they
    /// count as live. Durable at the next `sync`.
    pub fn append(&mut self, records: &[(Offset, Vec<u8>)]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch: Vec<u8> = records
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        let written = failpoint("log::write", &self.path)
            .and_then(|()| self.file.write_all_at(&batch, self.len));
        if let Err(source) = written {
            // Cut back what was written; a leftover is a torn tail recovery cuts.
            let _ = self.file.set_len(self.len);
            return Err(LogError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            });
        }
        let mut pos = self.len;
        for (offset, bytes) in records {
            self.index.insert(*offset, (pos, bytes.len() as u64));
            self.live += bytes.len() as u64;
            pos += bytes.len() as u64;
        }
        self.len = pos;
        self.dirty = true;
        Ok(())
    }

    /// fdatasync, if anything was appended. An error must poison the log.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.dirty {
            sync_data(&self.file, &self.path)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads up to `max - out.len()` held records at or after `from` and below `below`,
    /// skipping those for which `skip` is true.
    pub fn read(
        &self,
        from: Offset,
        below: Offset,
        max: usize,
        skip: &dyn Fn(Offset) -> bool,
        max_len: u32,
        out: &mut Vec<(Offset, ReadOutcome)>,
    ) -> Result<(), LogError> {
        for (&offset, &(pos, len)) in self.index.range(from..below) {
            if out.len() >= max {
                break;
            }
            if skip(offset) {
                continue;
            }
            let mut buf = vec![0; len as usize];
            self.file
                .read_exact_at(&mut buf, pos)
                .map_err(io_err("read", &self.path))?;
            out.push((
                offset,
                decode(Bytes::from(buf), offset, max_len)
                    .map_err(|e| format!("{} position {pos}: {e}", self.path.display())),
            ));
        }
        Ok(())
    }

    /// Whether a rewrite would free most of the file.
    pub fn wants_rewrite(&self) -> bool {
        self.len > 0 && (self.live == 0 || (self.len >= REWRITE_MIN && self.live * 2 < self.len))
    }

    /// Replaces the file with the held records `keep` accepts. Errors before the rename
    /// leave the old file in use; an fsync error of the directory after it must poison the
    /// log.
    pub fn rewrite(&mut self, keep: &dyn Fn(Offset) -> bool) -> Result<(), LogError> {
        let mut buf = Vec::new();
        let mut index = BTreeMap::new();
        for (&offset, &(pos, len)) in &self.index {
            if !keep(offset) {
                continue;
            }
            let start = buf.len();
            buf.resize(start + len as usize, 0);
            self.file
                .read_exact_at(&mut buf[start..], pos)
                .map_err(io_err("read", &self.path))?;
            index.insert(offset, (start as u64, len));
        }
        let tmp = self.dir.join(TMP_NAME);
        let result = write_synced_temp(
            &tmp,
            &buf,
            ["create relocation", "write relocation", "fsync relocation"],
        )
        .and_then(|file| {
            failpoint("log::rename", &tmp)
                .and_then(|()| std::fs::rename(&tmp, &self.path))
                .map_err(io_err("rename relocated records", &tmp))?;
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
        self.index = index;
        self.dirty = false;
        sync_dir(&self.dir)
    }
}

fn decode(buf: Bytes, expected: Offset, max_len: u32) -> Result<super::StoredMessage, String> {
    let frame = record::parse_frame(&buf, max_len).map_err(|e| e.to_string())?;
    if frame.kind != Kind::Message || frame.offset != expected {
        return Err(format!(
            "found {:?} record with offset {}, expected a message at {expected}",
            frame.kind, frame.offset
        ));
    }
    record::decode_message(&buf.slice(frame.body_start..frame.total_len)).map_err(|e| e.to_string())
}
