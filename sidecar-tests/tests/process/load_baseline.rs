//! docs/reliability.md row 1, small variant: steady publish/consume with no faults, two zones,
//! three groups (unicast, broadcast, ordered); nothing lost, duplicated, unexpected or
//! reordered, and every group gets every message.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, seeded_rng, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use rand::Rng;
use tokio::time::Instant;

use super::common::{RUN_LIMIT, drain, group, pod, subscription, topic};

/// Messages per producer and topic.
const PER_PRODUCER: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_baseline_no_faults() -> anyhow::Result<()> {
    let mut rng = seeded_rng("load_baseline_no_faults");
    let crs = [
        topic("events", "durability: Disk"),
        topic("ordered", "durability: Disk, ordering: Key"),
        group("workers", "worker", "delivery: Unicast"),
        group("caches", "cache", "delivery: Broadcast"),
        group("ledger", "ledger", "delivery: Unicast"),
        subscription("workers-events", "events", "workers", ""),
        subscription("caches-events", "events", "caches", ""),
        subscription("ledger-ordered", "ordered", "ledger", ""),
    ]
    .concat();
    let pods = [
        pod("worker-a", "zone-a", "worker"),
        pod("worker-b", "zone-b", "worker"),
        pod("cache-a", "zone-a", "cache"),
        pod("cache-b", "zone-b", "cache"),
        pod("ledger-a", "zone-a", "ledger"),
        pod("ledger-b", "zone-b", "ledger"),
        pod("producer-a", "zone-a", ""),
        pod("producer-b", "zone-b", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let mut consumers = Vec::new();
    for (sub, group, members) in [
        (
            "default/workers-events",
            "workers",
            ["worker-a", "worker-b"],
        ),
        ("default/caches-events", "caches", ["cache-a", "cache-b"]),
        ("default/ledger-ordered", "ledger", ["ledger-a", "ledger-b"]),
    ] {
        for member in members {
            consumers.push(
                spawn_consumer(
                    &mesh.app_addr(member)?,
                    sub,
                    group,
                    member,
                    &history,
                    Behavior::Ack,
                    stop_at,
                )
                .await?,
            );
        }
    }

    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in ["producer-a", "producer-b"] {
        for topic in ["default/events", "default/ordered"] {
            let mut app = mesh.app(producer).await?;
            let history = history.clone();
            let keys: Vec<Option<String>> = (0..PER_PRODUCER)
                .map(|_| match topic {
                    "default/ordered" => Some(format!("{producer}-k{}", rng.random_range(0..5))),
                    _ => rng
                        .random_bool(0.5)
                        .then(|| format!("k{}", rng.random_range(0..20))),
                })
                .collect();
            producers.push(tokio::spawn(async move {
                for (i, key) in keys.into_iter().enumerate() {
                    let id = format!("{producer}-{}-{i}", topic.trim_start_matches("default/"));
                    publish(
                        &mut app,
                        &history,
                        producer,
                        topic,
                        &id,
                        key.as_deref(),
                        format!("payload {i}").into_bytes(),
                    )
                    .await?;
                }
                anyhow::Ok(())
            }));
        }
    }
    for p in producers {
        p.await??;
    }
    let published = started.elapsed();

    let expect = [
        Expect::AnyMember {
            group: "workers".into(),
            topic: "default/events".into(),
            check_order: false,
        },
        Expect::EveryMember {
            group: "caches".into(),
            topic: "default/events".into(),
            members: vec!["cache-a".into(), "cache-b".into()],
        },
        Expect::AnyMember {
            group: "ledger".into(),
            topic: "default/ordered".into(),
            check_order: true,
        },
    ];
    let c = drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "load_baseline_no_faults",
    )
    .await?;
    println!(
        "load_baseline_no_faults: {} publishes in {published:.2?} ({:.0}/s), drained by {:.2?}",
        4 * PER_PRODUCER,
        (4 * PER_PRODUCER) as f64 / published.as_secs_f64(),
        started.elapsed()
    );
    assert_eq!(
        (c.lost, c.duplicated, c.unexpected, c.reordered),
        (0, 0, 0, 0),
        "{c}"
    );
    assert_eq!(c.acked, 4 * PER_PRODUCER as u64);
    // Every group got every message: 200 events to workers, 200 to each cache member,
    // 200 ordered to the ledger.
    assert_eq!(history.deliveries_to("workers").len(), 2 * PER_PRODUCER);
    assert_eq!(history.deliveries_to("caches").len(), 4 * PER_PRODUCER);
    assert_eq!(history.deliveries_to("ledger").len(), 2 * PER_PRODUCER);
    // Ordered messages carry their per-key sequence number, so a consumer can check order.
    assert!(
        history
            .deliveries_to("ledger")
            .iter()
            .all(|d| d.key_sequence >= 1)
    );
    for c in consumers {
        c.abort();
    }
    Ok(())
}
