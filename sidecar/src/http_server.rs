//! Serving the HTTP ports (app HTTP/JSON on loopback, admin on the pod IP) with the limits
//! a port reachable by other processes needs, which `axum::serve` does not set:
//!
//! - a client must send its request headers within [`HEADER_READ_TIMEOUT`] (slowloris);
//! - headers are bounded ([`MAX_HEADER_BYTES`]; larger gets 431) and so are HTTP/2 streams
//!   per connection ([`MAX_STREAMS`]);
//! - at most [`MAX_CONNECTIONS`] connections are served at once; more wait in the kernel's
//!   accept queue instead of costing memory here.
//!
//! On `stop` the listener closes, connections in progress are asked to finish, and those
//! still open after [`CLOSE_WAIT`] are dropped.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Longest a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 64;
/// Connections served at once per port.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long connections get to finish after the stop signal.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(20));
    builder
}

/// Serves `router` on `listener` until `stop`; `name` labels its log lines.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    stop: CancellationToken,
) {
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = stop.cancelled() => break,
        };
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(server = name, %remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            server = name,
            "connections still open at shutdown were dropped"
        );
    }
}
