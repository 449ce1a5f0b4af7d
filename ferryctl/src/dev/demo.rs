//! `ferryctl dev --demo`: traffic so that a newcomer sees messages flow at once.
//!
//! A consumer app per group member acks what it gets, and the producer pod publishes one
//! message per topic every `interval`; each delivery prints which pod in which zone got
//! it, so that unicast, broadcast and same-zone preference are visible without a second
//! terminal.

use std::time::Duration;

use ferry_api::proto::v1::PublishRequest;
use ferry_api::routing::RoutingTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Consumer, Event};
use crate::mesh::Mesh;

/// Starts the demo's consumers and producer; they stop when `stop` is cancelled.
pub fn start(mesh: &Mesh, interval: Duration, stop: &CancellationToken) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let table = mesh.table.clone();
    for sub in table.subscriptions.values() {
        for member in table.ready_members(&sub.group) {
            let Some(spec) = mesh
                .specs
                .iter()
                .find(|s| s.pod.namespace == member.namespace && s.pod.name == member.pod)
            else {
                continue;
            };
            let addr = spec.endpoints.app_grpc.to_string();
            let subscription = format!("{}/{}", sub.namespace, sub.name);
            let label = format!("{} ({})", member.pod, member.zone);
            tasks.spawn(consume(addr, subscription, label, stop.clone()));
        }
    }
    let producer = mesh
        .specs
        .iter()
        .find(|s| s.pod.name == ferry_api::local::PRODUCER_POD)
        .or(mesh.specs.first());
    if let Some(producer) = producer {
        let label = format!("{} ({})", producer.pod.name, producer.pod.zone);
        tasks.spawn(publish(
            producer.endpoints.app_grpc.to_string(),
            label,
            topics_with_subscribers(&table),
            interval,
            stop.clone(),
        ));
    }
    tasks
}

/// Topics that some subscription reads (dead-letter topics only fill up on failures).
fn topics_with_subscribers(table: &RoutingTable) -> Vec<String> {
    let mut topics: Vec<String> = table
        .subscriptions
        .values()
        .map(|s| s.topic.clone())
        .filter(|t| table.topics.contains_key(t))
        .filter(|t| {
            !table
                .subscriptions
                .values()
                .any(|s| s.dead_letter_topic.as_ref() == Some(t))
        })
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

async fn consume(addr: String, subscription: String, label: String, stop: CancellationToken) {
    let result = async {
        let mut app = client::connect(&addr).await?;
        let mut consumer = Consumer::subscribe(&mut app, &subscription, 16).await?;
        while !stop.is_cancelled() {
            let event = tokio::select! {
                () = stop.cancelled() => break,
                event = consumer.next(Duration::from_secs(1)) => event?,
            };
            if let Some(Event::Delivery(d)) = event {
                println!(
                    "  {label:<22} got {:?} from {} via {} (attempt {}) -> ack",
                    String::from_utf8_lossy(&d.payload),
                    d.topic,
                    subscription,
                    d.attempt
                );
                consumer.ack_and_refill(&d.delivery_id)?;
            }
        }
        Ok::<(), client::ClientError>(())
    }
    .await;
    if let Err(e) = result {
        println!("  demo consumer {label} on {subscription} stopped: {e}");
    }
}

async fn publish(
    addr: String,
    label: String,
    topics: Vec<String>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut app = match client::connect(&addr).await {
        Ok(app) => app,
        Err(e) => {
            println!("  demo producer {label} could not connect: {e}");
            return;
        }
    };
    let mut ticker = tokio::time::interval(interval);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        n += 1;
        for topic in &topics {
            let request = PublishRequest {
                topic: topic.clone(),
                key: Some(format!("key-{}", n % 4)),
                payload: format!("demo message {n}").into_bytes().into(),
                ..PublishRequest::default()
            };
            match app.publish(request).await {
                Ok(r) => println!(
                    "{label} published demo message {n} to {topic} (offset {})",
                    r.into_inner().offset
                ),
                Err(status) => println!("{label} publish to {topic} failed: {}", status.message()),
            }
        }
    }
}
