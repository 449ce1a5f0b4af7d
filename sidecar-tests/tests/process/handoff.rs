//! Issue item "handoff on pod stop": SIGTERM to a producer's sidecar whose backlog cannot
//! drain (no consuming app is up). After the drain window it hands the backlog to a live
//! peer, which stores it before answering, and exits 0; a consumer that starts after the
//! producer is gone receives everything from that peer. Prints its history counts.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::{Counts, History};
use tokio::time::Instant;

use super::common::{
    RUN_LIMIT, billing_consumer, drain_orders, group, orders_mesh, pod, publish_orders,
    subscription, topic,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_backlog_to_a_peer() -> anyhow::Result<()> {
    let c = hand_off("durability: Disk", "maxInFlight: 10", "sigterm_handoff").await?;
    // The deliveries in flight when the handoff started were queued for the app by
    // billing-a's sidecar and are handed off too: at most maxInFlight x 1 member, each
    // followed by the new holder's delivery with attempt >= 2.
    assert!(c.duplicated <= 10, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}

/// The same with an `ExactlyOnce` subscription: the consuming sidecar links the new
/// holder's copy of a message to the one it already queued from the stopped sidecar, so
/// the app gets each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_handoff_exactly_once_delivers_each_message_once() -> anyhow::Result<()> {
    let c = hand_off(
        "durability: Disk",
        "maxInFlight: 10, qos: ExactlyOnce",
        "sigterm_handoff_exactly_once",
    )
    .await?;
    assert_eq!(c.duplicated, 0, "{c}");
    Ok(())
}

/// The README's promise for every durability, `Memory` and `DiskAsync` too: a backlog that
/// cannot drain on SIGTERM is handed to a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_memory_backlog_to_a_peer() -> anyhow::Result<()> {
    let c = hand_off(
        "durability: Memory",
        "maxInFlight: 10",
        "sigterm_handoff_memory",
    )
    .await?;
    assert!(c.duplicated <= 10, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_disk_async_backlog_to_a_peer() -> anyhow::Result<()> {
    let c = hand_off(
        "durability: DiskAsync",
        "maxInFlight: 10",
        "sigterm_handoff_disk_async",
    )
    .await?;
    assert!(c.duplicated <= 10, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}

/// Publishes a backlog no app consumes to a topic of `topic_spec`, SIGTERMs the producer's
/// sidecar (which must hand the backlog off and exit 0), then starts the consumer: nothing
/// lost or unexpected.
async fn hand_off(topic_spec: &str, subscription_spec: &str, test: &str) -> anyhow::Result<Counts> {
    let mut mesh = orders_mesh(topic_spec, subscription_spec).await?;
    let history = History::default();

    publish_orders(
        &mesh,
        &history,
        (0..300).map(|i| format!("handoff-{i}")),
        &[b'h'; 256],
    )
    .await?;

    // No app consumes: the drain cannot finish, so the backlog must move.
    let clean = mesh
        .mesh
        .terminate("producer", Duration::from_secs(15))
        .await?;
    assert!(clean, "the producer's sidecar did not exit 0 by itself");

    billing_consumer(&mesh, &history).await?;
    let c = drain_orders(&history, Duration::from_secs(60), test).await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    Ok(c)
}

/// The same for a `Replicated` topic, as when its pod is deleted: the producer hands its
/// backlog off, tells its replica that it holds those ids settled, exits, and its member
/// record is removed. The replica finds nothing left to take over (so no second copy is
/// delivered by a takeover), and consumers that start later get everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_replicated_backlog_off_and_trims_its_replica() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Replicated, replicas: 2"),
        group("billing", "billing", ""),
        group("senders", "senders", ""),
        subscription("billing-orders", "orders", "billing", "maxInFlight: 10"),
    ]
    .concat();
    let pods = [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-a", "billing"),
        pod("billing-b", "zone-b", "billing"),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    publish_orders(
        &mesh,
        &history,
        (0..200).map(|i| format!("replicated-handoff-{i}")),
        &[b'h'; 256],
    )
    .await?;

    let clean = mesh
        .mesh
        .terminate("producer", Duration::from_secs(15))
        .await?;
    assert!(clean, "the producer's sidecar did not exit 0 by itself");
    mesh.remove_member("producer")?;

    for member in ["billing-a", "billing-b"] {
        spawn_consumer(
            &mesh.app_addr(member)?,
            "default/billing-orders",
            "billing",
            member,
            &history,
            Behavior::Ack,
            Instant::now() + RUN_LIMIT,
        )
        .await?;
    }
    let c = drain_orders(
        &history,
        Duration::from_secs(60),
        "sigterm_handoff_replicated",
    )
    .await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    // In flight at the handoff: at most maxInFlight x 2 members.
    assert!(c.duplicated <= 20, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    for p in ["billing-a", "billing-b"] {
        let took = mesh.log_lines(p, "took custody of")?;
        assert!(
            took.is_empty(),
            "{p} took over copies the handoff had trimmed: {took:?}"
        );
    }
    Ok(())
}
