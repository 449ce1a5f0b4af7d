//! Tests of `DiskLog`: round trips, rolling, restart, compaction, retention and poisoning.
//! Crash and corruption recovery is tested in `recovery_tests.rs`.

use std::path::Path;

use super::tests::msg;
use super::{DiskLog, DiskLogConfig, Log, LogError, Offset, RecoveryReport, Settlement};

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A config whose segments roll every few dozen test messages (4 KiB is the minimum).
pub(crate) fn small() -> DiskLogConfig {
    DiskLogConfig {
        segment_bytes: 4096,
        ..DiskLogConfig::default()
    }
}

pub(crate) fn open(
    dir: &Path,
    config: DiskLogConfig,
) -> Result<(DiskLog, RecoveryReport), LogError> {
    DiskLog::open(dir, config)
}

/// Appends `n` messages one per call, syncing every `per_sync`.
pub(crate) fn fill(log: &mut DiskLog, from: u64, n: u64, per_sync: u64) -> Result<(), LogError> {
    for i in from..from + n {
        log.append(&[msg(i)])?;
        if (i + 1) % per_sync == 0 {
            log.sync()?;
        }
    }
    log.sync()
}

pub(crate) fn read_all(log: &DiskLog) -> Result<Vec<(Offset, super::StoredMessage)>, LogError> {
    let mut out = Vec::new();
    let mut from = log.first();
    loop {
        let batch = log.read(from, 37)?;
        let Some((last, _)) = batch.last() else {
            return Ok(out);
        };
        from = last + 1;
        out.extend(batch);
    }
}

fn subs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn round_trip_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, report) = open(dir.path(), DiskLogConfig::default())?;
        assert!(report.is_clean());
        assert_eq!(log.append(&[msg(0), msg(1), msg(2)])?, 0..3);
        assert_eq!((log.written(), log.durable()), (3, 0));
        assert_eq!(log.read(1, 10)?, vec![(1, msg(1)), (2, msg(2))]);
        log.sync()?;
        assert_eq!(log.durable(), 3);
        assert_eq!(log.append(&[])?, 3..3);
        assert!(matches!(
            log.read(4, 1),
            Err(LogError::OffsetOutOfRange { .. })
        ));
    }
    let (mut log, report) = open(dir.path(), DiskLogConfig::default())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, 3);
    assert_eq!((log.written(), log.durable(), log.first()), (3, 3, 0));
    assert_eq!(
        read_all(&log)?,
        (0..3).map(|i| (i, msg(i))).collect::<Vec<_>>()
    );
    assert_eq!(log.append(&[msg(3)])?, 3..4);
    Ok(())
}

#[test]
fn many_segments_roll_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let n = 1000;
    {
        let (mut log, _) = open(dir.path(), small())?;
        fill(&mut log, 0, n, 64)?;
        assert!(log.segment_count() > 10, "{} segments", log.segment_count());
        let all = read_all(&log)?;
        assert_eq!(all.len() as u64, n);
        assert!(all.iter().all(|(o, m)| *m == msg(*o)));
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".log"))
        .collect();
    assert!(names.iter().any(|n| n == "00000000000000000000.log"));
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.segments, names.len());
    assert_eq!(report.records, n);
    assert_eq!(read_all(&log)?.len() as u64, n);
    assert_eq!(
        log.read(500, 3)?,
        vec![(500, msg(500)), (501, msg(501)), (502, msg(502))]
    );
    Ok(())
}

#[test]
fn a_batch_never_straddles_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    let batch: Vec<_> = (0..30).map(msg).collect();
    log.append(&batch)?;
    log.append(&batch)?; // does not fit the rest of the first segment: rolls first
    assert_eq!(log.segment_count(), 2);
    log.sync()?;
    drop(log);
    assert!(dir.path().join("00000000000000000030.log").exists());
    Ok(())
}

#[test]
fn restart_keeps_settlements() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _) = open(dir.path(), small())?;
        fill(&mut log, 0, 100, 10)?;
        log.set_subscriptions(&subs(&["a", "b"]))?;
        for o in (0..50).chain([60, 61, 70]) {
            log.settle("a", o, Settlement::Acked)?;
        }
        for o in 0..20 {
            log.settle("b", o, Settlement::DeadLettered)?;
        }
        log.settle("b", 20, Settlement::Dropped)?;
        log.sync()?;
        // Not synced: may be lost, which only causes a redelivery.
        log.settle("b", 99, Settlement::Acked)?;
    }
    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.cursor("a"), Some(50));
    assert_eq!(log.cursor("b"), Some(21));
    assert!(log.is_settled("a", 61) && !log.is_settled("a", 62));
    assert_eq!(log.acknowledged(), 21);
    // The same subscriptions again change nothing; a new one starts at `acknowledged`.
    log.set_subscriptions(&subs(&["a", "b", "c"]))?;
    assert_eq!(log.cursor("a"), Some(50));
    assert_eq!(log.cursor("c"), Some(21));
    assert_eq!(
        log.read(0, 1)?[0].0,
        21,
        "offsets settled by everyone are skipped"
    );
    log.sync()?;
    drop(log);
    let (log, _) = open(dir.path(), small())?;
    assert_eq!(log.cursor("c"), Some(21));
    Ok(())
}

#[test]
fn compact_deletes_only_fully_settled_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.set_subscriptions(&subs(&["a", "b"]))?;
    fill(&mut log, 0, 400, 50)?;
    let segments = log.segment_count();
    for o in 0..300 {
        log.settle("a", o, Settlement::Acked)?;
    }
    for o in 0..150 {
        log.settle("b", o, Settlement::Acked)?;
    }
    let backlog = log.backlog_bytes();
    let freed = log.compact()?;
    assert!(freed > 0);
    assert!(log.segment_count() < segments);
    assert!(
        log.first() <= 150,
        "segment holding offset 150 must stay: first {}",
        log.first()
    );
    assert!(log.first() > 0);
    assert_eq!(
        log.backlog_bytes(),
        backlog,
        "compaction frees only settled bytes"
    );
    assert_eq!(log.read(150, 1)?, vec![(150, msg(150))]);
    // Reading below `first` starts at `first`.
    assert_eq!(log.read(0, 1)?[0].0, 150);
    // Nothing more to delete until b moves on; the active segment is never deleted.
    assert_eq!(log.compact()?, 0);
    for o in 150..400 {
        log.settle("a", o, Settlement::Acked)?;
        log.settle("b", o, Settlement::Acked)?;
    }
    log.compact()?;
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.backlog_bytes(), 0);
    let first = log.first();
    log.sync()?;
    drop(log);
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        (log.first(), log.written(), log.acknowledged()),
        (first, 400, 400)
    );
    Ok(())
}

#[test]
fn backlog_full_names_the_limit_and_stores_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let one = super::record::message_record_len(&msg(0)) as u64;
    let config = DiskLogConfig {
        max_backlog_bytes: Some(3 * one),
        ..DiskLogConfig::default()
    };
    let (mut log, _) = open(dir.path(), config.clone())?;
    log.set_subscriptions(&subs(&["a"]))?;
    log.append(&[msg(0), msg(1)])?;
    let err = log
        .append(&[msg(2), msg(3)])
        .err()
        .ok_or("append must fail")?;
    let text = err.to_string();
    assert!(matches!(err, LogError::BacklogFull { .. }), "{err:?}");
    assert!(
        text.contains("retention.maxBytes") && text.contains(&(3 * one).to_string()),
        "{text}"
    );
    assert_eq!(log.written(), 2, "nothing of the rejected batch is stored");
    log.settle("a", 0, Settlement::Acked)?;
    assert_eq!(log.append(&[msg(2), msg(3)])?, 2..4);
    log.sync()?;
    drop(log);
    let (log, _) = open(dir.path(), config)?;
    assert_eq!(read_all(&log)?.len(), 3);
    Ok(())
}

#[test]
fn oversized_record_is_rejected() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(
        dir.path(),
        DiskLogConfig {
            max_record_bytes: 1024,
            ..small()
        },
    )?;
    let mut big = msg(0);
    big.payload = bytes::Bytes::from(vec![0; 2000]);
    let err = log.append(&[msg(1), big]).err().ok_or("append must fail")?;
    assert!(
        matches!(err, LogError::RecordTooLarge { limit: 1024, .. }),
        "{err:?}"
    );
    assert_eq!(log.written(), 0);
    Ok(())
}

#[test]
fn settle_checks_offsets_and_subscriptions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.append(&[msg(0)])?;
    assert!(matches!(
        log.settle("a", 0, Settlement::Acked),
        Err(LogError::UnknownSubscription { .. })
    ));
    log.set_subscriptions(&subs(&["a"]))?;
    assert!(matches!(
        log.settle("a", 1, Settlement::Acked),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    log.set_subscriptions(&[])?;
    assert_eq!(log.cursor("a"), None);
    Ok(())
}

#[test]
fn settlement_file_rewrite_keeps_state() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _) = open(
            dir.path(),
            DiskLogConfig {
                segment_bytes: 1 << 30,
                ..small()
            },
        )?;
        log.set_subscriptions(&subs(&["a-rather-long-subscription-name-to-grow-the-file"]))?;
        let name = "a-rather-long-subscription-name-to-grow-the-file";
        let batch: Vec<_> = (0..1000).map(msg).collect();
        for _ in 0..20 {
            let range = log.append(&batch)?;
            for o in range {
                if o != 19_998 {
                    log.settle(name, o, Settlement::Acked)?;
                }
            }
            log.sync()?;
        }
        log.compact()?;
        let size = std::fs::metadata(dir.path().join("settlements.dat"))?.len();
        assert!(
            size < 100_000,
            "settlement file was not rewritten: {size} bytes"
        );
    }
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    let name = "a-rather-long-subscription-name-to-grow-the-file";
    assert_eq!(log.cursor(name), Some(19_998));
    assert!(log.is_settled(name, 19_999) && !log.is_settled(name, 19_998));
    Ok(())
}

/// Group commit throughput: 64 × 256-byte messages per fsync, plus the CPU-side cost of
/// append (no fsync) and of reading back. Prints, never asserts.
/// `cargo test -p ferry-sidecar --release --lib group_commit -- --ignored --nocapture`
#[test]
#[ignore]
fn group_commit_throughput() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), DiskLogConfig::default())?;
    let mut m = msg(0);
    m.payload = bytes::Bytes::from(vec![7u8; 256]);
    let batch: Vec<_> = (0..64).map(|_| m.clone()).collect();
    let rate = |rounds: usize, secs: f64| (rounds * batch.len()) as f64 / secs;

    let rounds = 2000;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        log.append(&batch)?;
        log.sync()?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "group commit (64 x 256 B per fdatasync): {:.0} msgs/s, {:.0} fsyncs/s",
        rate(rounds, secs),
        rounds as f64 / secs
    );

    let rounds = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        log.append(&batch)?;
    }
    println!(
        "append only (no fsync): {:.0} msgs/s",
        rate(rounds, start.elapsed().as_secs_f64())
    );
    log.sync()?;

    let start = std::time::Instant::now();
    let (mut from, mut n) = (0, 0usize);
    while from < log.written() {
        let got = log.read(from, 256)?;
        n += got.len();
        from = got.last().map_or(from + 1, |(o, _)| o + 1);
    }
    println!(
        "read back: {:.0} msgs/s ({n} msgs)",
        n as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
