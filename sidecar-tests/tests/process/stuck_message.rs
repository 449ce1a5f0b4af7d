//! Issue #10 item 1: one stuck message must not block a topic.
//!
//! - **Backlog**: a `Disk` topic limited to `retention.maxBytes: 1Mi`, one subscription
//!   whose app acks everything but nacks one message with a 10-minute delay. Well over
//!   1 MiB of acked messages later, every publish is still accepted (refused = 0) and every
//!   acked message is delivered: the backlog counts what is unsettled (one small record),
//!   not every byte written after the stuck one.
//! - **Window**: more than 8,192 messages published with a 10-minute delay are held by the
//!   producer's dispatcher; undelayed messages published after them are still delivered at
//!   once, and no delayed one is delivered early.
//! - **Key-scoped head-of-line**: on an ordered topic, the first message of a key is nacked
//!   for ten minutes and 8,500 more of that key wait behind it; messages of other keys
//!   published after them are still delivered, and nothing more of the stuck key is.
//!   A hot key with far more messages than the dispatcher holds per key keeps its order.
//! - **Broadcast member down**: a `Broadcast` group's second member's sidecar is killed;
//!   9,000 messages later, the live member still received every one of them (their copies
//!   for the dead member wait parked, not in the window).

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_api::proto::v1::PublishRequest;
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::History;
use ferryctl::client::App;
use tokio::time::Instant;

use super::common::{RUN_LIMIT, drain_orders, group, orders_mesh, pod, subscription, topic};
use super::durable_app::publish_with;

/// How long the stuck message (and the delayed ones) are held back.
const TEN_MINUTES_MS: u64 = 600_000;
/// Publishes in flight at once (so that group commit batches them).
const CONCURRENCY: usize = 8;

/// Publishes `ids` to `default/orders` from the `producer` pod, `CONCURRENCY` at a time,
/// each request shaped by `tweak`; returns the refused ones with their status.
async fn publish_all(
    mesh: &TestMesh,
    history: &History,
    ids: Vec<String>,
    tweak: fn(&mut PublishRequest),
) -> anyhow::Result<Vec<(String, tonic::Status)>> {
    let app: App = mesh.app("producer").await?;
    let chunk = ids.len().div_ceil(CONCURRENCY).max(1);
    let mut tasks = Vec::new();
    for part in ids.chunks(chunk) {
        let (mut app, history, part) = (app.clone(), history.clone(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut refused = Vec::new();
            for id in part {
                if let Err(status) =
                    publish_with(&mut app, &history, "default/orders", &id, tweak).await
                {
                    refused.push((id, status));
                }
            }
            refused
        }));
    }
    let mut refused = Vec::new();
    for t in tasks {
        refused.extend(t.await?);
    }
    Ok(refused)
}

fn small(r: &mut PublishRequest) {
    r.payload = vec![b'p'; 100].into();
}

fn stuck(r: &mut PublishRequest) {
    r.key = Some("stuck".into());
    r.payload = b"stuck!".to_vec().into();
}

fn poison(r: &mut PublishRequest) {
    r.key = Some("poison".into());
}

fn hot(r: &mut PublishRequest) {
    r.key = Some("hot".into());
}

fn other_key(r: &mut PublishRequest) {
    let n = r.message_id.bytes().last().unwrap_or(b'0');
    r.key = Some(format!("key-{}", char::from(n)));
}

fn delayed(r: &mut PublishRequest) {
    r.delay_ms = TEN_MINUTES_MS;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stuck_message_does_not_fill_the_backlog() -> anyhow::Result<()> {
    let mesh = orders_mesh(
        "durability: Disk, retention: {maxBytes: 1Mi}",
        "ackWait: 30s",
    )
    .await?;
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::NackKey("stuck", TEN_MINUTES_MS),
        Instant::now() + RUN_LIMIT,
    )
    .await?;

    // The stuck message first, nacked for ten minutes before the rest is published.
    let refused_stuck = publish_all(&mesh, &history, vec!["stuck".into()], stuck).await?;
    assert!(refused_stuck.is_empty(), "{refused_stuck:?}");
    wait_for(
        Duration::from_secs(30),
        "the stuck message delivered",
        || {
            history
                .deliveries_to("billing")
                .iter()
                .any(|d| d.message_id == "stuck")
        },
    )
    .await?;

    // ~12,000 records of ~190 bytes: over 2 MiB, twice the limit.
    let ids: Vec<String> = (0..12_000).map(|i| format!("after-stuck-{i:05}")).collect();
    let refused = publish_all(&mesh, &history, ids, small).await?;
    let first = refused
        .first()
        .map(|(id, s)| format!("{id}: {:?} {}", s.code(), s.message()));
    let c = drain_orders(&history, Duration::from_secs(120), "stuck_message").await;
    let c = c.unwrap_or_else(|e| {
        println!("stuck_message: {e}");
        history.check(&[ferry_sidecar_tests::history::Expect::AnyMember {
            group: "billing".into(),
            topic: "default/orders".into(),
            check_order: false,
        }])
    });
    println!(
        "stuck_message: acked={} delivered={} lost={} duplicated={} refused={} (first refusal: {first:?})",
        c.acked,
        c.deliveries,
        c.lost,
        c.duplicated,
        refused.len()
    );
    assert_eq!(refused.len(), 0, "publishes refused: first {first:?}");
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert_eq!(c.acked, 12_001, "{c}");
    consumer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_messages_do_not_hold_up_later_ones() -> anyhow::Result<()> {
    const DELAYED: usize = 8_500;
    const PROMPT: usize = 200;
    let mesh = orders_mesh("durability: Disk", "ackWait: 30s").await?;
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;

    let delayed_ids: Vec<String> = (0..DELAYED).map(|i| format!("delayed-{i:05}")).collect();
    let mut refused = publish_all(&mesh, &history, delayed_ids, delayed).await?;
    let prompt_ids: Vec<String> = (0..PROMPT).map(|i| format!("prompt-{i:05}")).collect();
    refused.extend(publish_all(&mesh, &history, prompt_ids.clone(), small).await?);

    let wanted: BTreeSet<String> = prompt_ids.into_iter().collect();
    let delivered_prompt = || {
        history
            .deliveries_to("billing")
            .into_iter()
            .filter(|d| wanted.contains(&d.message_id))
            .map(|d| d.message_id)
            .collect::<BTreeSet<_>>()
    };
    let waited = wait_for(
        Duration::from_secs(60),
        "every undelayed message delivered",
        || delivered_prompt().len() == wanted.len(),
    )
    .await;
    let deliveries = history.deliveries_to("billing");
    let early = deliveries
        .iter()
        .filter(|d| d.message_id.starts_with("delayed-"))
        .count();
    let got = delivered_prompt();
    let duplicated = deliveries
        .iter()
        .filter(|d| wanted.contains(&d.message_id))
        .count()
        - got.len();
    println!(
        "stuck_message window: acked={} delivered={} lost={} duplicated={duplicated} refused={} (delayed delivered early: {early})",
        history.acked_ids().len(),
        deliveries.len(),
        wanted.len() - got.len(),
        refused.len()
    );
    let parked =
        super::common::topic_metric(&mesh, "producer", "parked_messages", "default/orders").await?;
    println!("stuck_message window: ferry_sidecar_parked_messages = {parked}");
    assert!(refused.is_empty(), "refused: {:?}", refused.first());
    waited?;
    assert_eq!(early, 0, "delayed messages delivered before their delay");
    assert_eq!(parked, DELAYED as f64, "every delayed message parked");
    consumer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_key_holds_up_only_itself() -> anyhow::Result<()> {
    const STUCK: usize = 8_500;
    const OTHERS: usize = 200;
    let mesh = orders_mesh("durability: Disk, ordering: Key", "ackWait: 30s").await?;
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::NackKey("poison", TEN_MINUTES_MS),
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    let head = publish_all(&mesh, &history, vec!["poison-head".into()], poison).await?;
    wait_for(Duration::from_secs(30), "the poison head delivered", || {
        !history.deliveries_to("billing").is_empty()
    })
    .await?;
    let stuck_ids: Vec<String> = (0..STUCK).map(|i| format!("poison-{i:05}")).collect();
    let mut refused = head;
    refused.extend(publish_all(&mesh, &history, stuck_ids, poison).await?);
    let other_ids: Vec<String> = (0..OTHERS).map(|i| format!("other-{i:05}")).collect();
    refused.extend(publish_all(&mesh, &history, other_ids.clone(), other_key).await?);

    let wanted: BTreeSet<String> = other_ids.into_iter().collect();
    let delivered_others = || {
        history
            .deliveries_to("billing")
            .into_iter()
            .filter(|d| wanted.contains(&d.message_id))
            .map(|d| d.message_id)
            .collect::<BTreeSet<_>>()
    };
    let waited = wait_for(
        Duration::from_secs(60),
        "every message of the other keys delivered",
        || delivered_others().len() == wanted.len(),
    )
    .await;
    let deliveries = history.deliveries_to("billing");
    let poison_delivered = deliveries
        .iter()
        .filter(|d| d.message_id.starts_with("poison"))
        .count();
    let got = delivered_others();
    let duplicated = deliveries
        .iter()
        .filter(|d| wanted.contains(&d.message_id))
        .count()
        - got.len();
    println!(
        "stuck_message key: acked={} delivered={} lost={} duplicated={duplicated} refused={} (of the stuck key delivered: {poison_delivered})",
        history.acked_ids().len(),
        deliveries.len(),
        wanted.len() - got.len(),
        refused.len()
    );
    assert!(refused.is_empty(), "refused: {:?}", refused.first());
    waited?;
    assert_eq!(
        poison_delivered, 1,
        "only the stuck key's head is delivered"
    );
    consumer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_parked_in_part_keeps_its_order() -> anyhow::Result<()> {
    let mesh = orders_mesh("durability: Disk, ordering: Key", "ackWait: 30s").await?;
    let history = History::default();
    // Published one after the other before anyone consumes: the dispatcher holds a few
    // dozen of the key and parks the rest.
    let mut app: App = mesh.app("producer").await?;
    for i in 0..1_000 {
        let id = format!("hot-{i:05}");
        history.publish_attempt("producer", "default/orders", &id, Some("hot"));
        let mut r = PublishRequest {
            topic: "default/orders".into(),
            message_id: id.clone(),
            payload: b"in order".to_vec().into(),
            ack_level: ferry_api::proto::v1::AckLevel::Stored.into(),
            ..PublishRequest::default()
        };
        hot(&mut r);
        app.publish(r).await?;
        history.publish_acked(&id);
    }
    let consumer = spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    let expect = [ferry_sidecar_tests::history::Expect::AnyMember {
        group: "billing".into(),
        topic: "default/orders".into(),
        check_order: true,
    }];
    let c = super::common::drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "stuck_message hot",
    )
    .await?;
    println!(
        "stuck_message hot: acked={} delivered={} lost={} duplicated={} refused=0 reordered={}",
        c.acked, c.deliveries, c.lost, c.duplicated, c.reordered
    );
    assert_eq!((c.lost, c.reordered, c.unexpected), (0, 0, 0), "{c}");
    consumer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_broadcast_member_does_not_hold_up_the_live_one() -> anyhow::Result<()> {
    const MESSAGES: usize = 9_000;
    let crs = [
        topic("orders", "durability: Disk"),
        group("audit", "audit", "delivery: Broadcast"),
        subscription("audit-orders", "orders", "audit", "ackWait: 30s"),
    ]
    .concat();
    let pods = [
        pod("audit-a", "zone-a", "audit"),
        pod("audit-b", "zone-a", "audit"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    mesh.mesh.kill9("audit-b").await?;
    let consumer = spawn_consumer(
        &mesh.app_addr("audit-a")?,
        "default/audit-orders",
        "audit",
        "audit-a",
        &history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("audit-{i:05}")).collect();
    let refused = publish_all(&mesh, &history, ids.clone(), small).await?;
    let wanted: BTreeSet<String> = ids.into_iter().collect();
    let delivered = || {
        history
            .deliveries_to("audit")
            .into_iter()
            .map(|d| d.message_id)
            .filter(|id| wanted.contains(id))
            .collect::<BTreeSet<_>>()
    };
    let waited = wait_for(
        Duration::from_secs(90),
        "every message delivered to the live member",
        || delivered().len() == wanted.len(),
    )
    .await;
    let deliveries = history.deliveries_to("audit").len();
    let got = delivered().len();
    println!(
        "stuck_message broadcast: acked={} delivered={deliveries} lost={} duplicated={} refused={}",
        history.acked_ids().len(),
        wanted.len() - got,
        deliveries - got,
        refused.len()
    );
    assert!(refused.is_empty(), "refused: {:?}", refused.first());
    waited?;
    consumer.abort();
    Ok(())
}
