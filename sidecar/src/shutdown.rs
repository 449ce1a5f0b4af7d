//! Orderly shutdown. On SIGTERM (or SIGINT, or stdin closing under `--drain-on-stdin-eof`)
//! the sidecar stops taking publishes (they get UNAVAILABLE "shutting down"), keeps
//! delivering until every store is drained or the grace period ends, hands deliveries it
//! holds for its own app back to their producers, cancels every task (one
//! `CancellationToken` shared by all of them), joins them, and syncs the logs. The drain
//! gets [`DRAIN_SHARE`] of the grace period; what is still undelivered then is handed to a
//! live peer (`crate::replica::handoff`) in the rest of it. What no peer takes
//! stays in the durable log and is delivered after a restart (`Disk`/`DiskAsync`).

use std::time::Duration;

use tokio::time::Instant;

use crate::engine::Engine;

/// Share of the grace period spent draining before the backlog is handed to a peer.
pub const DRAIN_SHARE: f64 = 0.6;

/// SIGTERM and SIGINT, watched from the moment this is made: a signal that arrives before
/// anyone awaits it is kept, not left to its default action (which would end the process
/// without a drain: a supervisor that signals as soon as the ready line is printed must
/// get a clean stop).
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts watching now. Must be called inside the runtime.
    pub fn watch() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let watch = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch {name}");
                    None
                }
            };
            Self {
                term: watch(SignalKind::terminate(), "SIGTERM"),
                int: watch(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => tracing::info!("SIGTERM: draining"),
                () = next(&mut self.int) => tracing::info!("SIGINT: draining"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for SIGTERM or SIGINT (watched from the call on), or, with `watch_stdin`, for
/// stdin to reach end of file (`--drain-on-stdin-eof`: the supervisor holding the other end
/// of the pipe is gone).
pub fn requested(watch_stdin: bool) -> impl std::future::Future<Output = ()> {
    let signals = Signals::watch();
    async move {
        if watch_stdin {
            tokio::select! {
                () = signals.recv() => {}
                () = stdin_closed() => tracing::info!("stdin closed: draining"),
            }
        } else {
            signals.recv().await;
        }
    }
}

/// Resolves once stdin reaches end of file (or fails). Whatever arrives before is ignored.
/// The read blocks in a thread of its own, not in the runtime's blocking pool: a read
/// still pending there would hold up the runtime's shutdown.
async fn stdin_closed() {
    let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("stdin-eof".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reading stdin failed: draining");
                        break;
                    }
                }
            }
            let _ = closed.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = on_closed.await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch stdin; only signals stop the sidecar");
            std::future::pending::<()>().await;
        }
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
            tracing::warn!(?grace, "drain window over with undelivered backlog");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
