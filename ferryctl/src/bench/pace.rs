//! The fixed-rate publisher shared by `ferryctl bench` and the comparison bench: sends are
//! scheduled at `per_sec` and stamped with the time they were due, not when they went, so
//! that a stall shows as latency instead of being hidden (coordinated omission).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Microseconds since `clock`.
pub fn micros(clock: Instant) -> u64 {
    u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Calls `send(due)` for `count` messages at `per_sec`, at most `max_outstanding` in flight,
/// until `deadline`; `due` is the scheduled time in microseconds since `clock`. Each send
/// resolves to whether it was acked. Returns (acked, failed).
pub async fn fixed_rate<F, Fut>(
    count: u64,
    per_sec: u32,
    max_outstanding: usize,
    clock: Instant,
    deadline: Instant,
    mut send: F,
) -> (u64, u64)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(max_outstanding.max(1)));
    let start = tokio::time::Instant::now();
    let per_sec = f64::from(per_sec.max(1));
    for i in 0..count {
        let at = start + Duration::from_secs_f64(i as f64 / per_sec);
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let due =
            micros(clock).saturating_sub(u64::try_from(at.elapsed().as_micros()).unwrap_or(0));
        let (sent, ok, failed) = (send(due), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let counter = if sent.await { &ok } else { &failed };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // Wait for the outstanding sends.
    let all = u32::try_from(max_outstanding.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout_at(deadline.into(), permits.acquire_many(all)).await;
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}
