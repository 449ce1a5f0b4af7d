//! Scanning a segment's bytes: verifying each record and resynchronising after a corrupt
//! region. Pure functions over a buffer, so that every fault can be tested without files;
//! `recovery.rs` decides what each finding means for the log.

use std::ops::Range;

use super::Offset;
use super::record::{self, FrameError, HEADER_LEN, Kind};

/// Index entry of an offset whose record is known lost.
pub const LOST: u32 = u32::MAX;

/// Bad bytes found by `scan`, before the caller knows which file and fault it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBytes {
    pub position: u64,
    pub bytes: u64,
    /// Offsets lost in the region (empty for a tail: the caller knows the next base).
    pub lost: Range<Offset>,
    pub reason: String,
}

/// The result of scanning one segment's bytes.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Record position per offset from the base; `LOST` for lost offsets.
    pub positions: Vec<u32>,
    /// End of the last verified record.
    pub valid_len: u64,
    /// Corrupt regions followed by valid records.
    pub corrupt: Vec<BadBytes>,
    /// Bytes after the last verified record that hold no valid record.
    pub tail: Option<BadBytes>,
}

impl Scan {
    /// Next offset after the scanned records.
    pub fn next_offset(&self, base: Offset) -> Offset {
        base + self.positions.len() as u64
    }
}

/// Scans a segment whose first record should have offset `base`. Never panics on any input.
pub fn scan(buf: &[u8], base: Offset, max_len: u32) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0usize;
    let mut expected = base;
    // Positions are u32; a larger file is treated as garbage past 4 GiB.
    let limit = buf.len().min(LOST as usize);
    while pos < limit {
        let reason = match record::parse_frame(&buf[pos..limit], max_len) {
            Ok(f) if f.kind == Kind::Message && f.offset == expected => {
                out.positions.push(pos as u32);
                pos += f.total_len;
                out.valid_len = pos as u64;
                expected += 1;
                continue;
            }
            Ok(f) if f.kind != Kind::Message => format!("unexpected {:?} record", f.kind),
            Ok(f) => format!("record has offset {}, expected {expected}", f.offset),
            Err(e @ FrameError::Truncated { .. }) => format!("torn record: {e}"),
            Err(e) => e.to_string(),
        };
        match resync(&buf[..limit], pos, expected, max_len) {
            Some((next_pos, next_offset)) => {
                let lost = expected..next_offset;
                out.positions
                    .extend(std::iter::repeat_n(LOST, (next_offset - expected) as usize));
                out.corrupt.push(BadBytes {
                    position: pos as u64,
                    bytes: (next_pos - pos) as u64,
                    lost,
                    reason,
                });
                pos = next_pos;
                expected = next_offset;
            }
            None => {
                out.tail = Some(BadBytes {
                    position: pos as u64,
                    bytes: (buf.len() - pos) as u64,
                    lost: expected..expected,
                    reason,
                });
                return out;
            }
        }
    }
    if limit < buf.len() {
        out.tail = Some(BadBytes {
            position: limit as u64,
            bytes: (buf.len() - limit) as u64,
            lost: expected..expected,
            reason: "segment larger than 4 GiB".into(),
        });
    }
    out
}

/// Finds the next verified message record after the bad one at `bad`, whose offset is
/// plausible: at least `expected`, and at most one more than the number of minimal records
/// that fit in the skipped bytes. Cheap checks come first so that scanning zeros or random
/// bytes rarely computes a CRC.
fn resync(buf: &[u8], bad: usize, expected: Offset, max_len: u32) -> Option<(usize, Offset)> {
    let last = buf.len().checked_sub(HEADER_LEN)?;
    for p in bad + 1..=last {
        let len = u32::from_le_bytes([buf[p], buf[p + 1], buf[p + 2], buf[p + 3]]);
        if !(record::MIN_LEN..=max_len).contains(&len)
            || buf.len() - p < 8 + len as usize
            || buf[p + 16] != Kind::Message as u8
        {
            continue;
        }
        let Some(offset) = record::peek_offset(&buf[p..]) else {
            continue;
        };
        let max_skipped = ((p - bad) / HEADER_LEN) as u64 + 1;
        if offset < expected || offset > expected.saturating_add(max_skipped) {
            continue;
        }
        if record::parse_frame(&buf[p..], max_len).is_ok() {
            return Some((p, offset));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::msg;

    fn segment(base: Offset, n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(buf.len());
            let _ = record::encode_message(&mut buf, base + i, &msg(i), 1 << 20);
        }
        (buf, starts)
    }

    #[test]
    fn clean_segment() {
        let (buf, starts) = segment(100, 10);
        let s = scan(&buf, 100, 1 << 20);
        assert_eq!(
            s.positions,
            starts.iter().map(|&p| p as u32).collect::<Vec<_>>()
        );
        assert_eq!(s.valid_len, buf.len() as u64);
        assert!(s.corrupt.is_empty() && s.tail.is_none());
        assert_eq!(s.next_offset(100), 110);
    }

    #[test]
    fn torn_tail_is_a_tail() {
        let (mut buf, starts) = segment(0, 5);
        buf.truncate(starts[4] + 10);
        let s = scan(&buf, 0, 1 << 20);
        assert_eq!(s.positions.len(), 4);
        let tail = s.tail.unwrap_or_else(|| panic!("no tail"));
        assert_eq!((tail.position, tail.bytes), (starts[4] as u64, 10));
    }

    #[test]
    fn flipped_bit_mid_segment_resyncs() {
        let (mut buf, starts) = segment(0, 8);
        buf[starts[3] + 20] ^= 0x10;
        let s = scan(&buf, 0, 1 << 20);
        assert_eq!(s.positions.len(), 8);
        assert_eq!(s.positions[3], LOST);
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].lost, 3..4);
        assert!(s.tail.is_none());
    }

    #[test]
    fn zeroed_block_mid_segment_resyncs() {
        let (mut buf, starts) = segment(0, 40);
        let (from, to) = (starts[5] + 3, starts[20] + 7);
        buf[from..to].fill(0);
        let s = scan(&buf, 0, 1 << 20);
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].lost, 5..21);
        assert_eq!(s.positions.len(), 40);
        assert_eq!(s.positions[21], starts[21] as u32);
    }
}
