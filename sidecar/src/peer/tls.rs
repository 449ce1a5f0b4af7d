//! Mutual TLS on the peer port.
//!
//! Server side: every accepted connection completes a TLS 1.3 handshake that requires a
//! client certificate chaining to the trust bundle and naming a SPIFFE ID of the mesh's
//! trust domain; the identity it proves rides with every request of the connection as
//! [`PeerInfo`] (a request extension), which is what authorization reads. A connection
//! that fails the handshake gets nothing and is counted (`ferry_sidecar_peer_refused_total`).
//! Handshakes run concurrently with a deadline, so a slow or silent client cannot hold up
//! the accept loop.
//!
//! Client side: links dial with `ferry_api::identity::dial::connector`, accepting the
//! server only if it proves the identity the routing table gives that member.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_api::identity::SpiffeId;
use ferry_api::identity::tls::{PeerTls, peer_identity};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// Longest a peer may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a peer connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The identity its certificate proved; `None` on a plaintext peer port.
    pub identity: Option<SpiffeId>,
}

/// An accepted, authenticated peer connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts peer connections on `listener` and completes their handshakes until `stop`.
pub fn incoming(
    listener: TcpListener,
    tls: &PeerTls,
    refused: Counter,
    stop: CancellationToken,
) -> Result<ReceiverStream<io::Result<TlsConn>>, ferry_api::identity::IdentityError> {
    let acceptor = TlsAcceptor::from(tls.server_config()?);
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: wait a little instead of spinning.
                        tracing::warn!(error = %e, "peer port: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let shake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let stream = match shake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        refused.inc();
                        tracing::info!(%remote, error = %e, "peer refused: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        refused.inc();
                        tracing::info!(%remote, "peer refused: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                };
                let identity = match peer_identity(stream.get_ref().1.peer_certificates()) {
                    Ok(id) => id,
                    Err(e) => {
                        refused.inc();
                        tracing::info!(%remote, error = %e, "peer refused: no usable identity");
                        return;
                    }
                };
                let info = PeerInfo {
                    remote,
                    identity: Some(identity),
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: stream,
                        info,
                    }))
                    .await;
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
