//! Message identity (docs/reliability.md, the "Correctness holes" list, item 2): a
//! `Memory` topic numbers its messages from 0 again after its producer's sidecar restarts,
//! so new messages take offsets that the consumer's sidecar remembers as acked. A consumer
//! whose app acks late (past `ackWait`, so that the producer asks `QueryDelivery` before
//! redelivering) must still get every new message: a question about a delivery names the
//! message, and an ack of the message that held an offset before never settles the one
//! that holds it now.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_api::proto::v1::{AckRequest, Delivery};
use ferry_sidecar_tests::harness::{TestMesh, publish};
use ferry_sidecar_tests::history::{Delivered, Expect, History};
use ferryctl::client::{self, Consumer, Event};
use ferryctl::http;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::common::{drain, orders_mesh};
use super::late_ack::counter;

/// The subscription's `ackWait`; the app acks first deliveries this much plus
/// [`LATE_BY`] after it got them.
const ACK_WAIT: Duration = Duration::from_secs(2);
const LATE_BY: Duration = Duration::from_millis(500);
/// Messages published before the restart, and as many after it.
const MESSAGES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_messages_at_reused_offsets_are_all_delivered() -> anyhow::Result<()> {
    let test = "reused_offsets";
    let mut mesh = orders_mesh(
        "durability: Memory",
        "ackWait: 2s, maxDeliveries: 10, backoff: {initial: 100ms, max: 500ms, multiplier: 2}",
    )
    .await?;
    let history = History::default();
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let app = late_acker(
        mesh.app_addr("billing-a")?,
        history.clone(),
        refused.clone(),
        stop.clone(),
    )
    .await?;
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: "default/orders".into(),
        check_order: false,
    }];

    // Offsets 0..MESSAGES: each acked by the app (its redelivery), and remembered so by
    // the consumer's sidecar.
    publish_all(&mesh, &history, "before").await?;
    let before = drain(&history, &expect, Duration::from_secs(60), test).await?;
    anyhow::ensure!(before.lost == 0, "{before}");
    let admin = mesh.mesh.endpoints("producer")?.admin;
    let acked = || async {
        let page = http::get(admin, "/metrics").await?;
        anyhow::Ok(counter(
            &page.text(),
            "ferry_sidecar_acked_total",
            "billing-orders",
        ))
    };
    let started = Instant::now();
    while acked().await? < MESSAGES as f64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the producer never counted every ack"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The producer's sidecar restarts with nothing held: the same offsets again.
    mesh.mesh.restart("producer").await?;
    println!("{test}: producer sidecar restarted");
    publish_all(&mesh, &history, "after").await?;
    let counts = drain(&history, &expect, Duration::from_secs(60), test).await;
    stop.store(true, Ordering::Relaxed);
    app.await??;
    let refused = refused.load(Ordering::Relaxed);
    let page = http::get(admin, "/metrics").await?.text();
    let mismatched = counter(
        &page,
        "ferry_sidecar_settlements_mismatched_total",
        "billing-orders",
    );
    println!(
        "{test}: refused={refused} (late acks), {mismatched} settlements of another message ignored by the producer"
    );
    let counts = counts?;
    assert_eq!(counts.lost, 0, "{counts}");
    assert_eq!(counts.unexpected, 0, "{counts}");
    assert!(refused > 0, "the app's first acks came late: {refused}");
    Ok(())
}

/// Publishes `MESSAGES` messages `<prefix>-<n>` to `default/orders` from `producer`.
async fn publish_all(mesh: &TestMesh, history: &History, prefix: &str) -> anyhow::Result<()> {
    let mut app = mesh.app("producer").await?;
    for n in 0..MESSAGES {
        publish(
            &mut app,
            history,
            "producer",
            "default/orders",
            &format!("{prefix}-{n}"),
            None,
            b"order".to_vec(),
        )
        .await?;
    }
    Ok(())
}

/// The `billing-a` app: it acks a first delivery [`LATE_BY`] past `ackWait` (its sidecar
/// refuses that ack, the delivery having expired), a redelivery at once, until `stop`
/// (then it still sends the late acks not yet due, each when due). Only a delivery
/// whose ack was accepted is recorded as delivered: that is a message the app processed.
/// Refused acks are counted in `refused`.
async fn late_acker(
    addr: String,
    history: History,
    refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let mut app = client::connect(&addr).await?;
    let mut consumer = Consumer::subscribe(&mut app, "default/billing-orders", 64).await?;
    Ok(tokio::spawn(async move {
        let mut late: Vec<(Instant, Delivery)> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(Event::Delivery(d)) = consumer.next(Duration::from_millis(20)).await? {
                consumer.credit(1)?;
                if d.attempt <= 1 {
                    late.push((Instant::now() + ACK_WAIT + LATE_BY, d));
                    continue;
                }
                settle(&mut app, &history, &refused, d).await?;
            }
            let now = Instant::now();
            let (due, keep): (Vec<_>, Vec<_>) = late.into_iter().partition(|(at, _)| *at <= now);
            late = keep;
            for (_, d) in due {
                settle(&mut app, &history, &refused, d).await?;
            }
        }
        // The late acks still due are sent when due, so that every one is counted.
        for (at, d) in late {
            tokio::time::sleep_until(at).await;
            settle(&mut app, &history, &refused, d).await?;
        }
        Ok(())
    }))
}

/// Acks `d` with a unary call; records it delivered if the sidecar took the ack.
async fn settle(
    app: &mut client::App,
    history: &History,
    refused: &AtomicU64,
    d: Delivery,
) -> anyhow::Result<()> {
    let ack = AckRequest {
        delivery_id: d.delivery_id.clone(),
    };
    match app.ack(ack).await {
        Ok(_) => {
            history.delivered(Delivered::of("billing", "billing-a", &d));
            history.consumer_acked("billing", "billing-a", &d.message_id);
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            refused.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => anyhow::bail!("ack of {} failed: {status}", d.message_id),
    }
    Ok(())
}
