//! Dialling a peer over mutual TLS, as a connector for tonic's `Endpoint`.
//!
//! The endpoint keeps an `http://` URI (HTTP/2 with prior knowledge); this connector puts
//! TLS under it, with a client configuration from [`super::tls::PeerTls::client_config`]
//! that decides which server identity is accepted.

use std::future::Future;
use std::io;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::http::Uri;

/// The name a client puts in its ClientHello. Peers are authenticated by their SPIFFE ID,
/// never by this name.
const SNI: &str = "peer.ferry.invalid";

/// What the connector yields: a TLS stream hyper can drive.
pub type Conn = TokioIo<TlsStream<TcpStream>>;

/// A connector that dials the URI's host and port over TCP (no delay) and completes a TLS
/// handshake with `config`.
pub fn connector(
    config: Arc<ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = Conn,
    Error = io::Error,
    Future = impl Future<Output = io::Result<Conn>> + Send,
> + Clone
+ Send
+ 'static {
    let tls = TlsConnector::from(config);
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "peer URI has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(crate::consts::PEER_GRPC_PORT);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SNI)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        }
    })
}
