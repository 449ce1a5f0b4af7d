//! A nack with a delay (`Nack { delay_ms > 0 }`), the README's `AtLeastOnce` redelivery
//! "after a nack": the app nacks the first delivery of each message asking for 3 s, and
//! acks the redelivery. Each message comes back once, as attempt 2, and not at the
//! subscription's backoff (100 ms here) but no earlier than half the delay after the
//! nack: a lower bound, which a slow machine cannot break (only a delay that is ignored
//! can). Then nothing is lost and nothing more is delivered.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_sidecar_tests::harness::wait_for;
use ferry_sidecar_tests::history::{Delivered, History};
use ferryctl::client::{self, Consumer, Event};
use tokio::time::Instant;

use super::common::{drain_orders, orders_mesh, publish_orders, wait_settled};

const DELAY: Duration = Duration::from_secs(3);
const MESSAGES: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_redelivers_after_the_delay() -> anyhow::Result<()> {
    let mesh = orders_mesh(
        "durability: Disk",
        "ackWait: 30s, backoff: {initial: 100ms, max: 200ms, multiplier: 2}",
    )
    .await?;
    let history = History::default();

    // The app: nack attempt 1 with DELAY, ack the rest; when each happened, by message id.
    let mut app = client::connect(&mesh.app_addr("billing-a")?).await?;
    let mut consumer = Consumer::subscribe(&mut app, "default/billing-orders", 16).await?;
    let app_history = history.clone();
    let (nacked_tx, mut nacked_rx) = tokio::sync::mpsc::unbounded_channel();
    let app_task = tokio::spawn(async move {
        let stop_at = Instant::now() + Duration::from_secs(60);
        while Instant::now() < stop_at {
            let Some(Event::Delivery(d)) = consumer.next(Duration::from_millis(100)).await? else {
                continue;
            };
            app_history.delivered(Delivered::of("billing", "billing-a", &d));
            let now = Instant::now();
            if d.attempt == 1 {
                let delay_ms = u64::try_from(DELAY.as_millis())?;
                consumer.nack(&d.delivery_id, delay_ms)?;
                consumer.credit(1)?;
            } else {
                consumer.ack_and_refill(&d.delivery_id)?;
                app_history.consumer_acked("billing", "billing-a", &d.message_id);
            }
            let _ = nacked_tx.send((d.message_id.clone(), d.attempt, now));
        }
        anyhow::Ok(())
    });

    publish_orders(
        &mesh,
        &history,
        (0..MESSAGES).map(|i| format!("nack-delay-{i}")),
        b"later, please",
    )
    .await?;
    // Every message seen twice, and then nothing unsettled at the producer: no third
    // delivery can come.
    wait_for(Duration::from_secs(30), "every message redelivered", || {
        history.repeats_to("billing").len() >= MESSAGES
    })
    .await?;
    wait_settled(&mesh, "producer", "default/orders", Duration::from_secs(30)).await?;
    let c = drain_orders(&history, Duration::from_secs(10), "nack_with_delay").await?;
    let mut seen: BTreeMap<String, Vec<(u32, Instant)>> = BTreeMap::new();
    while let Ok((id, attempt, at)) = nacked_rx.try_recv() {
        seen.entry(id).or_default().push((attempt, at));
    }
    for (id, times) in &seen {
        let gaps: Vec<_> = times
            .windows(2)
            .map(|w| (w[1].0, w[1].1.duration_since(w[0].1)))
            .collect();
        println!("{id}: redeliveries (attempt, after) {gaps:?}");
    }
    assert_eq!(seen.len(), MESSAGES, "{seen:?}");
    for (id, times) in &seen {
        let attempts: Vec<u32> = times.iter().map(|(a, _)| *a).collect();
        assert_eq!(attempts, [1, 2], "{id}: one nack, one redelivery");
        let gap = times[1].1.duration_since(times[0].1);
        assert!(
            gap >= DELAY / 2,
            "{id} redelivered {gap:?} after a nack asking for {DELAY:?}"
        );
    }
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert_eq!(c.duplicated, MESSAGES as u64, "one redelivery each: {c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    app_task.abort();
    Ok(())
}
