//! Per-key ordering (`ordering: Key`) under member churn and redeliveries: one producer
//! publishes ten keys interleaved, plus one poison key whose app nacks it every time. A
//! member leaves the group halfway through, so keys move. Pass: 0 per-key order
//! violations, nothing lost, and the ten good keys drain while the poison key is still
//! being retried: a failing key blocks only itself.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, group, pod, subscription, topic};

const POISON: &str = "poison";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_churn_and_a_poison_key_blocks_only_itself() -> anyhow::Result<()>
{
    let crs = [
        topic("events", "durability: Disk, ordering: Key"),
        group("workers", "workers", "zonePolicy: Any"),
        subscription(
            "workers-events",
            "events",
            "workers",
            // The poison key is retried far longer than the test runs.
            "ackWait: 5s, maxDeliveries: 1000, maxInFlight: 10, backoff: {initial: 100ms, max: 300ms, multiplier: 2}",
        ),
    ]
    .concat();
    let pods = [
        pod("w1", "zone-a", "workers"),
        pod("w2", "zone-a", "workers"),
        pod("w3", "zone-b", "workers"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let mut consumers = Vec::new();
    for member in ["w1", "w2", "w3"] {
        consumers.push(
            spawn_consumer(
                &mesh.app_addr(member)?,
                "default/workers-events",
                "workers",
                member,
                &history,
                Behavior::NackKey(POISON, 0),
                Instant::now() + RUN_LIMIT,
            )
            .await?,
        );
    }

    let mut app = mesh.app("producer").await?;
    let topic_name = "default/events";
    publish(
        &mut app,
        &history,
        "producer",
        topic_name,
        "poison-1",
        Some(POISON),
        b"x".to_vec(),
    )
    .await?;
    for i in 0..200 {
        if i == 100 {
            // w3 leaves the group (its pod deleted): its keys move to w1 and w2, each only
            // after its in-flight message settles.
            mesh.remove_member("w3")?;
            println!("ordering: w3 removed from the group after 100 publishes");
        }
        let key = format!("k{}", i % 10);
        let id = format!("{key}-{}", i / 10);
        publish(
            &mut app,
            &history,
            "producer",
            topic_name,
            &id,
            Some(&key),
            b"x".to_vec(),
        )
        .await?;
    }

    // Every good message arrives (with redeliveries counted apart), in key order.
    let expect = [Expect::AnyMember {
        group: "workers".into(),
        topic: topic_name.into(),
        check_order: true,
    }];
    let good_acked = || {
        history
            .deliveries()
            .iter()
            .filter(|d| !d.message_id.starts_with(POISON))
            .map(|d| d.message_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    wait_for(
        Duration::from_secs(90),
        "every good message delivered",
        || good_acked() == 200,
    )
    .await?;
    let poison_attempts = history
        .deliveries()
        .iter()
        .filter(|d| d.message_id.starts_with(POISON))
        .count();
    let counts = history.check(&expect);
    println!(
        "ordering: history {counts}; the poison key was delivered {poison_attempts} times meanwhile"
    );
    assert_eq!(counts.lost, 0, "{counts}");
    assert_eq!(counts.unexpected, 0, "{counts}");
    assert_eq!(counts.reordered, 0, "{counts}");
    assert!(
        poison_attempts >= 2,
        "the poison key was being retried while the others drained"
    );
    for c in consumers {
        c.abort();
    }
    Ok(())
}
