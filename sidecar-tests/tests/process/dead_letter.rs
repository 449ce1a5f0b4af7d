//! docs/reliability.md row 3 (poison part): an app that always nacks; the message goes to the
//! dead-letter topic after exactly `maxDeliveries` deliveries, with the reason and the
//! attempt history in its headers.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::History;
use tokio::time::Instant;

use super::common::{RUN_LIMIT, group, pod, subscription, topic};

const MAX_DELIVERIES: u32 = 3;

/// A topic `name` whose subscription `name` (group `name`, one member `<name>-a`, whose app
/// always nacks) dead-letters to `<name>-dlq`, read by group `ops` (member `ops-a`, which
/// acks); one producer pod. `topic_spec` and `sub_spec` add fields. Publishes one message
/// `id` and waits until its dead letter reaches `ops`.
async fn poison_until_dead_lettered(
    name: &str,
    topic_spec: &str,
    sub_spec: &str,
    id: &str,
) -> anyhow::Result<History> {
    let dlq = format!("{name}-dlq");
    let crs = [
        topic(name, &format!("durability: Disk{topic_spec}")),
        topic(&dlq, "durability: Disk"),
        group(name, name, ""),
        group("ops", "ops", ""),
        subscription(
            name,
            name,
            name,
            &format!("deadLetterTopic: {dlq}, {sub_spec}"),
        ),
        subscription(&dlq, &dlq, "ops", ""),
    ]
    .concat();
    let member = format!("{name}-a");
    let pods = [
        pod(&member, "zone-a", name),
        pod("ops-a", "zone-a", "ops"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let poison = spawn_consumer(
        &mesh.app_addr(&member)?,
        &format!("default/{name}"),
        name,
        &member,
        &history,
        Behavior::Nack(0),
        stop_at,
    )
    .await?;
    let ops = spawn_consumer(
        &mesh.app_addr("ops-a")?,
        &format!("default/{dlq}"),
        "ops",
        "ops-a",
        &history,
        Behavior::Ack,
        stop_at,
    )
    .await?;
    let mut app = mesh.app("producer").await?;
    let topic = format!("default/{name}");
    publish(
        &mut app,
        &history,
        "producer",
        &topic,
        id,
        None,
        b"poison".to_vec(),
    )
    .await?;
    wait_for(
        Duration::from_secs(30),
        "the message reaches the DLQ",
        || !history.deliveries_to("ops").is_empty(),
    )
    .await?;
    poison.abort();
    ops.abort();
    Ok(history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacked_poison_message_goes_to_dlq_after_max_deliveries() -> anyhow::Result<()> {
    let history = poison_until_dead_lettered(
        "payments",
        "",
        &format!(
            "maxDeliveries: {MAX_DELIVERIES}, backoff: {{initial: 50ms, max: 200ms, multiplier: 2}}"
        ),
        "pay-42",
    )
    .await?;
    let attempts: Vec<u32> = history
        .deliveries_to("payments")
        .iter()
        .map(|d| d.attempt)
        .collect();
    let dead = history.deliveries_to("ops");
    println!("dead_letter: history {}", history.check(&[]));
    println!(
        "dead_letter: attempts {attempts:?}; dead letter headers {:?}",
        dead[0].headers
    );
    assert_eq!(
        attempts,
        (1..=MAX_DELIVERIES).collect::<Vec<_>>(),
        "exactly maxDeliveries deliveries, numbered"
    );
    assert_eq!(dead.len(), 1);
    // The dead letter is a new message (its own id) on the DLQ topic, so the history counts
    // it as unexpected; its headers name the original.
    let headers = &dead[0].headers;
    let header = |name: &str| headers.get(name).map(String::as_str).unwrap_or_default();
    assert_eq!(header("ferry-dlq-message-id"), "pay-42", "{headers:?}");
    assert_eq!(
        header("ferry-dlq-source-topic"),
        "default/payments",
        "{headers:?}"
    );
    assert!(
        header("ferry-dlq-reason").contains("maxDeliveries (3)"),
        "a reason header: {headers:?}"
    );
    let history_header = header("ferry-dlq-attempts");
    assert_eq!(
        history_header.split(';').count(),
        MAX_DELIVERIES as usize,
        "one entry per attempt: {headers:?}"
    );
    assert!(history_header.contains("nacked"), "{headers:?}");
    Ok(())
}

/// `retention.maxAge`: a message still undelivered past the topic's maximum age stops being
/// redelivered and goes to the dead-letter topic with that reason, long before
/// `maxDeliveries`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_older_than_max_age_goes_to_dlq() -> anyhow::Result<()> {
    let history = poison_until_dead_lettered(
        "quotes",
        ", retention: {maxAge: 1s}",
        "maxDeliveries: 1000, backoff: {initial: 100ms, max: 100ms, multiplier: 1}",
        "quote-7",
    )
    .await?;
    let attempts = history.deliveries_to("quotes").len();
    let dead = history.deliveries_to("ops");
    println!(
        "max_age: {attempts} deliveries before the DLQ; headers {:?}",
        dead[0].headers
    );
    let reason = dead[0]
        .headers
        .get("ferry-dlq-reason")
        .cloned()
        .unwrap_or_default();
    assert!(reason.contains("retention.maxAge"), "reason: {reason:?}");
    assert_eq!(
        dead[0]
            .headers
            .get("ferry-dlq-message-id")
            .map(String::as_str),
        Some("quote-7")
    );
    assert!((1..1000).contains(&attempts), "{attempts} deliveries");
    Ok(())
}
