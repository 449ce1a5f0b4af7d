//! Orderly shutdown. On SIGTERM (or SIGINT) the sidecar stops taking publishes (they get
//! UNAVAILABLE "shutting down"), keeps delivering until every store is drained or the grace
//! period ends, hands deliveries it holds for its own app back to their producers, cancels
//! every task (one `CancellationToken` shared by all of them), joins them, and syncs the logs.
//! Messages still undelivered at the end stay in the durable log and are delivered after a
//! restart (`Disk`/`DiskAsync`); handing them to a peer is not implemented.

use std::time::Duration;

use tokio::time::Instant;

use crate::engine::Engine;

/// Waits for SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Refuses publishes and waits until the backlog is delivered or `grace` passes. Returns
/// whether everything was delivered.
pub async fn drain(engine: &Engine, grace: Duration) -> bool {
    engine.begin_drain();
    let deadline = Instant::now() + grace;
    loop {
        if engine.drained() {
            tracing::info!("backlog drained");
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                ?grace,
                "grace period over with undelivered backlog; it stays in the log for the next start"
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
