//! Recovery on open: what the findings of `scan.rs` mean for each segment, what is
//! truncated, what is reported, and the `RecoveryReport` handed to the caller.
//!
//! Two different faults look alike on disk and are treated differently (docs/reliability.md rows
//! 7 and 8, after etcd's `wal/repair.go` and "Protocol-Aware Recovery", FAST'18):
//!
//! - A **torn tail**: the process or machine died mid-append, so the end of the *last*
//!   segment holds a partial header or body, zeros, or garbage. Nothing after it verifies.
//!   Those bytes were never fsynced, hence never acked: recovery truncates them.
//! - **Corruption in the middle** (a bit flip, a zeroed block, a truncated sealed segment):
//!   valid records follow the bad region. Discarding them would turn one bad sector into
//!   the loss of everything after it, so recovery resynchronises: it scans forward for the
//!   next record whose header, CRC and offset are plausible, keeps everything from there
//!   on, and reports the offsets in between as lost. It never skips them silently.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::io::{io_err, sync_data, sync_dir};
use super::scan::{self, BadBytes, LOST, Scan};
use super::segment::{self, ActiveSegment, SealedSegment};
use super::{LogError, Offset};

/// A region of a file that did not hold valid records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRegion {
    pub path: PathBuf,
    /// Byte position of the region in the file.
    pub position: u64,
    /// Length of the region in bytes (0 for a gap between segments).
    pub bytes: u64,
    /// Offsets whose records were in the region and are lost.
    pub lost: Range<Offset>,
    /// Why the first bad record was rejected.
    pub reason: String,
}

/// A torn tail cut off the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub path: PathBuf,
    /// New length of the file (end of the last verified record).
    pub position: u64,
    /// Offset the next record will get: the truncated bytes would have started here.
    pub offset: Offset,
    /// Bytes removed.
    pub bytes: u64,
    pub reason: String,
}

/// What `DiskLog::open` found and did. Returned to the caller so that the sidecar can log
/// it, export it as metrics, and (for `Replicated` topics) refetch lost offsets from a
/// replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files opened.
    pub segments: usize,
    /// Valid message records found.
    pub records: u64,
    /// The torn tail truncated from the last segment, if any.
    pub truncation: Option<Truncation>,
    /// Corrupt regions inside segments, and gaps between segments, with their lost offsets.
    pub corrupt: Vec<CorruptRegion>,
    /// Bytes truncated from the settlement file's torn tail.
    pub settlement_truncated_bytes: u64,
    /// Settlement records that failed verification (their offsets may be redelivered).
    pub settlement_corrupt_records: usize,
    /// Bytes truncated from the torn tail of `relocated.dat` (copies never fsynced, whose
    /// segment was therefore not deleted).
    pub relocated_truncated_bytes: u64,
    /// Regions of `relocated.dat` that failed verification.
    pub relocated_corrupt_regions: usize,
}

impl RecoveryReport {
    /// Bytes truncated from the log's torn tail.
    pub fn truncated_bytes(&self) -> u64 {
        self.truncation.as_ref().map_or(0, |t| t.bytes)
    }

    /// Number of corrupt regions found (each may hold several records).
    pub fn corrupt_records(&self) -> usize {
        self.corrupt.len()
    }

    /// Offsets known lost, as sorted ranges.
    pub fn lost(&self) -> Vec<Range<Offset>> {
        let mut lost: Vec<_> = self
            .corrupt
            .iter()
            .map(|c| c.lost.clone())
            .filter(|r| !r.is_empty())
            .collect();
        lost.sort_by_key(|r| r.start);
        lost
    }

    /// Count of offsets known lost.
    pub fn lost_records(&self) -> u64 {
        self.lost().iter().map(|r| r.end - r.start).sum()
    }

    /// True if recovery found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.truncation.is_none()
            && self.corrupt.is_empty()
            && self.settlement_truncated_bytes == 0
            && self.settlement_corrupt_records == 0
            && self.relocated_truncated_bytes == 0
            && self.relocated_corrupt_regions == 0
    }
}

/// The segments of a log directory after recovery.
#[derive(Debug)]
pub struct Recovered {
    pub sealed: BTreeMap<Offset, SealedSegment>,
    pub active: ActiveSegment,
    pub report: RecoveryReport,
}

/// One segment file as scanned by `open`.
struct Scanned {
    path: PathBuf,
    base: Offset,
    scan: Scan,
}

/// Opens every segment in `dir`: scans and verifies each, truncates a torn tail of the
/// last one, reports corruption, gaps and overlaps, and fsyncs the active segment so that
/// whatever survived in the page cache is durable before anything is acked again.
pub fn recover_segments(dir: &Path, max_len: u32) -> Result<Recovered, LogError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list log directory", dir))? {
        let entry = entry.map_err(io_err("list log directory", dir))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut scanned = Vec::with_capacity(bases.len());
    for base in bases {
        let path = dir.join(segment::file_name(base));
        let buf = std::fs::read(&path).map_err(io_err("read segment", &path))?;
        let scan = scan::scan(&buf, base, max_len);
        scanned.push(Scanned { path, base, scan });
    }

    let mut report = RecoveryReport {
        segments: scanned.len(),
        ..RecoveryReport::default()
    };
    let mut sealed = BTreeMap::new();
    let mut last = None;
    let count = scanned.len();
    for (k, mut s) in scanned.into_iter().enumerate() {
        for bad in s.scan.corrupt.drain(..) {
            report.corrupt.push(region(&s.path, bad));
        }
        if k + 1 == count {
            last = Some(s);
        } else {
            sealed.insert(s.base, s);
        }
    }
    // Second pass over sealed segments: tails, gaps and overlaps need the next base.
    let bases: Vec<Offset> = sealed
        .keys()
        .copied()
        .chain(last.as_ref().map(|s| s.base))
        .collect();
    let mut sealed_segments = BTreeMap::new();
    for (k, (base, mut s)) in sealed.into_iter().enumerate() {
        let next_base = bases[k + 1];
        check_boundary(&mut s, next_base, &mut report);
        report.records += present(&s.scan.positions);
        let seg = SealedSegment::open(s.path, base, s.scan.positions, s.scan.valid_len)?;
        sealed_segments.insert(base, seg);
    }
    let mut active = match last {
        None => {
            let active = ActiveSegment::create(dir, 0)?;
            sync_dir(dir)?;
            active
        }
        Some(s) => {
            if let Some(tail) = &s.scan.tail {
                truncate_tail(&s, tail, &mut report)?;
            }
            report.records += present(&s.scan.positions);
            ActiveSegment::open(s.path, s.base, s.scan.positions, s.scan.valid_len)?
        }
    };
    active.sync()?;
    for c in &report.corrupt {
        tracing::error!(
            path = %c.path.display(), position = c.position, bytes = c.bytes,
            lost = ?c.lost, reason = %c.reason,
            "corrupt log region: records after it are kept, the offsets in it are lost"
        );
    }
    Ok(Recovered {
        sealed: sealed_segments,
        active,
        report,
    })
}

fn present(positions: &[u32]) -> u64 {
    positions.iter().filter(|&&p| p != LOST).count() as u64
}

fn region(path: &Path, bad: BadBytes) -> CorruptRegion {
    CorruptRegion {
        path: path.to_path_buf(),
        position: bad.position,
        bytes: bad.bytes,
        lost: bad.lost,
        reason: bad.reason,
    }
}

/// Reconciles a sealed segment's end with the next segment's base: a corrupt tail or a
/// short segment loses the offsets up to `next_base`; an overlap trims this segment.
fn check_boundary(s: &mut Scanned, next_base: Offset, report: &mut RecoveryReport) {
    let next = s.scan.next_offset(s.base);
    let lost = next..next_base.max(next);
    if let Some(tail) = s.scan.tail.take() {
        report
            .corrupt
            .push(region(&s.path, BadBytes { lost, ..tail }));
    } else if next < next_base {
        report.corrupt.push(CorruptRegion {
            path: s.path.clone(),
            position: s.scan.valid_len,
            bytes: 0,
            lost,
            reason: format!("segment ends at offset {next} but the next one starts at {next_base}"),
        });
    }
    if next > next_base {
        let keep = next_base.saturating_sub(s.base) as usize;
        let cut = s.scan.positions[keep..]
            .iter()
            .find(|&&p| p != LOST)
            .copied();
        s.scan.positions.truncate(keep);
        if let Some(cut) = cut {
            s.scan.valid_len = u64::from(cut);
        }
        report.corrupt.push(CorruptRegion {
            path: s.path.clone(),
            position: s.scan.valid_len,
            bytes: 0,
            lost: next_base..next_base,
            reason: format!(
                "records up to offset {next} overlap the next segment at {next_base}; ignored"
            ),
        });
    }
}

/// Cuts the torn tail off the last segment and makes the cut durable.
fn truncate_tail(
    s: &Scanned,
    tail: &BadBytes,
    report: &mut RecoveryReport,
) -> Result<(), LogError> {
    let offset = s.scan.next_offset(s.base);
    tracing::warn!(
        "truncated {} bytes at offset {offset} in {} ({})",
        tail.bytes,
        s.path.display(),
        tail.reason
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.path)
        .map_err(io_err("open segment", &s.path))?;
    file.set_len(tail.position)
        .map_err(io_err("truncate segment", &s.path))?;
    sync_data(&file, &s.path)?;
    report.truncation = Some(Truncation {
        path: s.path.clone(),
        position: tail.position,
        offset,
        bytes: tail.bytes,
        reason: tail.reason.clone(),
    });
    Ok(())
}
