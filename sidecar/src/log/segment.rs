//! Segment files: `ActiveSegment` (the one being appended to) and `SealedSegment`
//! (read-only), distinct types so that nothing can append to a sealed segment.
//!
//! A segment is named by the offset of its first record, zero-padded so that names sort
//! by offset: `00000000000000000000.log`. Its index is dense: one `u32` file position per
//! offset (`LOST` for a record recovery could not verify). Dense costs 4 bytes per record
//! in memory (1.5 % of 256-byte messages) but makes reads, byte accounting and lost-offset
//! bookkeeping simple and exact; it is rebuilt by scanning the file on open, which also
//! verifies every CRC, so no index file can disagree with the data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::io::{failpoint, io_err, sync_data};
use super::record::{self, Kind};
use super::scan::LOST;
use super::{LogError, Offset, StoredMessage};

/// `LogError::Io::op` of a failed write that could not be undone; poisons the log.
pub const CUT_BACK: &str = "cut back a failed write";

/// Largest span read from a file in one `pread` while serving `read`.
const READ_CHUNK: u64 = 4 << 20;

/// File name of the segment starting at `base`.
pub fn file_name(base: Offset) -> String {
    format!("{base:020}.log")
}

/// Base offset of a segment file name, or `None` if `name` is not one.
pub fn parse_file_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What both kinds of segment share: the file and its index.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    base: Offset,
    positions: Vec<u32>,
    /// Bytes of verified records (the file may be longer only while a write is failing, or
    /// for a sealed segment with a corrupt tail).
    len: u64,
    /// Bytes of the records not yet settled by every subscription (kept by `DiskLog`).
    live: u64,
}

/// A message read back, or the reason its record could not be.
pub type ReadOutcome = Result<StoredMessage, String>;

impl Segment {
    fn next(&self) -> Offset {
        self.base + self.positions.len() as u64
    }

    fn index(&self, offset: Offset) -> Option<usize> {
        let i = usize::try_from(offset.checked_sub(self.base)?).ok()?;
        (i < self.positions.len()).then_some(i)
    }

    /// End of the record at index `i`: where the next verified record starts, or `len`.
    fn end_of(&self, i: usize) -> u64 {
        self.positions[i + 1..]
            .iter()
            .find(|&&p| p != LOST)
            .map_or(self.len, |&p| u64::from(p))
    }

    /// Length of the record at `offset`; `None` if it is not in this segment or lost.
    fn record_len(&self, offset: Offset) -> Option<u64> {
        let i = self.index(offset)?;
        let pos = self.positions[i];
        (pos != LOST).then(|| self.end_of(i) - u64::from(pos))
    }

    /// The encoded record at `offset` as stored (header, CRC and all), verified.
    fn raw(&self, offset: Offset, max_len: u32) -> Result<Result<Vec<u8>, String>, LogError> {
        let Some(i) = self.index(offset).filter(|&i| self.positions[i] != LOST) else {
            return Ok(Err(format!("offset {offset} is not held")));
        };
        let start = u64::from(self.positions[i]);
        let mut buf = vec![0; (self.end_of(i) - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(io_err("read", &self.path))?;
        Ok(match record::parse_frame(&buf, max_len) {
            Ok(f) if f.kind == Kind::Message && f.offset == offset && f.total_len == buf.len() => {
                Ok(buf)
            }
            Ok(f) => Err(format!(
                "{} position {start}: found {:?} record with offset {}, expected a message at {offset}",
                self.path.display(),
                f.kind,
                f.offset
            )),
            Err(e) => Err(format!("{} position {start}: {e}", self.path.display())),
        })
    }

    /// Reads up to `max - out.len()` records from `from`, skipping lost offsets and those
    /// for which `skip` is true. Records that fail verification now (the disk changed
    /// after open) are returned as `Err` so the caller can report them as lost.
    fn read(
        &self,
        from: Offset,
        max: usize,
        skip: &dyn Fn(Offset) -> bool,
        max_len: u32,
        out: &mut Vec<(Offset, ReadOutcome)>,
    ) -> Result<(), LogError> {
        let mut offset = from.max(self.base);
        let next = self.next();
        while offset < next && out.len() < max {
            let mut wanted = Vec::new();
            while offset < next && out.len() + wanted.len() < max {
                let i = (offset - self.base) as usize;
                offset += 1;
                let pos = self.positions[i];
                if pos == LOST || skip(self.base + i as u64) {
                    continue;
                }
                if let Some(&first) = wanted.first()
                    && u64::from(pos) - u64::from(self.positions[first]) >= READ_CHUNK
                {
                    offset -= 1;
                    break;
                }
                wanted.push(i);
            }
            let (Some(&first), Some(&last)) = (wanted.first(), wanted.last()) else {
                return Ok(());
            };
            let start = u64::from(self.positions[first]);
            let mut chunk = vec![0; (self.end_of(last) - start) as usize];
            self.file
                .read_exact_at(&mut chunk, start)
                .map_err(io_err("read", &self.path))?;
            let chunk = Bytes::from(chunk);
            for i in wanted {
                let at = (u64::from(self.positions[i]) - start) as usize;
                let expected = self.base + i as u64;
                let outcome = decode_at(&chunk, at, expected, max_len).map_err(|e| {
                    format!(
                        "{} position {}: {e}",
                        self.path.display(),
                        at as u64 + start
                    )
                });
                out.push((expected, outcome));
            }
        }
        Ok(())
    }
}

fn decode_at(
    chunk: &Bytes,
    at: usize,
    expected: Offset,
    max_len: u32,
) -> Result<StoredMessage, String> {
    let frame = record::parse_frame(&chunk[at..], max_len).map_err(|e| e.to_string())?;
    if frame.kind != Kind::Message || frame.offset != expected {
        return Err(format!(
            "found {:?} record with offset {}, expected a message at {expected}",
            frame.kind, frame.offset
        ));
    }
    record::decode_message(&chunk.slice(at + frame.body_start..at + frame.total_len))
        .map_err(|e| e.to_string())
}

/// The segment being appended to.
#[derive(Debug)]
pub struct ActiveSegment {
    seg: Segment,
    /// Bytes covered by the last successful fdatasync.
    synced_len: u64,
}

impl ActiveSegment {
    /// Creates an empty segment file starting at `base`. The caller fsyncs the directory.
    pub fn create(dir: &Path, base: Offset) -> Result<Self, LogError> {
        let path = dir.join(file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        Ok(Self {
            seg: Segment {
                path,
                file,
                base,
                positions: Vec::new(),
                len: 0,
                live: 0,
            },
            synced_len: 0,
        })
    }

    /// Opens an existing segment recovered by a scan; `len` must be the verified length
    /// (the caller truncated any torn tail). Its contents count as unsynced: bytes that
    /// were only in the page cache when the process died are still there, and the first
    /// `sync` makes them durable.
    pub fn open(
        path: PathBuf,
        base: Offset,
        positions: Vec<u32>,
        len: u64,
    ) -> Result<Self, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open segment", &path))?;
        Ok(Self {
            seg: Segment {
                path,
                file,
                base,
                positions,
                len,
                live: 0,
            },
            synced_len: 0,
        })
    }

    pub fn base(&self) -> Offset {
        self.seg.base
    }

    pub fn next(&self) -> Offset {
        self.seg.next()
    }

    /// Bytes of records in the segment.
    pub fn len(&self) -> u64 {
        self.seg.len
    }

    /// Bytes of records not yet settled by every subscription.
    pub fn live(&self) -> u64 {
        self.seg.live
    }

    /// Sets [`Self::live`] (kept by the log as records are appended and settled).
    pub fn set_live(&mut self, live: u64) {
        self.seg.live = live;
    }

    /// Length of the record at `offset`; `None` if it is not here or lost.
    pub fn record_len(&self, offset: Offset) -> Option<u64> {
        self.seg.record_len(offset)
    }

    /// Writes a batch of encoded records with one positional write. `starts` are the
    /// records' positions within `batch`. On failure the file is cut back to its previous
    /// length (best effort: a leftover partial record is a torn tail that recovery cuts)
    /// and the index is unchanged, so nothing of the batch is visible.
    pub fn append(&mut self, batch: &[u8], starts: &[u32]) -> Result<(), LogError> {
        let path = &self.seg.path;
        let base_pos = self.seg.len;
        let end = base_pos + batch.len() as u64;
        if end >= u64::from(LOST) {
            return Err(LogError::RecordTooLarge {
                size: batch.len(),
                limit: (u64::from(LOST) - 1 - base_pos) as usize,
            });
        }
        let written = failpoint("log::write", path)
            .and_then(|()| self.seg.file.write_all_at(batch, base_pos));
        if let Err(source) = written {
            if let Err(e) = self.seg.file.set_len(base_pos) {
                // Complete records of the failed batch may remain past the end, and a later,
                // shorter write would leave some of them after it, where recovery could take
                // them for valid records. The caller must poison the log.
                tracing::error!(path = %path.display(), write_error = %source, error = %e,
                    "could not cut back a failed write");
                return Err(LogError::Io {
                    op: CUT_BACK,
                    path: path.clone(),
                    source: e,
                });
            }
            return Err(LogError::Io {
                op: "write",
                path: path.clone(),
                source,
            });
        }
        self.seg
            .positions
            .extend(starts.iter().map(|&s| s + base_pos as u32));
        self.seg.len = end;
        Ok(())
    }

    /// Cuts the segment back to its records below `offset` (file and index): after a failed
    /// fsync the records past the last durable offset were refused to their publishers, and
    /// bytes of theirs left in the page cache must not be read back by the next open. The
    /// truncation is not fsynced (the device is failing); a power loss may keep some of
    /// those bytes, which is no worse than before the cut. Returns the records dropped.
    pub fn truncate_to(&mut self, offset: Offset) -> Result<u64, LogError> {
        let keep = usize::try_from(offset.saturating_sub(self.seg.base)).unwrap_or(usize::MAX);
        if keep >= self.seg.positions.len() {
            return Ok(0);
        }
        let pos = u64::from(self.seg.positions[keep]);
        self.seg
            .file
            .set_len(pos)
            .map_err(io_err(CUT_BACK, &self.seg.path))?;
        let dropped = (self.seg.positions.len() - keep) as u64;
        self.seg.positions.truncate(keep);
        self.seg.len = pos;
        self.synced_len = self.synced_len.min(pos);
        Ok(dropped)
    }

    /// Whether there are written bytes not yet covered by fdatasync.
    pub fn is_dirty(&self) -> bool {
        self.synced_len < self.seg.len
    }

    /// fdatasync of the segment file. The caller must not retry after an error: the kernel
    /// may have dropped the dirty pages and marked them clean, so a second fsync could
    /// "succeed" without the data (see "Can Applications Recover from fsync Failures?").
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.is_dirty() {
            sync_data(&self.seg.file, &self.seg.path)?;
            self.synced_len = self.seg.len;
        }
        Ok(())
    }

    /// Syncs and turns the segment read-only.
    pub fn seal(mut self) -> Result<SealedSegment, LogError> {
        self.sync()?;
        Ok(SealedSegment { seg: self.seg })
    }

    pub fn read(
        &self,
        from: Offset,
        max: usize,
        skip: &dyn Fn(Offset) -> bool,
        max_len: u32,
        out: &mut Vec<(Offset, ReadOutcome)>,
    ) -> Result<(), LogError> {
        self.seg.read(from, max, skip, max_len, out)
    }
}

/// A read-only segment. Deleted whole by compaction once fully settled.
#[derive(Debug)]
pub struct SealedSegment {
    seg: Segment,
}

impl SealedSegment {
    /// Opens a recovered segment read-only.
    pub fn open(
        path: PathBuf,
        base: Offset,
        positions: Vec<u32>,
        len: u64,
    ) -> Result<Self, LogError> {
        let file = File::open(&path).map_err(io_err("open segment", &path))?;
        Ok(Self {
            seg: Segment {
                path,
                file,
                base,
                positions,
                len,
                live: 0,
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.seg.path
    }

    pub fn base(&self) -> Offset {
        self.seg.base
    }

    pub fn next(&self) -> Offset {
        self.seg.next()
    }

    pub fn read(
        &self,
        from: Offset,
        max: usize,
        skip: &dyn Fn(Offset) -> bool,
        max_len: u32,
        out: &mut Vec<(Offset, ReadOutcome)>,
    ) -> Result<(), LogError> {
        self.seg.read(from, max, skip, max_len, out)
    }

    /// Bytes of records not yet settled by every subscription.
    pub fn live(&self) -> u64 {
        self.seg.live
    }

    /// Sets [`Self::live`] (kept by the log as records are appended and settled).
    pub fn set_live(&mut self, live: u64) {
        self.seg.live = live;
    }

    /// Length of the record at `offset`; `None` if it is not here or lost.
    pub fn record_len(&self, offset: Offset) -> Option<u64> {
        self.seg.record_len(offset)
    }

    /// Bytes of records in the segment.
    pub fn len(&self) -> u64 {
        self.seg.len
    }

    /// The encoded record at `offset`, verified (`Err(reason)` if it does not verify).
    pub fn raw(&self, offset: Offset, max_len: u32) -> Result<Result<Vec<u8>, String>, LogError> {
        self.seg.raw(offset, max_len)
    }

    /// The file's size on disk (what deleting it frees).
    pub fn file_size(&self) -> u64 {
        self.seg.file.metadata().map_or(self.seg.len, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::msg;

    #[test]
    fn names_sort_by_offset_and_parse_back() {
        assert_eq!(file_name(0), "00000000000000000000.log");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("0000000000000000000x.log"), None);
        assert_eq!(parse_file_name("00000000000000000001.idx"), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn append_seal_read() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut active = ActiveSegment::create(dir.path(), 5)?;
        let mut batch = Vec::new();
        let mut starts = Vec::new();
        for i in 0..10 {
            starts.push(batch.len() as u32);
            record::encode_message(&mut batch, 5 + i, &msg(i), 1 << 20)?;
        }
        active.append(&batch, &starts)?;
        assert!(active.is_dirty());
        assert_eq!(active.next(), 15);
        let sealed = active.seal()?;
        let mut out = Vec::new();
        sealed.read(7, 3, &|o| o == 8, 1 << 20, &mut out)?;
        let offsets: Vec<_> = out.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![7, 9, 10]);
        assert_eq!(out[0].1, Ok(msg(2)));
        assert_eq!(sealed.len(), batch.len() as u64);
        let lens: u64 = (5..15).filter_map(|o| sealed.record_len(o)).sum();
        assert_eq!(lens, batch.len() as u64);
        assert_eq!(sealed.record_len(15), None);
        let raw = sealed.raw(9, 1 << 20)?.map_err(std::io::Error::other)?;
        assert_eq!(raw.len() as u64, sealed.record_len(9).unwrap_or(0));
        Ok(())
    }
}
