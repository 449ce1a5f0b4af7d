//! The README's `ExactlyOnce` promise after a takeover: a `Replicated` topic's producer node
//! is lost (sidecar `kill -9`ed, data deleted, member record removed) while the one member
//! of an `ExactlyOnce` subscription works through a backlog. The replica (`spare`, on another node) takes
//! custody and sends that member every message it holds, including those the app already
//! acked or still holds from the old producer; the consuming sidecar answers or links them
//! by message id, so the app gets each message once. Nothing acked is lost.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, drain, group, pod, subscription, topic, wait_settled};

const TOPIC: &str = "default/orders";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_after_a_takeover_no_duplicate() -> anyhow::Result<()> {
    let crs = [
        topic(
            "orders",
            "durability: Replicated, replicas: 2, dedupWindow: 5m",
        ),
        group("billing", "billing", ""),
        group("senders", "senders", ""),
        group("spares", "spares", ""),
        subscription(
            "billing-orders",
            "orders",
            "billing",
            "maxInFlight: 10, qos: ExactlyOnce, ackWait: 5s",
        ),
    ]
    .concat();
    // billing-a shares the producer's node; the replica is `spare`, on zone-b's node.
    let pods = [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-a", "billing"),
        pod("spare", "zone-b", "spares"),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    // A backlog first, then the app starts: at the loss, some messages are acked, some
    // held by billing-a's sidecar or app, most not delivered yet.
    let mut app = mesh.app("producer").await?;
    for i in 0..200 {
        let id = format!("takeover-{i}");
        publish(
            &mut app,
            &history,
            "producer",
            TOPIC,
            &id,
            None,
            vec![b't'; 256],
        )
        .await?;
    }
    spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    wait_for(Duration::from_secs(30), "20 messages delivered", || {
        history.deliveries().len() >= 20
    })
    .await?;
    let delivered = history.deliveries().len();
    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    std::fs::remove_dir_all(&data)?;
    mesh.remove_member("producer")?;
    println!("exactly_once_takeover: producer node lost after 200 acked, {delivered} delivered");
    wait_for(Duration::from_secs(30), "the replica took custody", || {
        mesh.log_lines("spare", "took custody of")
            .is_ok_and(|l| !l.is_empty())
    })
    .await?;
    let took = mesh.log_lines("spare", "took custody of")?;
    println!("exactly_once_takeover: spare said {took:?}");

    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: TOPIC.into(),
        check_order: false,
    }];
    // Every message delivered, and the replica has settled all it took over: no late
    // copy is still on its way.
    drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "exactly_once_takeover (delivered)",
    )
    .await?;
    wait_settled(&mesh, "spare", TOPIC, Duration::from_secs(60)).await?;
    let c = drain(
        &history,
        &expect,
        Duration::from_secs(10),
        "exactly_once_takeover",
    )
    .await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert_eq!(c.duplicated, 0, "ExactlyOnce after a takeover: {c}");
    Ok(())
}
