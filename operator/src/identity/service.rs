//! The identity service: `ferry.v1.Identity` over TLS on `--identity-addr`.
//!
//! Every replica serves it, leader or not (like the webhook): a sidecar must get its
//! certificate while an election is under way. The server proves the operator's own
//! workload identity (`spiffe://<domain>/ns/<operator namespace>/sa/<operator service
//! account>`) with a certificate of the mesh's CA, which it issues itself and renews at
//! half-life; it asks no client certificate, since the caller is authenticated by its
//! token. Requests are small (a token and a CSR): a message over 64 KiB is refused, a call
//! has 10 s, and at most 64 are handled at once, so a flood of callers cannot exhaust the
//! API server's TokenReviews through us.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use ferry_api::identity::SpiffeId;
use ferry_api::identity::tls::{Credentials, TrustBundle, identity_server_config, provider};
use ferry_api::proto::v1::identity_server::{Identity, IdentityServer};
use ferry_api::proto::v1::{CertifyRequest, CertifyResponse};
use ferry_api::routing::RoutingTable;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{Certifier, CertifyError};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::webhook::tls::TlsListener;

/// Largest request the service decodes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest one call may take (a TokenReview and a pod read).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls handled at once.
const CONCURRENCY: usize = 64;
/// How often the CA Secret is re-read (a rotation).
const CA_POLL: Duration = Duration::from_secs(30);
/// How long the mesh's CA is valid when the operator makes it.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What the webhook tells the sidecars it injects about the identity service.
#[derive(Debug, Clone)]
pub struct Published {
    /// Where sidecars reach it (`--identity-url`).
    pub url: String,
    /// The identity the service proves.
    pub server: SpiffeId,
    /// The CA certificates to trust, PEM (shared with the certifier: a CA rotation
    /// reaches the pods injected after it).
    pub trust_bundle: Arc<RwLock<String>>,
}

impl Published {
    /// The trust bundle now.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The running service.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub published: Published,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// Maps a refusal to its gRPC status: the caller's faults say what to fix, the API
/// server's failures are `UNAVAILABLE` (retry).
pub fn status_of(error: &CertifyError) -> Status {
    let message = error.to_string();
    match error {
        CertifyError::Unauthenticated(_)
        | CertifyError::WrongAudience
        | CertifyError::NotAServiceAccount(_)
        | CertifyError::NotBoundToAPod => Status::unauthenticated(message),
        CertifyError::Pod { .. } => Status::permission_denied(message),
        CertifyError::Identity(_) => Status::invalid_argument(message),
        CertifyError::Kube(_) => Status::unavailable(message),
    }
}

struct Service {
    certifier: Certifier,
}

#[tonic::async_trait]
impl Identity for Service {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> std::result::Result<Response<CertifyResponse>, Status> {
        let CertifyRequest { token, csr_pem } = request.into_inner();
        if token.is_empty() {
            return Err(Status::unauthenticated(
                "no token: send the pod's projected service-account token",
            ));
        }
        let certified = self
            .certifier
            .certify(token.trim(), &csr_pem)
            .await
            .map_err(|e| {
                warn!(error = %e, "refused a certificate");
                status_of(&e)
            })?;
        let not_after = certified
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Response::new(CertifyResponse {
            identity: certified.identity.to_string(),
            certificate_pem: certified.chain_pem,
            trust_bundle_pem: certified.bundle_pem,
            not_after_unix: not_after,
        }))
    }
}

/// The operator's own certificate, issued by `certifier`'s CA.
fn own_credentials(certifier: &Certifier, id: &SpiffeId, ttl: Duration) -> Result<Credentials> {
    let issued = certifier
        .ca()
        .issue_with_key(id, SystemTime::now(), ttl)
        .map_err(|e| Error::Config(format!("issuing the identity service's certificate: {e}")))?;
    Credentials::from_pem(&issued.cert_pem, &issued.key_pem, provider())
        .map_err(|e| Error::Config(format!("loading the identity service's certificate: {e}")))
}

/// Loads (or makes) the CA, binds `--identity-addr` and serves until `shutdown`; with
/// `routing` (the table this replica follows), `ferry.v1.Routing` on the same listener
/// (`crate::routing`).
pub async fn start(
    config: &Config,
    client: kube::Client,
    routing: Option<watch::Receiver<Arc<RoutingTable>>>,
    shutdown: CancellationToken,
) -> Result<Option<Started>> {
    let flags = &config.workload_identity;
    let (Some(addr), Some(url)) = (flags.identity_addr, flags.identity_url.clone()) else {
        return Ok(None);
    };
    let ca = super::load_or_create(
        client.clone(),
        &config.lease_namespace,
        &flags.ca_secret,
        &flags.trust_domain,
        CA_VALIDITY,
    )
    .await
    .map_err(|e| Error::Config(format!("the identity CA: {e}")))?;
    // The image the webhook injects: the flag, or the `--sidecar-config` file's over it.
    let sidecar_image = crate::webhook::defaults::injection(config)?.image;
    let certifier = Certifier::new(
        client.clone(),
        ca.ca,
        &flags.trust_domain,
        flags.workload_cert_ttl,
        &sidecar_image,
    )
    .with_bundle(ca.bundle_pem);
    let server = SpiffeId::new(
        &flags.trust_domain,
        &config.lease_namespace,
        &flags.service_account,
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    let ttl = flags.workload_cert_ttl;
    let credentials = Arc::new(own_credentials(&certifier, &server, ttl)?);
    let clients = Arc::new(
        TrustBundle::from_pem(&certifier.bundle_pem(), provider())
            .map_err(|e| Error::Config(format!("the identity service's trust bundle: {e}")))?,
    );
    let tls = identity_server_config(
        credentials.clone(),
        routing.is_some().then(|| clients.clone()),
    )
    .map_err(|e| Error::Config(format!("the identity service's TLS: {e}")))?;
    let listen_error = |source| Error::Listen {
        addr: addr.to_string(),
        source,
    };
    let tcp = TcpListener::bind(addr).await.map_err(listen_error)?;
    let listener = TlsListener::new(tcp, tls).map_err(listen_error)?;
    let bound = axum::serve::Listener::local_addr(&listener).map_err(listen_error)?;
    let published = Published {
        url,
        server: server.clone(),
        trust_bundle: certifier.bundle_handle(),
    };
    let grpc = IdentityServer::new(Service {
        certifier: certifier.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let mut routes = tonic::service::Routes::new(grpc);
    if let Some(table) = routing {
        routes = routes.add_service(crate::routing::service::server(table));
    }
    // The concurrency limit and the timeout hold until a response's headers: a routing
    // stream (answered at once) is bounded by its own limit, not by these.
    let router = routes.prepare().into_axum_router().layer(
        tower::ServiceBuilder::new()
            .layer(tower::limit::ConcurrencyLimitLayer::new(CONCURRENCY))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                CALL_TIMEOUT,
            )),
    );
    info!(addr = %bound, identity = %server, "serving the identity service");
    tokio::spawn(renew_own(
        certifier.clone(),
        server.clone(),
        credentials.clone(),
        ttl,
        shutdown.clone(),
    ));
    tokio::spawn(follow_ca(
        client,
        config.lease_namespace.clone(),
        flags.ca_secret.clone(),
        certifier,
        server.clone(),
        (credentials, clients),
        ttl,
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<crate::routing::Peer>();
        axum::serve(listener, service)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    Ok(Some(Started {
        addr: bound,
        published,
        task,
    }))
}

/// Renews the service's own certificate at half its lifetime.
async fn renew_own(
    certifier: Certifier,
    id: SpiffeId,
    credentials: Arc<Credentials>,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ttl / 2) => {}
            () = shutdown.cancelled() => return,
        }
        let renewed = certifier
            .ca()
            .issue_with_key(&id, SystemTime::now(), ttl)
            .and_then(|issued| credentials.replace(&issued.cert_pem, &issued.key_pem));
        match renewed {
            Ok(()) => info!(identity = %id, "renewed the identity service's certificate"),
            Err(error) => {
                warn!(%error, "renewing the identity service's certificate failed; the current one stays until the next try")
            }
        }
    }
}

/// Re-reads the CA Secret every [`CA_POLL`]; a new CA or bundle is signed with and handed
/// out from then on, and the service's own certificate is reissued by the new CA.
#[allow(clippy::too_many_arguments)]
async fn follow_ca(
    client: kube::Client,
    namespace: String,
    secret: String,
    certifier: Certifier,
    id: SpiffeId,
    (credentials, clients): (Arc<Credentials>, Arc<TrustBundle>),
    ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CA_POLL) => {}
            () = shutdown.cancelled() => return,
        }
        let material = match super::ca_secret::read(client.clone(), &namespace, &secret).await {
            Ok(Some(material)) => material,
            Ok(None) => {
                warn!(secret = %format!("{namespace}/{secret}"), "the CA Secret is gone; signing with the CA loaded before");
                continue;
            }
            Err(error) => {
                warn!(%error, "re-reading the CA Secret failed; signing with the CA loaded before");
                continue;
            }
        };
        if material.ca.cert_pem() == certifier.ca().cert_pem()
            && material.bundle_pem == certifier.bundle_pem()
        {
            continue;
        }
        if let Err(error) = clients.replace(&material.bundle_pem) {
            warn!(%error, "the new trust bundle does not load; client certificates are checked against the one before");
        }
        certifier.rotate(material.ca, material.bundle_pem);
        let reissued = certifier
            .ca()
            .issue_with_key(&id, SystemTime::now(), ttl)
            .and_then(|issued| credentials.replace(&issued.cert_pem, &issued.key_pem));
        match reissued {
            Ok(()) => {
                info!(secret = %format!("{namespace}/{secret}"), "the CA or its trust bundle changed: signing with it from now on")
            }
            Err(error) => {
                warn!(%error, "the identity service's certificate from the new CA failed")
            }
        }
    }
}
