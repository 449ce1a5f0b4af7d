//! A userspace TCP proxy that delays what it forwards, with jitter: this kernel has no
//! `tc netem`, so peer-link latency is made here (docs/reliability.md row 13).
//!
//! Every chunk read from one side is written to the other side no earlier than its arrival
//! plus `delay ± jitter`, and never before the chunk read before it (TCP keeps order). The
//! delay is shared by all connections of the proxy and can be changed (set to zero when
//! the fault stops) while they run. A plain forwarder is the same proxy with no delay:
//! the suite uses one to make the control plane's loopback etcd reachable from the pods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The proxy's delay settings, in milliseconds.
#[derive(Debug, Default)]
pub struct Toxics {
    delay_ms: AtomicU64,
    jitter_ms: AtomicU64,
    /// Connections accepted so far (a test checks that traffic really went through).
    connections: AtomicU64,
    /// Bytes forwarded so far, both directions.
    bytes: AtomicU64,
}

impl Toxics {
    /// Every chunk waits `delay ± jitter` (uniform).
    pub fn set(&self, delay: Duration, jitter: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.jitter_ms.store(ms(jitter), Ordering::Relaxed);
        self.delay_ms.store(ms(delay), Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The delay of the next chunk.
    fn sample(&self) -> Duration {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        let jitter = self.jitter_ms.load(Ordering::Relaxed);
        if delay == 0 && jitter == 0 {
            return Duration::ZERO;
        }
        let low = delay.saturating_sub(jitter);
        let high = delay.saturating_add(jitter);
        Duration::from_millis(rand::rng().random_range(low..=high))
    }
}

/// A listening proxy; dropping it stops it and every connection it carries.
#[derive(Debug)]
pub struct ToxicProxy {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub toxics: Arc<Toxics>,
    task: JoinHandle<()>,
}

impl ToxicProxy {
    /// Listens on `listen` (port 0 picks one) and forwards every connection to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("proxy listening on {listen}"))?;
        let listen = listener.local_addr()?;
        let toxics = Arc::new(Toxics::default());
        let shared = toxics.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let toxics = shared.clone();
                toxics.connections.fetch_add(1, Ordering::Relaxed);
                connections.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let up = pipe(in_read, out_write, toxics.clone());
                    let down = pipe(out_read, in_write, toxics);
                    let _ = tokio::join!(up, down);
                });
                // Reap finished connections so the set does not grow without bound.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            listen,
            target,
            toxics,
            task,
        })
    }
}

impl Drop for ToxicProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// Copies one direction, each chunk released at its arrival plus the sampled delay and
/// never before the previous chunk.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    toxics: Arc<Toxics>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut last = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    toxics.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let release = (Instant::now() + toxics.sample()).max(last);
                    last = release;
                    if tx.send((release, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Bytes arrive complete and in order through a jittery proxy, both ways, and the
    /// proxy counts them.
    #[tokio::test]
    async fn keeps_order_under_jitter() -> Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let target = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = ToxicProxy::start("127.0.0.1:0".parse()?, target).await?;
        proxy
            .toxics
            .set(Duration::from_millis(5), Duration::from_millis(5));
        let stream = TcpStream::connect(proxy.listen).await?;
        let (mut r, mut w) = stream.into_split();
        let sent: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in to_send.chunks(1000) {
                w.write_all(chunk).await?;
                tokio::task::yield_now().await;
            }
            w.shutdown().await?;
            std::io::Result::Ok(())
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        writer.await??;
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes reordered by the proxy");
        assert_eq!(proxy.toxics.connections(), 1);
        assert_eq!(proxy.toxics.bytes(), 2 * sent.len() as u64);
        Ok(())
    }
}
