//! `key_sequence` keeps increasing per key across a restart of the producer's sidecar, as
//! `Delivery.key_sequence` promises in app.proto. Two ordered topics: a `Disk` one whose
//! log no longer holds the key's earlier records once they are acked (about 70 MiB of
//! other messages roll and delete the first segment), and a `Memory` one, whose messages do
//! not survive the restart at all. Before the fix both numbered the key from 1 again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{TestMesh, publish, wait_for};
use ferry_sidecar_tests::history::{Expect, History};

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::reconnecting_consumer;

/// The first segment file of a topic's log, deleted by compaction once it is settled.
const FIRST_SEGMENT: &str = "00000000000000000000.log";

async fn mesh(durability: &str) -> anyhow::Result<TestMesh> {
    let crs = [
        topic(
            "events",
            &format!("durability: {durability}, ordering: Key"),
        ),
        group("readers", "reader", ""),
        subscription("readers-events", "events", "readers", "ackWait: 5s"),
    ]
    .concat();
    let pods = [
        pod("reader-a", "zone-a", "reader"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    TestMesh::start(&crs, &pods).await
}

/// The `key_sequence`s the reader saw for messages `key-…`, in arrival order of first
/// deliveries.
fn sequences(history: &History, key: &str) -> Vec<(String, u64)> {
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for d in history.deliveries() {
        if d.message_id.starts_with(&format!("{key}-"))
            && seen.insert(d.message_id.clone(), ()).is_none()
        {
            out.push((d.message_id.clone(), d.key_sequence));
        }
    }
    out
}

async fn keeps_increasing_across_restart(durability: &str, filler: usize) -> anyhow::Result<()> {
    let test = format!("key_sequence_restart[{durability}]");
    let mut mesh = mesh(durability).await?;
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = reconnecting_consumer(
        mesh.app_addr("reader-a")?,
        "default/readers-events",
        "readers",
        "reader-a",
        history.clone(),
        stop.clone(),
    );
    let topic_name = "default/events";
    let expect = [Expect::AnyMember {
        group: "readers".into(),
        topic: topic_name.into(),
        check_order: true,
    }];
    let mut app = mesh.app("producer").await?;
    for i in 0..5 {
        let id = format!("k1-before-{i}");
        publish(
            &mut app,
            &history,
            "producer",
            topic_name,
            &id,
            Some("k1"),
            b"x".to_vec(),
        )
        .await?;
    }
    // Other keys' messages, large enough to roll the log past its first segment.
    let big = vec![7u8; 1000 << 10];
    for i in 0..filler {
        let id = format!("fill-{i}");
        let key = format!("fill{i}");
        publish(
            &mut app,
            &history,
            "producer",
            topic_name,
            &id,
            Some(&key),
            big.clone(),
        )
        .await?;
    }
    drain(&history, &expect, Duration::from_secs(60), &test).await?;
    let log_dir = mesh
        .mesh
        .spec("producer")?
        .data_dir
        .join("topics/default/events");
    if filler > 0 {
        wait_for(
            Duration::from_secs(30),
            "the first segment, holding k1's records, deleted once settled",
            || !log_dir.join(FIRST_SEGMENT).exists(),
        )
        .await?;
    }
    mesh.mesh
        .terminate("producer", Duration::from_secs(10))
        .await?;
    mesh.mesh.restart("producer").await?;
    println!("{test}: producer restarted after 5 messages of k1 and {filler} others");
    let mut app = mesh.app("producer").await?;
    for i in 0..3 {
        let id = format!("k1-after-{i}");
        publish(
            &mut app,
            &history,
            "producer",
            topic_name,
            &id,
            Some("k1"),
            b"x".to_vec(),
        )
        .await?;
    }
    let counts = drain(&history, &expect, Duration::from_secs(60), &test).await?;
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.await;
    let seen = sequences(&history, "k1");
    println!("{test}: k1's key_sequence per message: {seen:?}");
    assert_eq!(seen.len(), 8, "{seen:?}");
    let before: Vec<u64> = seen[..5].iter().map(|(_, s)| *s).collect();
    assert_eq!(
        before,
        [1, 2, 3, 4, 5],
        "numbered 1, 2, ... before the restart"
    );
    for pair in seen.windows(2) {
        assert!(
            pair[1].1 > pair[0].1,
            "k1's key_sequence went from {} ({}) to {} ({}) across the restart",
            pair[0].1,
            pair[0].0,
            pair[1].1,
            pair[1].0
        );
    }
    let after: Vec<u64> = seen[5..].iter().map(|(_, s)| *s).collect();
    assert_eq!(
        [after[1] - after[0], after[2] - after[1]],
        [1, 1],
        "by one again after the restart: {after:?}"
    );
    assert_eq!(
        (counts.lost, counts.unexpected, counts.reordered),
        (0, 0, 0),
        "{counts}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_sequence_keeps_increasing_across_producer_restart_on_disk() -> anyhow::Result<()> {
    keeps_increasing_across_restart("Disk", 70).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_sequence_keeps_increasing_across_producer_restart_in_memory() -> anyhow::Result<()> {
    keeps_increasing_across_restart("Memory", 0).await
}
