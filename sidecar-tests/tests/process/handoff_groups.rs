//! Issue #10 item 3: a custody move (SIGTERM handoff, replica takeover) redelivers to each
//! subscription only what that subscription had not settled. One topic, three
//! `AtLeastOnce` groups: `audit` and `billing` consume and ack every message before the
//! move, `shipping` has no consumer until after it. Each group gets at most the deliveries
//! in flight when the move starts twice (`maxInFlight` x 1 member: none for the fast
//! groups, since the test waits for their acks; for the slow one, those its sidecar queued
//! for an app not there yet), and the slow group gets everything.
//! Prints the history counts of each group.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Counts, Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, group, pod, subscription, topic, topic_metric, wait_settled};

const TOPIC: &str = "default/orders";
/// Messages published; enough that a redelivery of everything stands out from the bound.
const MESSAGES: usize = 1000;
const MAX_IN_FLIGHT: u64 = 10;
/// The groups that ack everything before the move, and the one with no consumer yet.
const FAST: [&str; 2] = ["audit", "billing"];
const SLOW: &str = "shipping";

fn crs(topic_spec: &str) -> String {
    let mut crs = vec![topic("orders", topic_spec), group("senders", "senders", "")];
    for g in FAST.iter().chain([&SLOW]) {
        crs.push(group(g, g, ""));
        crs.push(subscription(
            &format!("{g}-orders"),
            "orders",
            g,
            &format!("maxInFlight: {MAX_IN_FLIGHT}"),
        ));
    }
    crs.concat()
}

/// One member per group, `<group>-a`; the producer in group `senders` (so that it has a
/// member record, as every pod with a sidecar has in a cluster).
fn pods() -> String {
    [
        pod("producer", "zone-a", "senders"),
        pod("audit-a", "zone-a", "audit"),
        pod("billing-a", "zone-b", "billing"),
        pod("shipping-a", "zone-b", "shipping"),
    ]
    .concat()
}

async fn consume(mesh: &TestMesh, history: &History, g: &str) -> anyhow::Result<()> {
    let member = format!("{g}-a");
    spawn_consumer(
        &mesh.app_addr(&member)?,
        &format!("default/{g}-orders"),
        g,
        &member,
        history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    Ok(())
}

/// Publishes [`MESSAGES`] with the fast groups consuming, and waits until both acked all.
async fn publish_with_fast_groups(
    mesh: &TestMesh,
    history: &History,
    test: &str,
) -> anyhow::Result<()> {
    for g in FAST {
        consume(mesh, history, g).await?;
    }
    let mut app = mesh.app("producer").await?;
    for i in 0..MESSAGES {
        let id = format!("{test}-{i}");
        publish(
            &mut app,
            history,
            "producer",
            TOPIC,
            &id,
            None,
            vec![b'g'; 256],
        )
        .await?;
    }
    wait_for(
        Duration::from_secs(60),
        "the fast groups acked every message",
        || {
            FAST.iter()
                .all(|g| received_by(history, g) >= MESSAGES as u64)
        },
    )
    .await
}

/// How many distinct messages a group's app received (it acks each as it records it).
fn received_by(history: &History, g: &str) -> u64 {
    let got: std::collections::BTreeSet<String> = history
        .deliveries_to(g)
        .into_iter()
        .map(|d| d.message_id)
        .collect();
    got.len() as u64
}

/// Each group's counts (acked, delivered, lost, duplicated, refused), printed.
fn per_group(history: &History, test: &str) -> Vec<(&'static str, Counts)> {
    FAST.iter()
        .chain([&SLOW])
        .map(|g| {
            let c = history.check(&[Expect::AnyMember {
                group: (*g).into(),
                topic: TOPIC.into(),
                check_order: false,
            }]);
            let delivered = history.deliveries_to(g).len();
            println!(
                "{test}: group {g}: acked={} delivered={delivered} lost={} duplicated={} (unexplained {}) refused={}",
                c.acked,
                c.lost,
                c.duplicated,
                c.unexplained_duplicates,
                c.attempted - c.acked,
            );
            (*g, c)
        })
        .collect()
}

/// Starts the slow group's consumer, waits until it has every acked message and every
/// remaining sidecar holds nothing unsettled (so no redelivery is still on its way), then
/// checks: nothing lost, the fast groups got at most the deliveries in flight again.
async fn finish(mesh: &TestMesh, history: &History, test: &str) -> anyhow::Result<()> {
    consume(mesh, history, SLOW).await?;
    wait_for(
        Duration::from_secs(90),
        "the slow group got every message",
        || received_by(history, SLOW) >= MESSAGES as u64,
    )
    .await?;
    for p in ["audit-a", "billing-a", "shipping-a"] {
        wait_settled(mesh, p, TOPIC, Duration::from_secs(90)).await?;
    }
    let counts = per_group(history, test);
    for (g, c) in &counts {
        assert_eq!((c.lost, c.unexpected), (0, 0), "group {g}: {c}");
        assert_eq!(c.acked, MESSAGES as u64, "group {g}: {c}");
        assert_eq!(c.unexplained_duplicates, 0, "group {g}: {c}");
        // The deliveries in flight when the move started, maxInFlight x 1 member: for the
        // slow group those its sidecar queued from the producer for an app not there yet.
        assert!(
            c.duplicated <= MAX_IN_FLIGHT,
            "group {g} got {} messages twice (the fast groups had acked all before the move): {c}",
            c.duplicated
        );
    }
    Ok(())
}

/// (a) SIGTERM of the producer's sidecar: the backlog (everything, for `shipping`) moves
/// to a peer, which delivers it to `shipping` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_handoff_redelivers_only_what_each_group_lacks() -> anyhow::Result<()> {
    let test = "handoff_groups_sigterm";
    let mut mesh = TestMesh::start(&crs("durability: Disk"), &pods()).await?;
    let history = History::default();
    publish_with_fast_groups(&mesh, &history, test).await?;

    let clean = mesh
        .mesh
        .terminate("producer", Duration::from_secs(30))
        .await?;
    assert!(clean, "the producer's sidecar did not exit 0 by itself");
    mesh.remove_member("producer")?;
    finish(&mesh, &history, test).await
}

/// (b) kill -9 of a `Replicated` topic's producer (data gone, member record removed): its
/// replica takes custody and delivers each copy only to the groups that had not settled
/// it. The test waits until the replica heard the fast groups' settlements (per
/// subscription trims) before the kill; what it may not have heard is in the trim
/// interval, which this wait leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_redelivers_only_what_each_group_lacks() -> anyhow::Result<()> {
    let test = "handoff_groups_takeover";
    let mut mesh = TestMesh::start(&crs("durability: Replicated, replicas: 2"), &pods()).await?;
    let history = History::default();
    publish_with_fast_groups(&mesh, &history, test).await?;

    // Every copy is held by one replica; it hears per subscription what was settled.
    let want = (MESSAGES * FAST.len()) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut heard = 0.0;
    while Instant::now() < deadline {
        heard = 0.0;
        for p in ["audit-a", "billing-a", "shipping-a"] {
            heard += topic_metric(&mesh, p, "replica_settled", TOPIC).await?;
        }
        if heard >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{test}: the replicas heard {heard} of {want} per-subscription settlements");

    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    std::fs::remove_dir_all(&data)?;
    mesh.remove_member("producer")?;
    wait_for(Duration::from_secs(60), "a replica took custody", || {
        ["audit-a", "billing-a", "shipping-a"].iter().any(|p| {
            mesh.log_lines(p, "took custody of")
                .is_ok_and(|l| !l.is_empty())
        })
    })
    .await?;
    finish(&mesh, &history, test).await?;
    assert!(
        heard >= want,
        "the replicas heard {heard} of {want} per-subscription settlements before the kill"
    );
    Ok(())
}
