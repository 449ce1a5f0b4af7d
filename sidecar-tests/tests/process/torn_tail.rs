//! docs/reliability.md row 7, process variant: crash the producer's sidecar, damage the tail of
//! its last segment file (random garbage, then a zero-filled block), restart it: no panic,
//! every acked record is still there (and delivered), and the log says it truncated.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_sidecar_tests::harness::{logged_redeliveries, seeded_rng, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use rand::{Rng, RngCore};

use super::common::billing_consumer;
use super::common::{drain, orders_mesh, publish_orders};

/// The segment file with the highest base offset under `dir` (`<20 digits>.log`).
fn last_segment(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if name.len() == 24
                && name.ends_with(".log")
                && name[..20].bytes().all(|b| b.is_ascii_digit())
            {
                found.push(path);
            }
        }
    }
    found
        .into_iter()
        .max_by_key(|p| p.file_name().map(|n| n.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torn_tail_is_truncated_and_acked_records_survive() -> anyhow::Result<()> {
    let mut rng = seeded_rng("torn_tail_is_truncated_and_acked_records_survive");
    let mut mesh = orders_mesh("durability: Disk", "").await?;
    let history = History::default();
    let data_dir = mesh.mesh.spec("producer")?.data_dir.clone();
    let mut published = 0;
    for (round, damage) in ["random garbage", "zero-filled block"].iter().enumerate() {
        // No consumer yet: the acked messages stay in the producer's log.
        let ids = (published + 1..=published + 50).map(|i| format!("o-{i}"));
        publish_orders(&mesh, &history, ids, &[b'p'; 300]).await?;
        published += 50;
        mesh.mesh.kill9("producer").await?;
        let segment = last_segment(&data_dir)
            .ok_or_else(|| anyhow::anyhow!("no segment file under {}", data_dir.display()))?;
        let len = rng.random_range(1..4096);
        let mut tail = vec![0u8; len];
        if round == 0 {
            rng.fill_bytes(&mut tail);
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)?
            .write_all(&tail)?;
        println!(
            "torn_tail: appended {len} bytes of {damage} to {}",
            segment.display()
        );
        let process = mesh.mesh.restart("producer").await?;
        let output = process.output.clone();
        let said_truncated =
            |l: &String| l.contains("truncated ") && l.contains(" bytes at offset");
        wait_for(
            Duration::from_secs(10),
            "a log line saying the tail was truncated",
            || output.lines().iter().any(said_truncated),
        )
        .await?;
        for line in output.lines().iter().filter(|l| said_truncated(l)) {
            println!("torn_tail: sidecar said: {line}");
        }
        // The consumer has no session yet, so nothing was acked: every message published so
        // far is unsettled, and the restarted producer says it will send them again.
        let subscription = "default/orders/default/billing-orders";
        wait_for(
            Duration::from_secs(10),
            "a log line announcing the redelivery of every unsettled message",
            || logged_redeliveries(&output.lines(), subscription) == published,
        )
        .await?;
        assert!(
            !output.lines().iter().any(|l| l.contains("panicked")),
            "the sidecar panicked"
        );
    }
    // Every acked message is still there: a consumer now gets them all.
    let consumer = billing_consumer(&mesh, &history).await?;
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: "default/orders".into(),
        check_order: false,
    }];
    let c = drain(&history, &expect, Duration::from_secs(60), "torn_tail").await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    // Each crash may redeliver what was in flight: at most maxInFlight (100) x 1 member
    // per crash (docs/reliability.md's duplicate bound).
    assert!(c.duplicated <= 2 * 100, "{c}");
    // The consumer's sidecar held the killed processes' forwards in flight; the restarted
    // producer's repeats re-link to them instead of reaching the app twice. Any copy beyond
    // the first is a redelivery (attempt >= 2) explained by the restart's log line.
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    for d in history.repeats_to("billing") {
        assert!(d.attempt >= 2, "duplicate without a redelivery: {d:?}");
    }
    assert!(mesh.mesh.process("producer")?.pid > 0);
    consumer.abort();
    Ok(())
}
