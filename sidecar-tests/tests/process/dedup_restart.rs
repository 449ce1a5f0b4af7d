//! Issue #6 item 2, producer side: the dedup window survives `kill -9` of the producer's
//! sidecar. Ids published (and delivered and acked) before the kill are answered as
//! duplicates, with their first offset, when published again after the restart, and the
//! consumer gets each message once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::wait_for;
use ferry_sidecar_tests::history::{Expect, History};

use super::common::{drain, orders_mesh};
use super::durable_app::{publish_with, reconnecting_consumer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedup_window_survives_producer_kill9() -> anyhow::Result<()> {
    let mut mesh = orders_mesh("durability: Disk, dedupWindow: 2m", "ackWait: 5s").await?;
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = reconnecting_consumer(
        mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        history.clone(),
        stop.clone(),
    );
    let topic = "default/orders";
    let mut app = mesh.app("producer").await?;
    let mut first = Vec::new();
    for i in 0..30 {
        let r = publish_with(&mut app, &history, topic, &format!("order-{i}"), |_| {}).await?;
        assert!(!r.duplicate, "order-{i} was new");
        first.push(r.offset);
    }
    // The first 20 are delivered and acked (settled) before the kill; the last 10 may be
    // anywhere between stored and acked.
    wait_for(
        Duration::from_secs(30),
        "20 deliveries before the kill",
        || history.deliveries().len() >= 20,
    )
    .await?;
    mesh.mesh.kill9("producer").await?;
    println!("dedup_restart: SIGKILL of the producer after 30 publishes");
    let restarted = mesh.mesh.restart("producer").await?;
    let restored = restarted
        .output
        .lines()
        .iter()
        .any(|l| l.contains("dedup window restored"));
    assert!(restored, "the restart logs the restored dedup window");
    let mut app = mesh.app("producer").await?;
    for (i, offset) in first.iter().enumerate() {
        let r = publish_with(&mut app, &history, topic, &format!("order-{i}"), |_| {}).await?;
        assert!(
            r.duplicate,
            "order-{i} is a duplicate after the restart: {r:?}"
        );
        assert_eq!(r.offset, *offset, "order-{i} answers its first offset");
    }
    // A new id after the restart is stored, and works as a barrier: once it is delivered,
    // anything stored before it had its chance to be delivered too.
    let r = publish_with(&mut app, &history, topic, "after-restart", |_| {}).await?;
    assert!(!r.duplicate);
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: topic.into(),
        check_order: false,
    }];
    let c = drain(&history, &expect, Duration::from_secs(60), "dedup_restart").await?;
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.await;
    // Messages in flight at the kill may be redelivered by the restarted producer (each
    // an explained redelivery); the republished ids add nothing.
    assert_eq!(
        (c.lost, c.unexpected, c.unexplained_duplicates),
        (0, 0, 0),
        "{c}"
    );
    assert!(c.duplicated <= 10, "{c}");
    Ok(())
}
