//! TLS for the webhook: a certificate re-read from disk when it changes, and an axum
//! listener that completes TLS handshakes concurrently.
//!
//! The certificate and key are `tls.crt` and `tls.key` in the certificate folder (the
//! layout of a `kubernetes.io/tls` Secret mounted as a volume, as cert-manager writes it).
//! On each handshake the files' modification times are checked; when they changed, the
//! pair is loaded again, so a rotated certificate is served without a restart. A pair
//! that does not load (a half-written rotation) keeps the previous one in service.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate and key from a folder, reloaded when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: RwLock<(Stamp, Arc<CertifiedKey>)>,
}

/// Modification times of the certificate and the key.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    /// Loads `dir/tls.crt` and `dir/tls.key`; fails if they do not make a usable pair.
    pub fn new(dir: &Path, provider: Arc<CryptoProvider>) -> Result<Self> {
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        let stamp = (modified(&cert), modified(&key));
        let certified = load(&cert, &key, &provider)?;
        Ok(Self {
            cert,
            key,
            provider,
            loaded: RwLock::new((stamp, certified)),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let stamp = (modified(&self.cert), modified(&self.key));
        {
            let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            if loaded.0 == stamp {
                return loaded.1.clone();
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        match load(&self.cert, &self.key, &self.provider) {
            Ok(certified) => {
                info!(cert = %self.cert.display(), "webhook certificate reloaded");
                *loaded = (stamp, certified);
            }
            Err(error) => {
                // Retried on the next handshake; the old pair stays in service meanwhile.
                warn!(%error, "the new webhook certificate does not load; keeping the old one");
            }
        }
        loaded.1.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        Error::Config(format!("--webhook-cert-dir: {}: {e}", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| bad(key, &e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| bad(key, &e))?;
    Ok(Arc::new(certified))
}

/// The webhook's TLS configuration (TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1).
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::new(dir, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An axum listener over TLS. Handshakes run in their own tasks with a deadline, so a
/// client that stalls its handshake (or sends garbage) delays nobody else.
#[derive(Debug)]
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        let tls = TlsAcceptor::from(config);
        let acceptor = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        debug!(%error, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let tls = tls.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%peer, %error, "webhook TLS handshake failed"),
                        Err(_) => debug!(%peer, "webhook TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            accepted,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task is gone (only on shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
