//! The scenarios of `ferryctl bench`, for any broker that can publish and deliver.
//!
//! Same shapes as `ferryctl/src/bench/scenario.rs`: per-message publishes (`concurrency`
//! at once, each waiting for its publish ack), batched publishes (`batch` messages per
//! batch, `window` batches in flight), and an open-loop fixed rate that stamps each message
//! with the time it was due (so a stall shows as latency: no coordinated omission). A
//! consumer receives and acks concurrently. Latency is publish-to-deliver, from a timestamp
//! in the payload (microseconds on this process's monotonic clock).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferryctl::bench::stats::Latencies;
use tokio::sync::Semaphore;

/// Bytes at the front of every payload: send time (µs, LE) and the scenario's tag (LE).
pub const STAMP_BYTES: usize = 16;

/// How the producer publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// One publish per message, `concurrency` at once, each waiting for its ack.
    PerMessage { concurrency: usize },
    /// Batches of `batch` (pipelined or async), up to `window` batches unanswered.
    Batched { batch: usize, window: usize },
    /// Per-message publishes at a fixed rate, at most `max_outstanding` unanswered.
    FixedRate {
        per_sec: u32,
        max_outstanding: usize,
    },
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub id: String,
    /// Written into every payload, so strays from another scenario are not counted.
    pub tag: u64,
    pub payload_bytes: usize,
    pub mode: Mode,
    pub count: u64,
    /// Publish and drain together stop at this deadline.
    pub deadline: Duration,
}

/// What happened (the fields `ferryctl bench` reports from).
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    pub errors: u64,
    pub publish_elapsed: Duration,
    pub delivered: u64,
    pub last_delivery: Duration,
    pub latencies: Latencies,
}

/// The producer side of a broker. Clones share one connection.
pub trait Publisher: Clone + Send + Sync + 'static {
    /// Publishes one message and waits for the broker's ack.
    fn publish(&self, payload: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Publishes a batch without waiting between messages, then waits for all acks;
    /// returns how many were acked.
    fn publish_batch(
        &self,
        payloads: Vec<Bytes>,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// The consumer side: receives, acks, and hands over the payloads.
pub trait Receiver: Send + 'static {
    /// Waits up to `wait` for deliveries, acks them and appends their payloads to `out`.
    fn receive(
        &mut self,
        wait: Duration,
        out: &mut Vec<Bytes>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A payload of `size` bytes (at least [`STAMP_BYTES`]) stamped with `sent_at_us` and `tag`.
pub fn payload(size: usize, sent_at_us: u64, tag: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(STAMP_BYTES));
    b.put_u64_le(sent_at_us);
    b.put_u64_le(tag);
    b.resize(size.max(STAMP_BYTES), b'x');
    b.freeze()
}

/// The send time in a payload, if it carries `tag`.
pub fn stamp(payload: &[u8], tag: u64) -> Option<u64> {
    let time = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let t = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    (t == tag).then_some(time)
}

pub use ferryctl::bench::pace::micros;

/// Runs a scenario: the receiver collects concurrently while the publisher publishes;
/// returns once every acked message arrived or at the deadline.
pub async fn run<P: Publisher, R: Receiver>(
    publisher: P,
    mut receiver: R,
    s: &Scenario,
    clock: Instant,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + s.deadline;
    // How many deliveries to wait for: the count, lowered to the acked ones once known.
    let target = Arc::new(AtomicU64::new(s.count));
    let receive_errors = Arc::new(AtomicU64::new(0));
    let collector = {
        let (target, receive_errors, tag) = (target.clone(), receive_errors.clone(), s.tag);
        tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut last = Duration::ZERO;
            let mut batch = Vec::new();
            while (latencies.len() as u64) < target.load(Ordering::Acquire)
                && Instant::now() < deadline
            {
                batch.clear();
                if receiver
                    .receive(Duration::from_millis(200), &mut batch)
                    .await
                    .is_err()
                {
                    receive_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let now = clock.elapsed();
                for p in &batch {
                    if let Some(t) = stamp(p, tag) {
                        latencies.record(now.saturating_sub(Duration::from_micros(t)));
                        last = start.elapsed();
                    }
                }
            }
            (latencies, last)
        })
    };
    let (sent, failed) = publish(publisher, s, clock, deadline).await;
    let publish_elapsed = start.elapsed();
    target.store(sent, Ordering::Release);
    let (latencies, last_delivery) = collector.await.unwrap_or_default();
    Outcome {
        sent,
        errors: failed + receive_errors.load(Ordering::Relaxed),
        publish_elapsed,
        delivered: latencies.len() as u64,
        last_delivery,
        latencies,
    }
}

/// Publishes the scenario's messages; returns (acked, failed).
async fn publish<P: Publisher>(
    publisher: P,
    s: &Scenario,
    clock: Instant,
    deadline: Instant,
) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (size, tag) = (s.payload_bytes, s.tag);
    match s.mode {
        Mode::PerMessage { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (p, next, ok, failed, n) = (
                        publisher.clone(),
                        next.clone(),
                        ok.clone(),
                        failed.clone(),
                        s.count,
                    );
                    tokio::spawn(async move {
                        while next.fetch_add(1, Ordering::Relaxed) < n && Instant::now() < deadline
                        {
                            let good = p.publish(payload(size, micros(clock), tag)).await.is_ok();
                            let counter = if good { &ok } else { &failed };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
        Mode::Batched { batch, window } => {
            let permits = Arc::new(Semaphore::new(window.max(1)));
            let mut tasks = Vec::new();
            let mut queued = 0u64;
            while queued < s.count && Instant::now() < deadline {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let n = (s.count - queued).min(batch.max(1) as u64);
                queued += n;
                let messages: Vec<Bytes> =
                    (0..n).map(|_| payload(size, micros(clock), tag)).collect();
                let (p, ok, failed) = (publisher.clone(), ok.clone(), failed.clone());
                tasks.push(tokio::spawn(async move {
                    let acked = p.publish_batch(messages).await.unwrap_or(0).min(n);
                    ok.fetch_add(acked, Ordering::Relaxed);
                    failed.fetch_add(n - acked, Ordering::Relaxed);
                    drop(permit);
                }));
            }
            for t in tasks {
                if tokio::time::timeout_at(deadline.into(), t).await.is_err() {
                    break;
                }
            }
        }
        Mode::FixedRate {
            per_sec,
            max_outstanding,
        } => {
            let sends = |due| {
                let (p, message) = (publisher.clone(), payload(size, due, tag));
                async move { p.publish(message).await.is_ok() }
            };
            let (acked, lost) = ferryctl::bench::pace::fixed_rate(
                s.count,
                per_sec,
                max_outstanding,
                clock,
                deadline,
                sends,
            )
            .await;
            ok.fetch_add(acked, Ordering::Relaxed);
            failed.fetch_add(lost, Ordering::Relaxed);
        }
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_stamp_and_size() {
        let p = payload(256, 123_456, 7);
        assert_eq!(p.len(), 256);
        assert_eq!(stamp(&p, 7), Some(123_456));
        assert_eq!(stamp(&p, 8), None);
        assert_eq!(payload(4, 1, 1).len(), STAMP_BYTES);
        assert_eq!(stamp(b"short", 0), None);
    }
}
