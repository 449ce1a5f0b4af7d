//! The sidecar's workload certificate from the operator's identity service
//! (`--identity-url`), the way a cluster gives it one.
//!
//! The sidecar makes its own key (it never leaves the process), reads its pod's projected
//! service-account token (`--identity-token-file`, which the kubelet writes and refreshes),
//! and calls `ferry.v1.Identity/Certify` over TLS, checking that the server proves the
//! operator's identity (`--identity-server`) under the trust anchors it was given
//! (`--identity-trust-anchors`, put in its environment by the webhook). It holds the
//! certificate in memory only. At half its lifetime it asks again with a fresh key; if
//! that fails it retries every [`RETRY_EVERY`] and keeps serving with the current
//! certificate, which stays valid for the other half. Connections already established are
//! not touched by a renewal (see `ferry_api::identity::tls`), so rotation drops no stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_api::consts::IDENTITY_PORT;
use ferry_api::identity::ca::new_csr;
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::{
    Credentials, Expect, PeerTls, TrustBundle, anonymous_client_config, provider,
};
use ferry_api::identity::{IdentityError, SpiffeId};
use ferry_api::proto::v1::CertifyRequest;
use ferry_api::proto::v1::identity_client::IdentityClient;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};

/// Pause between failed attempts.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);
/// Longest one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate could not be had from the identity service.
#[derive(Debug, thiserror::Error)]
pub enum IdentityClientError {
    #[error("--identity-url {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("reading the identity token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the identity token {0} is empty")]
    EmptyToken(PathBuf),
    #[error("connecting to the identity service {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the identity service refused: {0}")]
    Refused(tonic::Status),
    #[error("the identity service's answer: {0}")]
    Answer(#[from] IdentityError),
    #[error("the identity service issued {got}, but this pod is {want}")]
    WrongIdentity { got: SpiffeId, want: String },
}

/// Where and how to ask for certificates.
#[derive(Debug, Clone)]
pub struct IdentitySource {
    /// `host:port` of the service (TLS; the scheme of `--identity-url` is `https`).
    uri: Uri,
    url: String,
    server: SpiffeId,
    token_file: PathBuf,
    /// `namespace/service account` the certificate must name.
    namespace: String,
    service_account: String,
}

/// A certificate and its key, as issued.
struct Issued {
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
}

impl IdentitySource {
    pub fn new(
        url: &str,
        server: SpiffeId,
        token_file: &Path,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityClientError> {
        let bad = |why: &str| IdentityClientError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let parsed: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if parsed.scheme_str() != Some("https") {
            return Err(bad("must be an https:// URL"));
        }
        let host = parsed.host().ok_or_else(|| bad("has no host"))?;
        let port = parsed.port_u16().unwrap_or(IDENTITY_PORT);
        // The TLS is under the connector; the endpoint speaks HTTP/2 over it.
        let uri = format!("http://{host}:{port}")
            .parse()
            .map_err(|_| bad("has an unusable host"))?;
        Ok(Self {
            uri,
            url: url.to_owned(),
            server,
            token_file: token_file.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    fn token(&self) -> Result<String, IdentityClientError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|source| {
            IdentityClientError::Token {
                path: self.token_file.clone(),
                source,
            }
        })?;
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(IdentityClientError::EmptyToken(self.token_file.clone()));
        }
        Ok(token)
    }

    /// One call: a fresh key, a CSR, the pod's token; the answer checked.
    async fn certify(&self, anchors: Arc<TrustBundle>) -> Result<Issued, IdentityClientError> {
        let token = self.token()?;
        let (csr_pem, key_pem) = new_csr()?;
        let config = anonymous_client_config(anchors, Expect::Exactly(self.server.clone()))?;
        let channel = Endpoint::from(self.uri.clone())
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(connector(config))
            .await
            .map_err(|source| IdentityClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let answer = IdentityClient::new(channel)
            .certify(CertifyRequest { token, csr_pem })
            .await
            .map_err(IdentityClientError::Refused)?
            .into_inner();
        let issued = Issued {
            chain_pem: answer.certificate_pem,
            key_pem,
            bundle_pem: answer.trust_bundle_pem,
        };
        // Loading checks that the chain is usable and carries one SPIFFE ID.
        let credentials = Credentials::from_pem(&issued.chain_pem, &issued.key_pem, provider())?;
        let got = credentials.identity();
        if got.namespace != self.namespace || got.service_account != self.service_account {
            return Err(IdentityClientError::WrongIdentity {
                got,
                want: format!("{}/{}", self.namespace, self.service_account),
            });
        }
        Ok(issued)
    }

    /// The first certificate, tried until `deadline` passes (the operator may be starting).
    pub async fn bootstrap(
        &self,
        anchors_pem: &str,
        deadline: Duration,
    ) -> Result<PeerTls, IdentityClientError> {
        let anchors = Arc::new(TrustBundle::from_pem(anchors_pem, provider())?);
        let until = tokio::time::Instant::now() + deadline;
        let issued = loop {
            match self.certify(anchors.clone()).await {
                Ok(issued) => break issued,
                Err(e) if tokio::time::Instant::now() + RETRY_EVERY < until => {
                    tracing::warn!(error = %e, "no workload certificate yet; retrying");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
                Err(e) => return Err(e),
            }
        };
        let credentials = Credentials::from_pem(&issued.chain_pem, &issued.key_pem, provider())?;
        let bundle = TrustBundle::from_pem(&issued.bundle_pem, provider())?;
        tracing::info!(identity = %credentials.identity(), "workload certificate issued by the operator");
        Ok(PeerTls {
            credentials: Arc::new(credentials),
            bundle: Arc::new(bundle),
        })
    }

    /// Renews `tls` at half of each certificate's lifetime until `stop`.
    pub async fn renew(
        self,
        tls: PeerTls,
        renewed: Counter,
        failed: Counter,
        stop: CancellationToken,
    ) {
        loop {
            let wait = half_life_left(tls.credentials.not_after(), SystemTime::now());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
            loop {
                // The service is trusted under the bundle the sidecar has now, which a CA
                // rotation extends before it switches.
                match self.certify(tls.bundle.clone()).await {
                    Ok(issued) => {
                        let applied = tls
                            .credentials
                            .replace(&issued.chain_pem, &issued.key_pem)
                            .and_then(|()| tls.bundle.replace(&issued.bundle_pem).map(|_| ()));
                        match applied {
                            Ok(()) => {
                                renewed.inc();
                                tracing::info!(
                                    identity = %tls.credentials.identity(),
                                    "workload certificate renewed"
                                );
                                break;
                            }
                            Err(e) => {
                                failed.inc();
                                tracing::warn!(error = %e, "the renewed certificate does not load; keeping the current one");
                            }
                        }
                    }
                    Err(e) => {
                        failed.inc();
                        tracing::warn!(error = %e, "renewing the workload certificate failed; keeping the current one");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY_EVERY) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// How long until the renewal point: half of the time left, as issued certificates are
/// renewed halfway (at least a second, so a clock far off does not spin).
fn half_life_left(not_after: SystemTime, now: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    (left / 2).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_halfway_and_never_spins() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            half_life_left(now + Duration::from_secs(3600), now),
            Duration::from_secs(1800)
        );
        assert_eq!(half_life_left(now, now), Duration::from_secs(1));
        assert_eq!(
            half_life_left(now - Duration::from_secs(5), now),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_url_must_be_https_with_a_host() {
        let server: SpiffeId = "spiffe://ferry.local/ns/ferry-system/sa/ferry-operator"
            .parse()
            .unwrap();
        let token = Path::new("/t");
        let make = |url: &str| IdentitySource::new(url, server.clone(), token, "ns", "sa");
        assert!(make("http://op:8444").is_err());
        assert!(make("nonsense").is_err());
        let ok = make("https://ferry-identity.ferry-system.svc").unwrap();
        assert_eq!(
            ok.uri.to_string(),
            "http://ferry-identity.ferry-system.svc:8444/"
        );
    }
}
