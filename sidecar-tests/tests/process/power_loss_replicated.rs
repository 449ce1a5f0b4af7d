//! docs/reliability.md row 4 for `durability: Replicated` (`replicas: 2`), the README's
//! "power loss of its node: nothing lost": the producer's node, which also runs a member of
//! the consuming group (`billing-a`), loses power while the apps consume. Both sidecars are
//! `kill -9`ed and restarted with `FERRY_SIMULATE_POWER_LOSS=1` (feature `powerloss`), which
//! first cuts every log file back to its last fsynced length. The replica on the other node
//! (`billing-b`) is untouched. Nothing acked is lost; the duplicates are redeliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{TestMesh, publish};
use ferry_sidecar_tests::history::{Expect, History};

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::reconnecting_consumer;

const TOPIC: &str = "default/orders";
const MAX_IN_FLIGHT: u64 = 10;
/// Members of the consuming group.
const MEMBERS: u64 = 2;
/// The pods on the node that loses power.
const NODE: [&str; 2] = ["producer", "billing-a"];

async fn publish_range(
    mesh: &TestMesh,
    history: &History,
    ids: impl Iterator<Item = String>,
) -> anyhow::Result<()> {
    let mut app = mesh.app("producer").await?;
    for id in ids {
        publish(
            &mut app,
            history,
            "producer",
            TOPIC,
            &id,
            None,
            vec![b'r'; 256],
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_power_loss_of_the_producer_node_loses_nothing() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Replicated, replicas: 2"),
        group("billing", "billing", ""),
        group("senders", "senders", ""),
        subscription(
            "billing-orders",
            "orders",
            "billing",
            &format!("maxInFlight: {MAX_IN_FLIGHT}, ackWait: 5s"),
        ),
    ]
    .concat();
    // The producer and billing-a share zone-a's node; billing-b (zone-b) is the replica.
    let pods = [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-a", "billing"),
        pod("billing-b", "zone-b", "billing"),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumers = [("billing-a", "billing-a"), ("billing-b", "billing-b")].map(|(p, m)| {
        reconnecting_consumer(
            mesh.app_addr(p).unwrap_or_default(),
            "default/billing-orders",
            "billing",
            m,
            history.clone(),
            stop.clone(),
        )
    });

    // Publishes acked (fsynced here and on billing-b) while both apps consume.
    publish_range(&mesh, &history, (0..150).map(|i| format!("before-{i}"))).await?;
    let delivered_before = history.deliveries().len();
    for p in NODE {
        mesh.mesh.kill9(p).await?;
    }
    println!(
        "replicated_power_loss: node of {NODE:?} lost power after 150 acked publishes, {delivered_before} delivered"
    );
    let env = [("FERRY_SIMULATE_POWER_LOSS".to_owned(), "1".to_owned())];
    for p in NODE {
        let restarted = mesh.mesh.restart_with_env(p, &env).await?;
        let said = restarted
            .output
            .lines()
            .into_iter()
            .find(|l| l.contains("simulated power loss: dropped"))
            .unwrap_or_default();
        println!("replicated_power_loss: {p} said at startup: {said}");
        assert!(!said.is_empty(), "{p} did not simulate the power loss");
    }
    publish_range(&mesh, &history, (0..50).map(|i| format!("after-{i}"))).await?;

    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: TOPIC.into(),
        check_order: false,
    }];
    let c = drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "replicated_power_loss",
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    // One fault event on two sidecars: the producer forgets settlements it had not
    // fsynced, billing-a forgets what its app acked. Each duplicate is a redelivery.
    assert!(c.duplicated <= MAX_IN_FLIGHT * MEMBERS, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}
