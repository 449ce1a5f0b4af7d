//! Waiting for a condition, with a deadline: the only way tests wait.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::{Instant, sleep};

/// First pause between two polls; it doubles up to [`MAX_POLL_INTERVAL`].
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest pause between two polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Polls `condition` until it returns `true`; fails once `timeout` has passed.
///
/// The condition runs at least once, even with a zero timeout. Add context to the error
/// at the call site (`.context("pod p becomes Ready")`).
pub async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_value(timeout, || {
        let fut = condition();
        async move { Ok(fut.await.then_some(())) }
    })
    .await
}

/// Polls `probe` until it returns `Ok(Some(value))` and returns that value.
///
/// `Ok(None)` means "not yet"; an `Err` also means "not yet" (for example a connection
/// refused while a server starts), and the last one is reported if `timeout` passes.
pub async fn wait_for_value<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut interval = FIRST_POLL_INTERVAL;
    let mut polls = 0_u32;
    loop {
        polls += 1;
        let last_error = match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(error) => Some(error),
        };
        let now = Instant::now();
        if now >= deadline {
            let waited = Elapsed(now - start);
            return Err(match last_error {
                Some(error) => error.context(format!(
                    "condition not met within {waited} ({polls} polls); last error"
                )),
                None => anyhow!("condition not met within {waited} ({polls} polls)"),
            });
        }
        sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// A duration printed as seconds with millisecond precision.
struct Elapsed(Duration);

impl Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}s", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() -> Result<()> {
        let calls = AtomicU32::new(0);
        wait_for(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await?;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        Ok(())
    }

    #[tokio::test]
    async fn fails_after_the_deadline_with_the_last_error() {
        let start = std::time::Instant::now();
        let result = wait_for_value::<(), _, _>(Duration::from_millis(100), || async {
            Err(anyhow!("connection refused"))
        })
        .await;
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(2));
        let text = format!("{:#}", result.err().unwrap_or_else(|| anyhow!("no error")));
        assert!(text.contains("condition not met within"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
    }

    #[tokio::test]
    async fn zero_timeout_still_polls_once() -> Result<()> {
        let value = wait_for_value(Duration::ZERO, || async { Ok(Some(7)) }).await?;
        assert_eq!(value, 7);
        Ok(())
    }
}
