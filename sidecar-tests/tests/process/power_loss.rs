//! docs/reliability.md row 4: a power loss of the producer's node. The sidecar is `kill -9`ed and
//! restarted with `FERRY_SIMULATE_POWER_LOSS=1` (feature `powerloss`), which first cuts
//! every log file back to its last fsynced length: what a power loss keeps.
//!
//! - `Disk`: every acked publish was fsynced first, so lost = 0.
//! - `DiskAsync` (fsync every 3 s here): only publishes acked since the last fsync may be
//!   lost: lost <= acks in the last interval (plus 1 s of scheduling margin), and the
//!   startup log says how many bytes were dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{TestMesh, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::metrics::{Sample, scrape};
use tokio::time::Instant;

use super::common::{group, producer_and_reader, subscription, topic};
use super::durable_app::{publish_with, reconnecting_consumer};

const ASYNC_INTERVAL: Duration = Duration::from_secs(3);

fn topic_sample(samples: &[Sample], word: &str, topic: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name.contains(word) && !s.name.ends_with("_created"))
        .filter(|s| s.labels.get("topic").is_some_and(|t| t == topic))
        .map(|s| s.value)
        .sum()
}

fn block<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_loss_disk_vs_diskasync() -> anyhow::Result<()> {
    let crs = [
        topic("ledger", "durability: Disk"),
        topic("clicks", "durability: DiskAsync"),
        group("readers", "reader", ""),
        subscription("readers-ledger", "ledger", "readers", "ackWait: 5s"),
        subscription("readers-clicks", "clicks", "readers", "ackWait: 5s"),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &producer_and_reader()).await?;
    let interval = vec![(
        "FERRY_ASYNC_SYNC_INTERVAL".to_owned(),
        format!("{}ms", ASYNC_INTERVAL.as_millis()),
    )];
    mesh.mesh.restart_with_env("producer", &interval).await?;
    let admin = mesh.mesh.endpoints("producer")?.admin;
    let history = History::default();
    let (ledger, clicks) = ("default/ledger", "default/clicks");
    let mut app = mesh.app("producer").await?;

    // Nobody consumes yet: everything stays in the producer's log.
    for i in 0..200 {
        publish_with(&mut app, &history, ledger, &format!("ledger-{i}"), |_| {}).await?;
    }
    for i in 0..100 {
        publish_with(&mut app, &history, clicks, &format!("click-a-{i}"), |_| {}).await?;
    }
    // Batch A of the async topic is fsynced once an fsync follows its last ack. The store
    // fsyncs a dirty log within one interval, so if no new fsync comes within two
    // intervals, nothing of A was left unsynced by an earlier one.
    let scrape_fsyncs =
        || topic_sample(&block(scrape(admin)).unwrap_or_default(), "fsyncs", clicks);
    let synced_before = scrape_fsyncs();
    let asked = Instant::now();
    wait_for(
        ASYNC_INTERVAL * 5,
        "an fsync of the DiskAsync topic after batch A",
        || {
            let now = scrape_fsyncs();
            now > synced_before || (asked.elapsed() > ASYNC_INTERVAL * 2 && now >= 1.0)
        },
    )
    .await?;
    // Batch B right after that fsync: acked, most likely not fsynced before the kill.
    let mut b_acks = Vec::new();
    for i in 0..50 {
        publish_with(&mut app, &history, clicks, &format!("click-b-{i}"), |_| {}).await?;
        b_acks.push(Instant::now());
    }
    mesh.mesh.kill9("producer").await?;
    let killed = Instant::now();
    let in_last_interval = b_acks
        .iter()
        .filter(|t| killed.duration_since(**t) <= ASYNC_INTERVAL + Duration::from_secs(1))
        .count() as u64;
    println!(
        "power_loss: SIGKILL after 200 Disk and 150 DiskAsync publishes; {in_last_interval} DiskAsync acks in the last interval"
    );
    let mut env = interval.clone();
    env.push(("FERRY_SIMULATE_POWER_LOSS".to_owned(), "1".to_owned()));
    let restarted = mesh.mesh.restart_with_env("producer", &env).await?;
    let lines = restarted.output.lines();
    let dropped_line = lines
        .iter()
        .find(|l| l.contains("simulated power loss: dropped") && l.contains("files"))
        .cloned()
        .unwrap_or_default();
    println!("power_loss: startup said: {dropped_line}");
    assert!(!dropped_line.is_empty(), "the loss is logged at startup");

    // Now read everything back; a barrier per topic marks the end of what was stored.
    let stop = Arc::new(AtomicBool::new(false));
    let consumers = [
        ("default/readers-ledger", "reader-a"),
        ("default/readers-clicks", "reader-a"),
    ]
    .map(|(sub, member)| {
        reconnecting_consumer(
            mesh.app_addr("reader-a").unwrap_or_default(),
            sub,
            "readers",
            member,
            history.clone(),
            stop.clone(),
        )
    });
    let admin = mesh.mesh.endpoints("producer")?.admin;
    let mut app = mesh.app("producer").await?;
    publish_with(&mut app, &history, ledger, "ledger-barrier", |_| {}).await?;
    publish_with(&mut app, &history, clicks, "click-barrier", |_| {}).await?;
    wait_for(Duration::from_secs(60), "both topics fully settled", || {
        block(scrape(admin)).is_some_and(|s| {
            topic_sample(&s, "backlog_bytes", ledger) == 0.0
                && topic_sample(&s, "backlog_bytes", clicks) == 0.0
        }) && history
            .deliveries()
            .iter()
            .filter(|d| d.message_id.ends_with("barrier"))
            .count()
            >= 2
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    let expect = |topic: &str| {
        [Expect::AnyMember {
            group: "readers".into(),
            topic: topic.into(),
            check_order: false,
        }]
    };
    let disk = history.check(&expect(ledger));
    let async_ = history.check(&expect(clicks));
    println!("power_loss Disk: history {disk}");
    println!("power_loss DiskAsync: history {async_}");
    assert_eq!((disk.lost, disk.unexpected), (0, 0), "Disk: {disk}");
    assert_eq!(async_.unexpected, 0, "DiskAsync: {async_}");
    assert!(
        async_.lost <= in_last_interval,
        "DiskAsync lost {} > {in_last_interval} acks in the last interval: {async_}",
        async_.lost
    );
    // Batch A was fsynced: whatever was lost is from batch B.
    let delivered: std::collections::BTreeSet<String> = history
        .deliveries()
        .into_iter()
        .map(|d| d.message_id)
        .collect();
    let missing_a = (0..100)
        .filter(|i| !delivered.contains(&format!("click-a-{i}")))
        .count();
    assert_eq!(missing_a, 0, "batch A was fsynced before the power loss");

    // The dedup window after the power loss: ids whose messages survived are still
    // duplicates; ids whose messages were lost are stored again, not answered "duplicate"
    // for a message that no longer exists.
    let r = publish_with(&mut app, &history, ledger, "ledger-0", |_| {}).await?;
    assert!(
        r.duplicate,
        "a surviving Disk id is still remembered: {r:?}"
    );
    let r = publish_with(&mut app, &history, clicks, "click-a-0", |_| {}).await?;
    assert!(
        r.duplicate,
        "a surviving DiskAsync id is still remembered: {r:?}"
    );
    let lost_b: Vec<String> = (0..50)
        .map(|i| format!("click-b-{i}"))
        .filter(|id| !delivered.contains(id))
        .collect();
    for id in &lost_b {
        let r = publish_with(&mut app, &history, clicks, id, |_| {}).await?;
        assert!(!r.duplicate, "{id} was lost, so it is stored again: {r:?}");
    }
    println!(
        "power_loss: {} lost DiskAsync ids published again and stored as new",
        lost_b.len()
    );
    Ok(())
}
