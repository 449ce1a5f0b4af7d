//! An app for the durability tests: publishing that returns the sidecar's answer (offset,
//! duplicate flag), and a consumer that reconnects when its sidecar restarts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_api::proto::v1::{AckLevel, PublishRequest, PublishResponse};
use ferry_sidecar_tests::history::{Delivered, History};
use ferryctl::client::{self, App, Consumer, Event};
use tokio::task::JoinHandle;

/// A publish with its attempt and ack recorded; `tweak` sets TTL, delay and the like.
pub async fn publish_with(
    app: &mut App,
    history: &History,
    topic: &str,
    id: &str,
    tweak: impl FnOnce(&mut PublishRequest),
) -> Result<PublishResponse, tonic::Status> {
    history.publish_attempt("producer", topic, id, None);
    let mut request = PublishRequest {
        topic: topic.into(),
        message_id: id.into(),
        payload: format!("payload of {id}").into_bytes().into(),
        ack_level: AckLevel::Stored.into(),
        headers: HashMap::new(),
        ..PublishRequest::default()
    };
    tweak(&mut request);
    let r = app.publish(request).await?.into_inner();
    history.publish_acked(id);
    Ok(r)
}

/// Consumes `subscription` on `addr` until `stop`, acking everything and recording every
/// delivery, reconnecting (every 100 ms) while the sidecar is down. Returns the deliveries.
pub fn reconnecting_consumer(
    addr: String,
    subscription: &'static str,
    group: &'static str,
    member: &'static str,
    history: History,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut received = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let session = async {
                let mut app = client::connect(&addr).await.ok()?;
                let consumer = Consumer::subscribe(&mut app, subscription, 16).await.ok()?;
                Some((app, consumer))
            };
            let Some((_app, mut consumer)) = session.await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                match consumer.next(Duration::from_millis(100)).await {
                    Ok(Some(Event::Delivery(d))) => {
                        received += 1;
                        history.delivered(Delivered::of(group, member, &d));
                        if consumer.ack_and_refill(&d.delivery_id).is_err() {
                            break;
                        }
                        history.consumer_acked(group, member, &d.message_id);
                    }
                    Ok(Some(Event::SettleError(_)) | None) => {}
                    Err(_) => break,
                }
            }
        }
        received
    })
}

/// Watches `history` for the first delivery of an id starting with `prefix`; the task
/// answers when it came (`None` if not within `within`).
pub fn first_delivery(
    history: &History,
    prefix: &'static str,
    within: Duration,
) -> JoinHandle<Option<tokio::time::Instant>> {
    let history = history.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if history
                .deliveries()
                .iter()
                .any(|d| d.message_id.starts_with(prefix))
            {
                return Some(tokio::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    })
}
