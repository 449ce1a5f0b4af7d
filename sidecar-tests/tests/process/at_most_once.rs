//! `qos: AtMostOnce`, the README's "never; a message whose delivery fails is dropped
//! (counted)": an app that nacks every delivery gets each message exactly once (attempt 1),
//! the producer settles them all (nothing unsettled is left that could be sent again), and
//! its `dropped` counter counts the nacked ones. An `AtLeastOnce` subscription of the same
//! topic, whose app acks, gets every message: the drop is per subscription.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{
    RUN_LIMIT, drain, group, pod, publish_orders, subscription, topic, topic_metric, wait_settled,
};

const MESSAGES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_nacked_messages_are_dropped_not_redelivered() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Disk"),
        group("billing", "billing", ""),
        group("audit", "audit", ""),
        subscription(
            "billing-orders",
            "orders",
            "billing",
            "qos: AtMostOnce, ackWait: 2s, backoff: {initial: 100ms, max: 200ms, multiplier: 2}",
        ),
        subscription("audit-orders", "orders", "audit", ""),
    ]
    .concat();
    let pods = [
        pod("billing-a", "zone-a", "billing"),
        pod("audit-a", "zone-a", "audit"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::Nack(0),
        stop_at,
    )
    .await?;
    spawn_consumer(
        &mesh.app_addr("audit-a")?,
        "default/audit-orders",
        "audit",
        "audit-a",
        &history,
        Behavior::Ack,
        stop_at,
    )
    .await?;

    publish_orders(
        &mesh,
        &history,
        (0..MESSAGES).map(|i| format!("at-most-once-{i}")),
        b"fire and forget",
    )
    .await?;
    let expect = |group: &str| {
        [Expect::AnyMember {
            group: group.into(),
            topic: "default/orders".into(),
            check_order: false,
        }]
    };
    // Both subscriptions settled at the producer: nothing is left to send again.
    drain(
        &history,
        &expect("billing"),
        Duration::from_secs(60),
        "at_most_once",
    )
    .await?;
    wait_settled(&mesh, "producer", "default/orders", Duration::from_secs(60)).await?;
    let audit = drain(
        &history,
        &expect("audit"),
        Duration::from_secs(10),
        "at_most_once (AtLeastOnce beside it)",
    )
    .await?;
    let billing = history.check(&expect("billing"));
    let dropped = |sub: &'static str| {
        let mesh = &mesh;
        async move {
            let admin = mesh.mesh.endpoints("producer")?.admin;
            let samples = ferryctl::metrics::scrape(admin).await?;
            anyhow::Ok(
                samples
                    .iter()
                    .filter(|s| s.name.contains("dropped") && !s.name.ends_with("_created"))
                    .filter(|s| {
                        s.labels
                            .get("subscription")
                            .is_some_and(|l| l.ends_with(sub))
                    })
                    .map(|s| s.value)
                    .sum::<f64>(),
            )
        }
    };
    let dropped_billing = dropped("billing-orders").await?;
    let dropped_total = topic_metric(&mesh, "producer", "dropped", "default/orders").await?;
    println!(
        "at_most_once: history {billing}; dropped counted {dropped_billing} (topic {dropped_total})"
    );
    assert_eq!((billing.lost, billing.unexpected), (0, 0), "{billing}");
    assert_eq!(
        history.deliveries_to("billing").len(),
        MESSAGES,
        "one delivery per message: {billing}"
    );
    assert_eq!(billing.duplicated, 0, "AtMostOnce redelivered: {billing}");
    assert!(
        history
            .deliveries_to("billing")
            .iter()
            .all(|d| d.attempt == 1),
        "AtMostOnce sent a second attempt"
    );
    assert_eq!(
        (audit.lost, audit.duplicated, audit.unexpected),
        (0, 0, 0),
        "{audit}"
    );
    assert_eq!(
        dropped_billing, MESSAGES as f64,
        "every nacked AtMostOnce message is counted as dropped"
    );
    Ok(())
}
