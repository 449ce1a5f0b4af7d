//! One bench scenario: publish N messages one way, consume them all, time everything.
//!
//! Latency is publish-to-deliver as the app sees it: each message carries, in a header, the
//! time it was meant to be sent (microseconds on this process's monotonic clock; producer
//! and consumer are both this process), and the consumer subtracts that from its own clock
//! on arrival. The fixed-rate mode stamps the scheduled time, not the actual send, so that a
//! stall shows as latency instead of being hidden (coordinated omission).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_api::proto::v1::publish_result::Result as OneResult;
use ferry_api::proto::v1::{AckLevel, PublishBatch, PublishRequest};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::pace::{self, micros};
use super::stats::Latencies;
use ferry_api::proto::v1::app_client::AppClient;
use tonic::transport::Endpoint;

use crate::client::{App, ClientError, Consumer, Event};

/// Header carrying the scenario id, so leftovers of an earlier scenario are not counted.
const RUN_HEADER: &str = "bench-run";
/// Header carrying the send time, in microseconds since the bench's clock started.
const TIME_HEADER: &str = "bench-t-us";

/// How the producer publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Unary `Publish` calls, `concurrency` at once.
    PerMessage { concurrency: usize },
    /// `PublishStream` with batches of `batch`, up to `window` batches in flight.
    Streamed { batch: usize, window: usize },
    /// As `Streamed`, but nobody consumes until every message is published: the end-to-end
    /// rate is how fast a backlog drains (peak shaving), with no publishing beside it.
    Drain { batch: usize, window: usize },
    /// A fixed rate (open loop) on one `PublishStream`: every millisecond, one batch of the
    /// messages due by then, each stamped with its own due time (as a producer library
    /// with a 1 ms linger would publish).
    FixedRateStream { per_sec: u32 },
    /// Unary calls at a fixed rate (open loop), at most `max_outstanding` unanswered.
    FixedRate {
        per_sec: u32,
        max_outstanding: usize,
    },
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub id: String,
    pub topic: String,
    pub subscription: String,
    pub payload_bytes: usize,
    pub mode: Mode,
    pub count: u64,
    /// The whole scenario (publish and drain) stops at this deadline.
    pub deadline: Duration,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    pub errors: u64,
    pub publish_elapsed: Duration,
    pub delivered: u64,
    pub last_delivery: Duration,
    pub latencies: Latencies,
}

/// Credits the bench's consumer grants (it acks and refills one per delivery).
const CREDITS: u32 = 16384;
/// Most deliveries the bench's consumer acks in one frame.
const ACK_BATCH: usize = 512;

/// Runs a scenario: subscribes on `consumer_addr`, publishes on `producer_addr`, and waits
/// for every message (or the deadline). A `Drain` scenario publishes everything first and
/// times the delivery from the moment it subscribes.
pub async fn run(
    producer_addr: &str,
    consumer_addr: &str,
    s: &Scenario,
    clock: Instant,
) -> Result<Outcome, ClientError> {
    let producer = connect(producer_addr).await?;
    let mut start = Instant::now();
    let deadline = start + s.deadline;
    let published = match s.mode {
        Mode::Drain { .. } => {
            let published = publish(producer.clone(), s, clock, deadline).await;
            Some((published, start.elapsed()))
        }
        _ => None,
    };
    let mut consumer_app = connect(consumer_addr).await?;
    let mut consumer = Consumer::subscribe(&mut consumer_app, &s.subscription, CREDITS).await?;
    if published.is_some() {
        start = Instant::now();
    }
    let run_id = s.id.clone();
    let count = s.count;
    let collector = tokio::spawn(async move {
        let mut latencies = Latencies::default();
        let mut last = Duration::ZERO;
        while (latencies.len() as u64) < count && Instant::now() < deadline {
            // What already arrived is acked in one frame that also refills the window.
            let mut acks = Vec::new();
            let mut event = consumer.next(Duration::from_millis(200)).await;
            loop {
                match event {
                    Ok(Some(Event::Delivery(d))) => {
                        let now = clock.elapsed();
                        if d.headers.get(RUN_HEADER) == Some(&run_id)
                            && let Some(t) = d
                                .headers
                                .get(TIME_HEADER)
                                .and_then(|t| t.parse::<u64>().ok())
                        {
                            latencies.record(now.saturating_sub(Duration::from_micros(t)));
                            last = start.elapsed();
                        }
                        acks.push(d.delivery_id);
                    }
                    Ok(_) => {}
                    Err(_) => return (latencies, last),
                }
                if acks.len() >= ACK_BATCH {
                    break;
                }
                // Only what is already here: a zero timeout answers `Ok(None)` at once.
                match consumer.next(Duration::ZERO).now_or_never() {
                    Some(Ok(None)) | None => break,
                    Some(e) => event = e,
                }
            }
            if !acks.is_empty() && consumer.ack_all_and_refill(acks).is_err() {
                break;
            }
        }
        (latencies, last)
    });
    let ((sent, errors), publish_elapsed) = match published {
        Some(done) => done,
        None => {
            let published = publish(producer, s, clock, deadline).await;
            (published, start.elapsed())
        }
    };
    let (latencies, last_delivery) = collector.await.unwrap_or_default();
    Ok(Outcome {
        sent,
        errors,
        publish_elapsed,
        delivered: latencies.len() as u64,
        last_delivery,
        latencies,
    })
}

/// HTTP/2 receive window of the bench's connections: a stream moves at most one window per
/// round trip, and with the defaults 4 KiB deliveries measured the window, not the sidecar.
const WINDOW: u32 = 8 << 20;

/// Connects like [`client::connect`], with wide receive windows.
async fn connect(addr: &str) -> Result<App, ClientError> {
    let url = format!("http://{addr}");
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| ClientError::Address {
            addr: addr.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW * 2);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
    Ok(AppClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

fn request(s: &Scenario, payload: &Bytes, sent_at_us: u64) -> PublishRequest {
    PublishRequest {
        topic: s.topic.clone(),
        headers: HashMap::from([
            (RUN_HEADER.into(), s.id.clone()),
            (TIME_HEADER.into(), sent_at_us.to_string()),
        ]),
        payload: payload.clone(),
        ack_level: AckLevel::Stored.into(),
        ..PublishRequest::default()
    }
}

/// Publishes the scenario's messages; returns (acked, failed).
async fn publish(app: App, s: &Scenario, clock: Instant, deadline: Instant) -> (u64, u64) {
    let payload = Bytes::from(vec![b'x'; s.payload_bytes]);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    match s.mode {
        Mode::PerMessage { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (mut app, s, payload, next, ok, failed) = (
                        app.clone(),
                        s.clone(),
                        payload.clone(),
                        next.clone(),
                        ok.clone(),
                        failed.clone(),
                    );
                    tokio::spawn(async move {
                        while next.fetch_add(1, Ordering::Relaxed) < s.count
                            && Instant::now() < deadline
                        {
                            let counter = if app
                                .publish(request(&s, &payload, micros(clock)))
                                .await
                                .is_ok()
                            {
                                &ok
                            } else {
                                &failed
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
        Mode::Streamed { batch, window } | Mode::Drain { batch, window } => {
            let (tx, rx) = mpsc::channel(window.max(1));
            let feeder = {
                let (s, payload) = (s.clone(), payload.clone());
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    let mut batch_id = 0u64;
                    while sent < s.count && Instant::now() < deadline {
                        let n = (s.count - sent).min(batch.max(1) as u64);
                        let messages = (0..n)
                            .map(|_| request(&s, &payload, micros(clock)))
                            .collect();
                        batch_id += 1;
                        if tx.send(PublishBatch { batch_id, messages }).await.is_err() {
                            break;
                        }
                        sent += n;
                    }
                })
            };
            stream_results(app, rx, s.count, deadline, (&ok, &failed)).await;
            feeder.abort();
        }
        Mode::FixedRateStream { per_sec } => {
            let (tx, rx) = mpsc::channel(1024);
            let feeder = {
                let (s, payload) = (s.clone(), payload.clone());
                tokio::spawn(async move {
                    let start = Instant::now();
                    let base = micros(clock);
                    let per_us = f64::from(per_sec.max(1)) / 1e6;
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    let (mut sent, mut batch_id) = (0u64, 0u64);
                    while sent < s.count && Instant::now() < deadline {
                        tick.tick().await;
                        let elapsed = u64::try_from(start.elapsed().as_micros()).unwrap_or(0);
                        let due = ((elapsed as f64 * per_us) as u64 + 1).min(s.count);
                        let messages: Vec<_> = (sent..due)
                            .map(|i| {
                                let at = base + (i as f64 / per_us) as u64;
                                request(&s, &payload, at)
                            })
                            .collect();
                        if messages.is_empty() {
                            continue;
                        }
                        sent = due;
                        batch_id += 1;
                        if tx.send(PublishBatch { batch_id, messages }).await.is_err() {
                            break;
                        }
                    }
                })
            };
            stream_results(app, rx, s.count, deadline, (&ok, &failed)).await;
            feeder.abort();
        }
        Mode::FixedRate {
            per_sec,
            max_outstanding,
        } => {
            let sends = |due| {
                let (mut app, req) = (app.clone(), request(s, &payload, due));
                async move { app.publish(req).await.is_ok() }
            };
            let (acked, lost) =
                pace::fixed_rate(s.count, per_sec, max_outstanding, clock, deadline, sends).await;
            ok.fetch_add(acked, Ordering::Relaxed);
            failed.fetch_add(lost, Ordering::Relaxed);
        }
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Publishes the batches of `rx` on one `PublishStream` and counts each message's result in
/// `(ok, failed)`, until `count` are answered or the deadline passes.
async fn stream_results(
    mut app: App,
    rx: mpsc::Receiver<PublishBatch>,
    count: u64,
    deadline: Instant,
    (ok, failed): (&AtomicU64, &AtomicU64),
) {
    let mut results = match app.publish_stream(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(_) => {
            failed.fetch_add(count, Ordering::Relaxed);
            return;
        }
    };
    while let Ok(Ok(Some(r))) = tokio::time::timeout_at(deadline.into(), results.message()).await {
        for one in r.results {
            let counter = if matches!(one.result, Some(OneResult::Ok(_))) {
                ok
            } else {
                failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) >= count {
            break;
        }
    }
}
