//! Starting and stopping a whole sidecar: bind the four listeners, start the routing
//! source, the engine and the servers, and run the shutdown sequence. Used by `main.rs`
//! and by tests that run several sidecars in one process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ferry_api::identity::files::{CredentialDir, Reloader};
use ferry_api::identity::tls::PeerTls;
use ferry_api::identity::{IdentityError, SpiffeId};

use crate::identity::IdentitySource;
use ferry_api::proto::v1::app_server::AppServer;
use ferry_api::proto::v1::peer_server::PeerServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;

use crate::app::grpc::AppService;
use crate::app::{APP_MAX_MESSAGE, http};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Error;
use crate::peer::PEER_MAX_MESSAGE;
use crate::peer::server::PeerService;
use crate::routing::RoutingSource;
use crate::routing::etcd::SourceStatus;

/// HTTP/2 flow-control windows of the app and peer gRPC servers. The defaults (64 KiB per
/// stream) capped streamed publishing and peer batches of large messages well below what
/// the CPU allows: a batch waited for window updates on every round trip.
const STREAM_WINDOW: u32 = 8 << 20;
/// See [`STREAM_WINDOW`]; the connection window covers every stream of one connection.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Concurrent HTTP/2 streams per connection on the gRPC servers: a producer uses one
/// `Forward` stream per link plus a few unary calls, an app a handful of streams; more from
/// one connection is a caller trying to exhaust the server.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Largest header block a gRPC caller may send (metadata of Ferry's own calls is tiny).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Streams a caller may open and reset at once before the connection is closed (HTTP/2
/// rapid reset).
const MAX_PENDING_RESETS: usize = 32;
/// A peer that does not answer a keepalive ping within this is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A gRPC server with the limits every Ferry port applies.
fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// How long tasks get to finish after the stop signal before they are abandoned.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the credentials folder is checked for a rotated certificate or bundle.
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How often the consumer expires deliveries past their ackWait.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The addresses a sidecar listens on (ports resolved when `0` was asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    pub app_grpc: SocketAddr,
    pub app_http: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
    /// The peer address other sidecars dial (the member `address` in the routing table).
    pub advertise: SocketAddr,
}

/// A sidecar whose listeners are bound but which serves nothing yet.
#[derive(Debug)]
pub struct Sidecar {
    config: Config,
    listeners: [TcpListener; 4],
    addrs: Addrs,
    /// The etcd source's status, reported on the admin port.
    routing_status: Option<Arc<SourceStatus>>,
    /// Peer mutual TLS and what renews it.
    tls: Option<(PeerTls, Renewal)>,
}

/// Where renewed credentials come from.
#[derive(Debug)]
enum Renewal {
    /// `--tls-dir`: re-read when the files change.
    Files(Reloader),
    /// `--identity-url`: asked of the operator at half-life.
    Operator(IdentitySource),
}

/// How long a starting sidecar waits for its first certificate (the operator may be
/// starting too) before it gives up and exits, for its container to be restarted.
const FIRST_CERTIFICATE_WITHIN: Duration = Duration::from_secs(60);

/// Asks the operator's identity service for this pod's first certificate.
async fn certify(config: &Config, url: &str) -> Result<(PeerTls, IdentitySource), Error> {
    let bad = |flag: &str, why: String| Error::Config(format!("--{flag}: {why}"));
    let server: SpiffeId = config
        .identity_server
        .as_deref()
        .ok_or_else(|| bad("identity-server", "required with --identity-url".into()))?
        .parse()
        .map_err(|e: IdentityError| bad("identity-server", e.to_string()))?;
    let anchors = config.identity_trust_anchors.as_deref().ok_or_else(|| {
        bad(
            "identity-trust-anchors",
            "required with --identity-url".into(),
        )
    })?;
    let source = IdentitySource::new(
        url,
        server,
        &config.identity_token_file,
        &config.namespace,
        &config.service_account,
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    let tls = source
        .bootstrap(anchors, FIRST_CERTIFICATE_WITHIN)
        .await
        .map_err(|e| Error::Config(format!("no workload certificate: {e}")))?;
    Ok((tls, source))
}

/// Loads `--tls-dir` and checks that the certificate is this pod's.
fn load_tls(dir: &Path, config: &Config) -> Result<(PeerTls, Reloader), Error> {
    let (tls, reloader) = CredentialDir::new(dir)
        .load()
        .map_err(|e| Error::Config(format!("--tls-dir {}: {e}", dir.display())))?;
    let id = tls.credentials.identity();
    if id.namespace != config.namespace || id.service_account != config.service_account {
        return Err(Error::Config(format!(
            "--tls-dir {}: the certificate proves {id}, not this pod's namespace {:?} and service account {:?}",
            dir.display(),
            config.namespace,
            config.service_account
        )));
    }
    tracing::info!(identity = %id, "peer connections use mutual TLS");
    Ok((tls, reloader))
}

/// Applies rotated credentials from the folder until `stop`.
async fn reload_tls(
    mut reloader: Reloader,
    tls: PeerTls,
    failed: prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TLS_RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match reloader.poll(&tls) {
            Ok(true) => tracing::info!(
                identity = %tls.credentials.identity(),
                "peer certificate or trust bundle reloaded"
            ),
            Ok(false) => {}
            Err(e) => {
                failed.inc();
                tracing::warn!(error = %e, "peer credentials did not reload; the previous ones stay in use");
            }
        }
    }
}

async fn bind(flag: &str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Io {
        what: format!("--{flag}: cannot listen on {addr}"),
        source,
    })
}

fn local(l: &TcpListener) -> Result<SocketAddr, Error> {
    l.local_addr().map_err(|source| Error::Io {
        what: "reading a bound address".into(),
        source,
    })
}

impl Sidecar {
    /// Validates `config` and binds every listener.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let tls = match (&config.tls_dir, &config.identity_url) {
            (Some(dir), _) => {
                let (tls, reloader) = load_tls(dir, &config)?;
                Some((tls, Renewal::Files(reloader)))
            }
            (None, Some(url)) => {
                let (tls, source) = certify(&config, url).await?;
                Some((tls, Renewal::Operator(source)))
            }
            (None, None) if config.plaintext_peers_in_process => {
                tracing::warn!(
                    "the peer port is plaintext (embedded without credentials): peers are neither authenticated nor authorized"
                );
                None
            }
            (None, None) => {
                return Err(Error::Config(
                    "--tls-dir or --identity-url is required: the peer port speaks mutual TLS only, with this pod's workload certificate (the webhook sets --identity-url; `ferryctl dev` sets --tls-dir)".into(),
                ));
            }
        };
        let app_grpc = bind("app-grpc-addr", config.app_grpc_addr).await?;
        let app_http = bind("app-http-addr", config.app_http_addr).await?;
        let peer = bind("peer-addr", config.peer_addr).await?;
        let admin = bind("admin-addr", config.admin_addr).await?;
        let peer_addr = local(&peer)?;
        let advertise = match config.advertise_addr {
            Some(a) => a,
            None if !peer_addr.ip().is_unspecified() => peer_addr,
            None => {
                return Err(Error::Config(format!(
                    "--advertise-addr: required when --peer-addr ({peer_addr}) is a wildcard address"
                )));
            }
        };
        let addrs = Addrs {
            app_grpc: local(&app_grpc)?,
            app_http: local(&app_http)?,
            peer: peer_addr,
            admin: local(&admin)?,
            advertise,
        };
        Ok(Self {
            config,
            listeners: [app_grpc, app_http, peer, admin],
            addrs,
            routing_status: None,
            tls,
        })
    }

    /// Reports `status` (from [`crate::routing::etcd::EtcdSource::status`]) in `/metrics`
    /// and `/readyz`.
    pub fn with_routing_status(mut self, status: Arc<SourceStatus>) -> Self {
        self.routing_status = Some(status);
        self
    }

    /// Its workload credentials (renewed in place), when it has any: what the operator's
    /// routing service authenticates it by.
    pub fn peer_tls(&self) -> Option<PeerTls> {
        self.tls.as_ref().map(|(tls, _)| tls.clone())
    }

    /// Where it listens.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Starts serving with routing tables from `source`.
    pub async fn start(self, source: Box<dyn RoutingSource>) -> Result<Running, Error> {
        let stop = CancellationToken::new();
        let (routing, routing_task) = source.start(stop.child_token())?;
        let addrs = self.addrs;
        let grace = self.config.shutdown_grace;
        let engine = Engine::new(
            self.config,
            addrs.advertise.to_string(),
            routing.clone(),
            stop.clone(),
            self.tls.as_ref().map(|(tls, _)| tls.clone()),
        );
        engine.open_existing().await;
        let ready = Arc::new(AtomicBool::new(false));
        let mut tasks: Vec<(&'static str, JoinHandle<()>)> = vec![("routing source", routing_task)];

        // Routing changes reconfigure the dispatchers.
        {
            let engine = engine.clone();
            let mut routing = routing.clone();
            let stop = stop.clone();
            tasks.push((
                "routing watch",
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            r = routing.changed() => if r.is_err() { return },
                            _ = stop.cancelled() => return,
                        }
                        let table = routing.borrow_and_update().clone();
                        // The zone first: the dispatchers route by it.
                        engine.placement.follow(&table);
                        engine.delivery.reconcile(&engine, &table).await;
                    }
                }),
            ));
        }
        // Links to sidecars that left the table are closed (and their reconnect loops).
        tasks.push((
            "peer link sweep",
            tokio::spawn(
                engine
                    .peers
                    .clone()
                    .run_sweep(routing.clone(), stop.clone()),
            ),
        ));
        // Replicated topics: trims to the replicas, re-learning custody after a start, and
        // taking over the copies of producers that are gone.
        tasks.push((
            "replica trims",
            tokio::spawn(
                engine
                    .replicator
                    .clone()
                    .run_trims(engine.clone(), stop.clone()),
            ),
        ));
        tasks.push((
            "replica re-learn",
            tokio::spawn(
                engine
                    .replicator
                    .clone()
                    .relearn(engine.clone(), stop.clone()),
            ),
        ));
        tasks.push((
            "replica takeover",
            tokio::spawn(crate::replica::takeover::run(engine.clone(), stop.clone())),
        ));
        // Consumer-side expiry.
        {
            let engine = engine.clone();
            let stop = stop.clone();
            tasks.push((
                "consumer sweep",
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(SWEEP_EVERY);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => engine.consumer.sweep(),
                            _ = stop.cancelled() => return,
                        }
                    }
                }),
            ));
        }

        let [app_grpc, app_http, peer, admin] = self.listeners;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_api::proto::FILE_DESCRIPTOR_SET)
            // The descriptor set holds the peer service too; the app port serves only the
            // app API, so reflection must not advertise the other one there.
            .with_service_name("ferry.v1.App")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .build_v1()
            .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
        let app = AppServer::new(AppService::new(engine.clone()))
            .max_decoding_message_size(APP_MAX_MESSAGE)
            .max_encoding_message_size(APP_MAX_MESSAGE);
        let server = grpc_server()
            .add_service(app)
            .add_service(reflection)
            .serve_with_incoming_shutdown(no_delay(app_grpc), stop.clone().cancelled_owned());
        tasks.push(("app gRPC", spawn_server("app gRPC", server)));

        let peer_svc = PeerServer::new(PeerService::new(engine.clone(), stop.clone()))
            .max_decoding_message_size(PEER_MAX_MESSAGE)
            .max_encoding_message_size(PEER_MAX_MESSAGE);
        let router = grpc_server().add_service(peer_svc);
        let server = match self.tls {
            Some((tls, renewal)) => {
                let incoming = crate::peer::tls::incoming(
                    peer,
                    &tls,
                    engine.metrics.peer_refused.clone(),
                    stop.clone(),
                )
                .map_err(|e| Error::Config(format!("peer TLS: {e}")))?;
                let renew = match renewal {
                    Renewal::Files(reloader) => tokio::spawn(reload_tls(
                        reloader,
                        tls,
                        engine.metrics.tls_reload_failed.clone(),
                        stop.clone(),
                    )),
                    Renewal::Operator(source) => tokio::spawn(source.renew(
                        tls,
                        engine.metrics.certificate_renewals.clone(),
                        engine.metrics.tls_reload_failed.clone(),
                        stop.clone(),
                    )),
                };
                tasks.push(("peer TLS renewal", renew));
                spawn_server(
                    "peer gRPC",
                    router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
                )
            }
            None => spawn_server(
                "peer gRPC",
                router.serve_with_incoming_shutdown(no_delay(peer), stop.clone().cancelled_owned()),
            ),
        };
        tasks.push(("peer gRPC", server));

        let router =
            http::router(engine.clone()).layer(RequestBodyLimitLayer::new(http::HTTP_MAX_BODY));
        tasks.push((
            "app HTTP",
            tokio::spawn(crate::http_server::serve(
                "app HTTP",
                app_http,
                router,
                stop.clone(),
            )),
        ));

        let router =
            crate::admin::router_with_routing(engine.clone(), ready.clone(), self.routing_status);
        tasks.push((
            "admin HTTP",
            tokio::spawn(crate::http_server::serve(
                "admin HTTP",
                admin,
                router,
                stop.clone(),
            )),
        ));

        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let drain = CancellationToken::new();
        let done = {
            let engine = engine.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = drain.cancelled() => {}
                    _ = stop.cancelled() => {}
                }
                let deadline = tokio::time::Instant::now() + grace;
                let drain_window = grace.mul_f64(crate::shutdown::DRAIN_SHARE);
                if !crate::shutdown::drain(&engine, drain_window).await {
                    crate::replica::handoff::hand_off(&engine, deadline).await;
                }
                engine.consumer.return_all("consumer sidecar shutting down");
                // Let the settlement streams carry those answers out.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let t0 = std::time::Instant::now();
                stop.cancel();
                engine.delivery.stop_all().await;
                tracing::debug!(elapsed = ?t0.elapsed(), "dispatchers stopped");
                let aborts: Vec<_> = tasks
                    .iter()
                    .map(|(name, t)| (*name, t.abort_handle()))
                    .collect();
                let all = futures::future::join_all(tasks.into_iter().map(|(_, t)| t));
                if tokio::time::timeout(JOIN_TIMEOUT, all).await.is_err() {
                    for (name, abort) in aborts {
                        if !abort.is_finished() {
                            tracing::warn!(task = name, "task did not stop in time; aborted");
                            abort.abort();
                        }
                    }
                }
                tracing::debug!(elapsed = ?t0.elapsed(), "tasks joined");
                for store in engine.open_stores() {
                    store.close().await;
                }
                tracing::info!(elapsed = ?t0.elapsed(), "stopped");
                Ok(())
            })
        };
        Ok(Running {
            engine,
            addrs,
            drain,
            done,
        })
    }
}

/// Accepted connections with `TCP_NODELAY`: a server fed its own listener does not apply
/// tonic's `tcp_nodelay` setting, and with Nagle's algorithm on, a small frame (an ack, a
/// settlement, one delivery) waits for the peer's delayed ACK, about 40 ms on Linux.
fn no_delay(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

fn spawn_server<F, E>(name: &'static str, server: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(server = name, error = %e, "server failed");
        }
    })
}

/// A serving sidecar.
#[derive(Debug)]
pub struct Running {
    engine: Arc<Engine>,
    addrs: Addrs,
    drain: CancellationToken,
    done: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// The engine (for tests and embedding).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Where it listens.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The line `main.rs` prints once everything is bound.
    pub fn ready_line(&self) -> String {
        let a = self.addrs;
        format!(
            "ferry-sidecar ready pod={} zone={} app_grpc={} app_http={} peer={} admin={}",
            self.engine.identity.pod,
            self.engine.placement.zone(),
            a.app_grpc,
            a.app_http,
            a.advertise,
            a.admin
        )
    }

    /// Starts the shutdown sequence (as SIGTERM does).
    pub fn shutdown(&self) {
        self.drain.cancel();
    }

    /// Waits until the sidecar has stopped.
    pub async fn wait(self) -> Result<(), Error> {
        self.done
            .await
            .map_err(|e| Error::Internal(format!("shutdown task: {e}")))?
    }
}
