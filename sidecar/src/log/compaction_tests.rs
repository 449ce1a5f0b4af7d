//! Tests of the backlog as unsettled bytes and of compaction carrying stuck records
//! forward (`compaction.rs`, `relocated.rs`), including restarts and crashes in the middle
//! of a compaction.

use std::path::Path;

use super::disk_tests::{TestResult, fill, open, read_all, small};
use super::record::message_record_len;
use super::relocated::FILE_NAME as RELOCATED;
use super::tests::msg;
use super::{Log, Offset, Settlement};

fn subs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn len(i: u64) -> u64 {
    message_record_len(&msg(i)) as u64
}

/// Settles every offset below `n` for `sub` except `stuck`.
fn settle_all_but(
    log: &mut dyn Log,
    sub: &str,
    n: u64,
    stuck: &[Offset],
) -> Result<(), super::LogError> {
    for o in (0..n).filter(|o| !stuck.contains(o)) {
        log.settle(sub, o, Settlement::Acked)?;
    }
    log.sync()
}

fn offsets(log: &super::DiskLog) -> Result<Vec<Offset>, super::LogError> {
    Ok(read_all(log)?.into_iter().map(|(o, _)| o).collect())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

#[test]
fn a_stuck_record_counts_only_its_own_bytes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.set_subscriptions(&subs(&["a"]))?;
    fill(&mut log, 0, 1000, 100)?;
    settle_all_but(&mut log, "a", 1000, &[3])?;
    assert_eq!(log.acknowledged(), 3);
    assert_eq!(log.backlog_bytes(), len(3));
    drop(log);
    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.backlog_bytes(), len(3), "rebuilt on open");
    log.settle("a", 3, Settlement::Acked)?;
    assert_eq!((log.backlog_bytes(), log.acknowledged()), (0, 1000));
    Ok(())
}

#[test]
fn two_subscriptions_count_what_either_holds() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.set_subscriptions(&subs(&["a", "b"]))?;
    fill(&mut log, 0, 100, 10)?;
    settle_all_but(&mut log, "a", 100, &[5])?;
    settle_all_but(&mut log, "b", 100, &[7])?;
    assert_eq!(log.backlog_bytes(), len(5) + len(7));
    // Removing `b` leaves only what `a` holds.
    log.set_subscriptions(&subs(&["a"]))?;
    assert_eq!(log.backlog_bytes(), len(5));
    Ok(())
}

#[test]
fn compaction_carries_stuck_records_forward() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.set_subscriptions(&subs(&["a"]))?;
    fill(&mut log, 0, 600, 50)?;
    let segments = log.segment_count();
    assert!(segments > 5, "{segments}");
    settle_all_but(&mut log, "a", 600, &[3, 40])?;
    let freed = log.compact()?;
    assert!(freed > 0);
    assert_eq!(log.segment_count(), 1, "only the active segment is left");
    assert_eq!(offsets(&log)?, vec![3, 40]);
    assert_eq!(log.read(0, 10)?, vec![(3, msg(3)), (40, msg(40))]);
    assert_eq!(log.backlog_bytes(), len(3) + len(40));
    assert_eq!(log.first(), 3);
    drop(log);

    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.read(0, 10)?, vec![(3, msg(3)), (40, msg(40))]);
    assert_eq!(log.backlog_bytes(), len(3) + len(40));
    assert_eq!(log.cursor("a"), Some(3));
    // A subscription added now sees what `a` holds, not what compaction removed.
    log.set_subscriptions(&subs(&["a", "late"]))?;
    assert_eq!(log.cursor("late"), Some(3));
    assert!(log.is_settled("late", 4) && !log.is_settled("late", 40));
    log.sync()?;
    drop(log);

    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    // `late` also holds the records of the active segment, which `a` settled.
    assert!(log.backlog_bytes() > len(3) + len(40));
    settle_all_but(&mut log, "late", 600, &[])?;
    log.settle("a", 3, Settlement::Acked)?;
    assert_eq!(log.backlog_bytes(), len(40));
    log.settle("a", 40, Settlement::Acked)?;
    assert_eq!(log.backlog_bytes(), 0);
    assert_eq!(log.acknowledged(), 600);
    log.compact()?;
    assert_eq!(std::fs::metadata(dir.path().join(RELOCATED))?.len(), 0);
    assert!(offsets(&log)?.is_empty());
    Ok(())
}

#[test]
fn a_slow_consumer_is_not_copied() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut log, _) = open(dir.path(), small())?;
    log.set_subscriptions(&subs(&["a", "slow"]))?;
    fill(&mut log, 0, 600, 50)?;
    settle_all_but(&mut log, "a", 600, &[])?;
    // `slow` read only the first 30, some out of order: it has not passed the first segment.
    settle_all_but(&mut log, "slow", 30, &[3])?;
    let segments = log.segment_count();
    log.compact()?;
    assert_eq!(
        log.segment_count(),
        segments,
        "nothing deleted, nothing copied"
    );
    assert_eq!(std::fs::metadata(dir.path().join(RELOCATED))?.len(), 0);
    Ok(())
}

/// The directory as it was before a compaction, with what the compaction wrote kept:
/// the deletions never reached the disk (or the settlement file's sync neither).
fn crash_mid_compaction(keep_settlements: bool) -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = tempfile::tempdir()?;
    {
        let (mut log, _) = open(dir.path(), small())?;
        log.set_subscriptions(&subs(&["a"]))?;
        fill(&mut log, 0, 600, 50)?;
        settle_all_but(&mut log, "a", 600, &[3, 40])?;
        copy_dir(dir.path(), before.path())?;
        log.compact()?;
    }
    // Put the deleted segments back (and perhaps the old settlement file): relocated.dat
    // now holds copies of records that are also in their segments.
    for entry in std::fs::read_dir(before.path())? {
        let entry = entry?;
        let name = entry.file_name();
        let is_settlements = name == super::settlement_store::FILE_NAME;
        if name.to_string_lossy().ends_with(".log") && name != RELOCATED
            || (is_settlements && !keep_settlements)
        {
            std::fs::copy(entry.path(), dir.path().join(&name))?;
        }
    }
    let (mut log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        log.read(0, 10)?,
        vec![(3, msg(3)), (40, msg(40))],
        "once each"
    );
    assert_eq!(log.backlog_bytes(), len(3) + len(40), "counted once");
    // Compaction runs again and the result is the same.
    log.compact()?;
    assert_eq!(log.segment_count(), 1);
    drop(log);
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.read(0, 10)?, vec![(3, msg(3)), (40, msg(40))]);
    assert_eq!(log.backlog_bytes(), len(3) + len(40));
    Ok(())
}

#[test]
fn crash_before_the_segments_are_deleted_loses_and_duplicates_nothing() -> TestResult {
    crash_mid_compaction(true)
}

#[test]
fn crash_before_the_gone_ranges_are_synced_loses_and_duplicates_nothing() -> TestResult {
    crash_mid_compaction(false)
}

#[test]
fn a_torn_relocation_with_its_segments_still_there_is_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = tempfile::tempdir()?;
    {
        let (mut log, _) = open(dir.path(), small())?;
        log.set_subscriptions(&subs(&["a"]))?;
        fill(&mut log, 0, 600, 50)?;
        settle_all_but(&mut log, "a", 600, &[3, 40])?;
        copy_dir(dir.path(), before.path())?;
        log.compact()?;
    }
    // Died while appending the copies: half of them written, nothing else happened.
    let relocated = std::fs::read(dir.path().join(RELOCATED))?;
    std::fs::remove_dir_all(dir.path())?;
    copy_dir(before.path(), dir.path())?;
    std::fs::write(
        dir.path().join(RELOCATED),
        &relocated[..relocated.len() - 9],
    )?;
    let (log, report) = open(dir.path(), small())?;
    assert_eq!(report.relocated_truncated_bytes, len(40) - 9, "{report:?}");
    assert_eq!(report.lost_records(), 0);
    assert_eq!(log.read(0, 10)?, vec![(3, msg(3)), (40, msg(40))]);
    assert_eq!(log.backlog_bytes(), len(3) + len(40));
    Ok(())
}

#[test]
fn a_missing_relocated_record_is_reported_lost() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _) = open(dir.path(), small())?;
        log.set_subscriptions(&subs(&["a"]))?;
        fill(&mut log, 0, 600, 50)?;
        settle_all_but(&mut log, "a", 600, &[3, 40])?;
        log.compact()?;
    }
    std::fs::write(dir.path().join(RELOCATED), b"")?;
    let (log, report) = open(dir.path(), small())?;
    let lost: Vec<_> = report.lost();
    assert_eq!(lost, vec![3..4, 40..41], "{report:?}");
    assert_eq!(log.backlog_bytes(), 0);
    assert!(log.lost().contains(&(40..41)));
    Ok(())
}

#[test]
fn records_dropped_from_the_relocation_are_gone_for_later_subscriptions() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _) = open(dir.path(), small())?;
        log.set_subscriptions(&subs(&["a"]))?;
        fill(&mut log, 0, 600, 50)?;
        settle_all_but(&mut log, "a", 600, &[3, 40])?;
        log.compact()?;
        // Both settle; the relocation is rewritten empty.
        log.settle("a", 3, Settlement::Acked)?;
        log.settle("a", 40, Settlement::Acked)?;
        log.sync()?;
        log.compact()?;
        assert_eq!(std::fs::metadata(dir.path().join(RELOCATED))?.len(), 0);
        log.set_subscriptions(&subs(&["a", "late"]))?;
        assert!(log.is_settled("late", 40) && log.is_settled("late", 3));
        assert_eq!(log.backlog_bytes(), 0);
        log.sync()?;
    }
    // Not taken for records whose copy went missing.
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert!(log.is_settled("late", 40));
    assert!(offsets(&log)?.is_empty());
    Ok(())
}

#[test]
fn a_large_relocation_is_rewritten_and_what_it_drops_is_gone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let n = 30_000;
    let stuck: Vec<Offset> = (0..n).filter(|o| o % 2 == 1).collect();
    {
        let (mut log, _) = open(dir.path(), small())?;
        log.set_subscriptions(&subs(&["a"]))?;
        let batch: Vec<_> = (0..100).map(msg).collect();
        for _ in 0..n / 100 {
            log.append(&batch)?;
        }
        log.sync()?;
        for o in (0..n).filter(|o| o % 2 == 0) {
            log.settle("a", o, Settlement::Acked)?;
        }
        log.sync()?;
        log.compact()?;
        let relocated = std::fs::metadata(dir.path().join(RELOCATED))?.len();
        assert!(relocated >= 1 << 20, "{relocated} bytes relocated");
        // Two thirds of the stuck ones settle: the relocation is rewritten without them.
        for o in stuck.iter().filter(|o| *o % 3 != 0) {
            log.settle("a", *o, Settlement::Acked)?;
        }
        log.sync()?;
        log.compact()?;
        let rewritten = std::fs::metadata(dir.path().join(RELOCATED))?.len();
        assert!(
            rewritten * 2 < relocated,
            "{rewritten} of {relocated} bytes kept"
        );
        log.set_subscriptions(&subs(&["a", "late"]))?;
        assert!(log.is_settled("late", 5) && !log.is_settled("late", 3));
        log.sync()?;
    }
    let (log, report) = open(dir.path(), small())?;
    assert!(report.is_clean(), "{report:?}");
    assert!(log.is_settled("late", 5) && !log.is_settled("late", 3));
    let held: Vec<Offset> = stuck.iter().copied().filter(|o| o % 3 == 0).collect();
    // Below the segments still on disk: exactly the relocated records still held.
    let first = log.first_segment();
    let read: Vec<Offset> = offsets(&log)?.into_iter().filter(|o| *o < first).collect();
    let held: Vec<Offset> = held.into_iter().filter(|o| *o < first).collect();
    assert!(held.len() > 4_000, "{}", held.len());
    assert!(
        read == held,
        "{} read back, {} held",
        read.len(),
        held.len()
    );
    Ok(())
}
