//! Crash and corruption recovery of `DiskLog` (docs/reliability.md rows 7, 8 and 10).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::disk_tests::{TestResult, fill, open, read_all, small};
use super::record::message_record_len;
use super::tests::{Rng, msg};
use super::{DiskLogConfig, Log, Offset, Settlement};

fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    Ok(files)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), std::io::Error> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Every offset in `0..n` is read back intact, except those in `lost`.
fn assert_all_present(
    log: &super::DiskLog,
    n: Offset,
    lost: &[std::ops::Range<Offset>],
) -> TestResult {
    let all = read_all(log)?;
    let expected: Vec<Offset> = (0..n)
        .filter(|o| !lost.iter().any(|r| r.contains(o)))
        .collect();
    let got: Vec<Offset> = all.iter().map(|(o, _)| *o).collect();
    assert_eq!(got, expected);
    assert!(all.iter().all(|(o, m)| *m == msg(*o)));
    Ok(())
}

/// A crash leaves `synced` records durable plus `unsynced` more in the file; the file is
/// then cut at many positions of the unsynced region (the synced part is never touched:
/// the disk kept what was fsynced). After reopening, every
/// synced record is present, exactly the complete unsynced records survive, the cut is
/// reported, and the log accepts appends and reopens cleanly.
#[test]
fn torn_tail_at_many_positions() -> TestResult {
    let (synced, unsynced) = (30u64, 12u64);
    let proto = tempfile::tempdir()?;
    let mut boundaries = vec![0u64];
    {
        let (mut log, _) = open(proto.path(), DiskLogConfig::default())?;
        fill(&mut log, 0, synced, 7)?;
        for i in synced..synced + unsynced {
            log.append(&[msg(i)])?; // no sync: the "crash" comes first
        }
        for i in 0..synced + unsynced {
            boundaries.push(boundaries[i as usize] + message_record_len(&msg(i)) as u64);
        }
    }
    let file_len = boundaries[(synced + unsynced) as usize];
    let synced_len = boundaries[synced as usize];
    // Every byte of the first two unsynced records, then a seeded sample of the rest.
    let seed = 0x0007_0411_u64;
    println!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let dense_end = boundaries[(synced + 2) as usize];
    let mut cuts: Vec<u64> = (synced_len..=dense_end).collect();
    cuts.extend((0..120).map(|_| dense_end + rng.below(file_len - dense_end + 1)));
    cuts.push(file_len);
    for cut in cuts {
        let dir = tempfile::tempdir()?;
        copy_dir(proto.path(), dir.path())?;
        let seg = dir.path().join("00000000000000000000.log");
        OpenOptions::new().write(true).open(&seg)?.set_len(cut)?;
        let (mut log, report) = open(dir.path(), DiskLogConfig::default())?;
        let complete = boundaries.iter().filter(|&&b| b <= cut).count() as u64 - 1;
        let at_boundary = boundaries.contains(&cut);
        assert_eq!(log.written(), complete, "cut at {cut}");
        assert_eq!(
            report.truncated_bytes(),
            cut - boundaries[complete as usize],
            "cut at {cut}"
        );
        assert_eq!(report.truncation.is_some(), !at_boundary);
        if let Some(t) = &report.truncation {
            assert_eq!(
                (t.offset, t.position),
                (complete, boundaries[complete as usize])
            );
        }
        assert!(report.corrupt.is_empty(), "{report:?}");
        assert_all_present(&log, complete, &[])?;
        log.append(&[msg(complete)])?;
        log.sync()?;
        drop(log);
        let (log, report) = open(dir.path(), DiskLogConfig::default())?;
        assert!(report.is_clean(), "cut at {cut}: {report:?}");
        assert_all_present(&log, complete + 1, &[])?;
    }
    Ok(())
}

/// Zeros, seeded random bytes and a record with a bad CRC after the last synced record.
#[test]
fn zero_random_and_bad_crc_tails() -> TestResult {
    let seed = 0x5EED_0007;
    println!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    for case in 0..60u64 {
        let dir = tempfile::tempdir()?;
        let n = 20 + rng.below(300);
        {
            let (mut log, _) = open(dir.path(), small())?;
            fill(&mut log, 0, n, 1 + rng.below(64))?;
            if case % 3 == 2 {
                log.append(&[msg(n)])?; // unsynced; then damaged below
            }
        }
        let last = segment_files(dir.path())?.pop().ok_or("no segment")?;
        let tail: Vec<u8> = match case % 3 {
            0 => vec![0; 1 + rng.below(9000) as usize],
            1 => (0..1 + rng.below(9000)).map(|_| rng.next() as u8).collect(),
            _ => Vec::new(),
        };
        let mut f = OpenOptions::new().read(true).write(true).open(&last)?;
        if case % 3 == 2 {
            let len = f.metadata()?.len();
            let at = len - 1 - rng.below(message_record_len(&msg(n)) as u64 - 1);
            let mut byte = [0u8];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, at)?;
            std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 0x40], at)?;
        } else {
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))?;
            f.write_all(&tail)?;
        }
        drop(f);
        let (mut log, report) = open(dir.path(), small())?;
        assert!(report.truncated_bytes() > 0, "case {case}: {report:?}");
        assert!(report.corrupt.is_empty(), "case {case}: {report:?}");
        assert_eq!(log.written(), n, "case {case}");
        assert_all_present(&log, n, &[])?;
        log.append(&[msg(n)])?;
        log.sync()?;
    }
    Ok(())
}

/// A log of `n` records over many sealed segments, with segment files returned.
fn sealed_log(
    dir: &Path,
    n: u64,
    config: DiskLogConfig,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let (mut log, _) = open(dir, config)?;
    log.set_subscriptions(&["a".to_string()])?;
    fill(&mut log, 0, n, 50)?;
    Ok(segment_files(dir)?)
}

#[test]
fn bit_flip_in_sealed_segment_keeps_later_records() -> TestResult {
    let seed = 0xB17_F11B;
    println!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    for _ in 0..20 {
        let dir = tempfile::tempdir()?;
        let n = 400;
        let files = sealed_log(dir.path(), n, small())?;
        let victim = &files[1 + rng.below(files.len() as u64 - 2) as usize];
        let bytes = std::fs::read(victim)?;
        let at = rng.below(bytes.len() as u64) as usize;
        let mut flipped = bytes.clone();
        flipped[at] ^= 1 << rng.below(8);
        std::fs::write(victim, &flipped)?;

        let (mut log, report) = open(dir.path(), small())?;
        assert_eq!(report.truncation, None);
        assert_eq!(report.corrupt.len(), 1, "{report:?}");
        assert_eq!(&report.corrupt[0].path, victim);
        let lost = report.lost();
        assert_eq!(
            report.lost_records(),
            1,
            "one flipped bit loses one record: {report:?}"
        );
        assert_eq!(log.lost(), lost);
        assert_all_present(&log, n, &lost)?;
        // The lost record does not block the subscription's cursor.
        for o in 0..n {
            if !lost.iter().any(|r| r.contains(&o)) {
                log.settle("a", o, Settlement::Acked)?;
            }
        }
        assert_eq!(log.cursor("a"), Some(n));
    }
    Ok(())
}

#[test]
fn zeroed_block_in_sealed_segment() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = DiskLogConfig {
        segment_bytes: 64 << 10,
        ..small()
    };
    let n = 2000;
    let files = sealed_log(dir.path(), n, config.clone())?;
    let victim = &files[1];
    let mut bytes = std::fs::read(victim)?;
    bytes[10_000..10_000 + 4096].fill(0);
    std::fs::write(victim, &bytes)?;
    let (log, report) = open(dir.path(), config)?;
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    let lost = report.lost();
    let per = message_record_len(&msg(0)) as u64;
    assert!(
        (4096 / per..=4096 / per + 2).contains(&report.lost_records()),
        "{report:?}"
    );
    assert_all_present(&log, n, &lost)?;
    Ok(())
}

#[test]
fn truncated_sealed_segment_reports_the_gap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let n = 400;
    let files = sealed_log(dir.path(), n, small())?;
    let victim = &files[2];
    let len = std::fs::metadata(victim)?.len();
    OpenOptions::new()
        .write(true)
        .open(victim)?
        .set_len(len / 2 + 5)?;
    let (mut log, report) = open(dir.path(), small())?;
    assert_eq!(
        report.truncation, None,
        "a sealed segment is never truncated further"
    );
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    let lost = report.lost();
    assert_eq!(lost.len(), 1);
    assert!(report.lost_records() > 5);
    assert_all_present(&log, n, &lost)?;
    assert_eq!(log.append(&[msg(n)])?, n..n + 1);
    Ok(())
}

#[test]
fn corruption_after_open_is_reported_on_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let n = 400;
    let files = sealed_log(dir.path(), n, small())?;
    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean());
    let mut bytes = std::fs::read(&files[0])?;
    bytes[40] ^= 0xFF; // inside the body of record 0
    std::fs::write(&files[0], &bytes)?;
    assert_all_present(&log, n, std::slice::from_ref(&(0..1)))?;
    assert_eq!(log.lost(), vec![0..1]);
    for o in 1..n {
        log.settle("a", o, Settlement::Acked)?;
    }
    log.sync()?;
    assert_eq!(log.cursor("a"), Some(n));
    Ok(())
}

#[cfg(feature = "failpoints")]
mod failpoints {
    use super::*;
    use crate::log::LogError;

    fn arm(name: &str, dir: &Path) -> Result<(), String> {
        fail::cfg(name, &format!("return({})", dir.display()))
    }

    #[test]
    fn fsync_error_poisons_the_log() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (mut log, _) = open(dir.path(), small())?;
        fill(&mut log, 0, 10, 5)?;
        log.append(&[msg(10)])?;
        arm("log::fsync", dir.path())?;
        let err = log.sync().err().ok_or("sync must fail")?;
        assert!(matches!(err, LogError::Io { op: "fsync", .. }), "{err:?}");
        assert_eq!(log.durable(), 10, "nothing is claimed durable");
        assert!(log.is_poisoned());
        fail::remove("log::fsync");
        // Never retried, even once the disk is fine again.
        assert!(matches!(log.sync(), Err(LogError::Poisoned)));
        assert!(matches!(log.append(&[msg(11)]), Err(LogError::Poisoned)));
        drop(log);
        // The record whose fsync failed may or may not be there (the page cache kept it
        // here); it was never acked. Everything synced before is.
        let (log, _) = open(dir.path(), small())?;
        assert!((10..=11).contains(&log.written()));
        assert_all_present(&log, log.written(), &[])?;
        Ok(())
    }

    #[test]
    fn write_error_stores_nothing_and_the_log_continues() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (mut log, _) = open(dir.path(), small())?;
        fill(&mut log, 0, 10, 5)?;
        arm("log::write", dir.path())?;
        let err = log
            .append(&[msg(10), msg(11)])
            .err()
            .ok_or("append must fail")?;
        fail::remove("log::write");
        assert!(matches!(err, LogError::Io { op: "write", .. }), "{err:?}");
        assert_eq!(log.written(), 10);
        assert_eq!(log.append(&[msg(10)])?, 10..11);
        log.sync()?;
        drop(log);
        let (log, report) = open(dir.path(), small())?;
        assert!(report.is_clean(), "{report:?}");
        assert_all_present(&log, 11, &[])?;
        Ok(())
    }

    #[test]
    fn rename_error_keeps_the_old_settlement_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let name = "a-rather-long-subscription-name-to-grow-the-file";
        let config = DiskLogConfig {
            segment_bytes: 1 << 30,
            ..small()
        };
        {
            let (mut log, _) = open(dir.path(), config.clone())?;
            log.set_subscriptions(&[name.to_string()])?;
            let batch: Vec<_> = (0..1000).map(msg).collect();
            for _ in 0..20 {
                for o in log.append(&batch)? {
                    log.settle(name, o, Settlement::Acked)?;
                }
                log.sync()?;
            }
            arm("log::rename", dir.path())?;
            let err = log.compact().err().ok_or("compact must fail")?;
            fail::remove("log::rename");
            assert!(
                matches!(
                    err,
                    LogError::Io {
                        op: "rename snapshot",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                !log.is_poisoned(),
                "a failed snapshot leaves the old file in place"
            );
            log.compact()?;
        }
        let (log, report) = open(dir.path(), config)?;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(log.cursor(name), Some(20_000));
        Ok(())
    }
}
