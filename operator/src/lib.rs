//! The Ferry operator: turns Topics, ConsumerGroups and Subscriptions (and the pods a
//! group selects) into the routing table in etcd that every sidecar follows.
//!
//! Layout, one concern per module:
//! - [`config`]: the flags and `FERRY_*` environment variables (one clap struct), validated;
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease, and the
//!   [`leader::LeaseGuard`] that every write checks;
//! - [`etcd`]: the store over `etcd-client`: reads, and writes fenced by the leader's claim
//!   on a fencing key (the scheme is documented there);
//! - [`desired`]: pure functions: a resource → its keys and values, pods and nodes → a
//!   group's members, desired against actual → puts and deletes;
//! - [`reconcile`]: one reconciler per kind (`topic`, `group`, `subscription`), the
//!   shared context, error policy and status writes;
//! - [`controllers`]: the controllers and their watches;
//! - [`metrics`] and [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`;
//! - [`webhook`]: the sidecar-injection admission webhook, served over TLS by every replica;
//! - [`identity`]: the mesh's certificate authority: workload certificates for sidecars whose
//!   pod an API-server TokenReview vouches for;
//! - [`error`]: the one error type.
//!
//! [`run`] is the whole operator: `main.rs` only parses flags, sets up logging and handles
//! signals, and tests run [`spawn`] in process.

pub mod config;
pub mod controllers;
pub mod desired;
pub mod error;
pub mod etcd;
pub mod http;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod routing;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
pub use error::{Error, Result};

use crate::etcd::EtcdStore;
use crate::http::{Health, Phase};
use crate::leader::{LeaderElector, Timings};
use crate::metrics::Metrics;

/// A started operator.
#[derive(Debug)]
pub struct Running {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (the real port when the
    /// configuration asked for port 0).
    pub metrics_addr: SocketAddr,
    /// Where the webhook is served, when `--webhook-cert-dir` is set.
    pub webhook_addr: Option<SocketAddr>,
    /// Where the identity service is served, when `--identity-addr` is set.
    pub identity_addr: Option<SocketAddr>,
    /// The metrics, for in-process observers.
    pub metrics: Arc<Metrics>,
    /// Completes when the operator has stopped (after `shutdown` was cancelled).
    pub task: JoinHandle<Result<()>>,
}

/// Runs the operator until `shutdown` is cancelled; on the way out it hands the Lease
/// back so that a standby takes over at once.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let running = spawn(config, shutdown).await?;
    running
        .task
        .await
        .map_err(|join| Error::Internal(format!("the operator task failed: {join}")))?
}

/// Starts the operator: validates the configuration, builds the clients, binds the metrics
/// address, and runs the election loop in a task.
pub async fn spawn(config: Config, shutdown: CancellationToken) -> Result<Running> {
    let config = config.validate()?;
    let client = kube_client(&config).await?;
    let store = EtcdStore::connect(&config.etcd_endpoints, config.etcd_timeout).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: config.metrics_addr.to_string(),
            source,
        })?;
    let metrics_addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.metrics_addr.to_string(),
        source,
    })?;
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    // Every replica follows the routing table for the routing service, leader or not.
    let routing = config.workload_identity.identity_addr.map(|_| {
        routing::follow::spawn(
            config.etcd_endpoints.clone(),
            config.etcd_timeout,
            shutdown.clone(),
        )
    });
    let identity =
        identity::service::start(&config, client.clone(), routing, shutdown.clone()).await?;
    let published = identity.as_ref().map(|s| s.published.clone());
    let (webhook_addr, webhook) = match &config.webhook_cert_dir {
        Some(dir) => {
            let (addr, task) = start_webhook(&config, dir, published, shutdown.clone()).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let identity_addr = identity.as_ref().map(|s| s.addr);
    let task = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let result = lead(config, client, store, metrics, health, shutdown).await;
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "the metrics server failed"),
                Err(error) => warn!(%error, "the metrics server task failed"),
            }
            if let Some(identity) = identity {
                match identity.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn!(%error, "the identity service failed"),
                    Err(error) => warn!(%error, "the identity service task failed"),
                }
            }
            if let Some(webhook) = webhook {
                match webhook.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn!(%error, "the webhook server failed"),
                    Err(error) => warn!(%error, "the webhook server task failed"),
                }
            }
            result
        }
    });
    Ok(Running {
        metrics_addr,
        webhook_addr,
        identity_addr,
        metrics,
        task,
    })
}

/// Binds the webhook's address and serves it over TLS until `shutdown`.
async fn start_webhook(
    config: &Config,
    cert_dir: &std::path::Path,
    identity: Option<identity::service::Published>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let tls = webhook::tls::server_config(cert_dir)?;
    let listen_error = |source| Error::Listen {
        addr: config.webhook_addr.to_string(),
        source,
    };
    let tcp = TcpListener::bind(config.webhook_addr)
        .await
        .map_err(listen_error)?;
    let listener = webhook::tls::TlsListener::new(tcp, tls).map_err(listen_error)?;
    let addr = axum::serve::Listener::local_addr(&listener).map_err(listen_error)?;
    let mut injection = webhook::defaults::injection(config)?;
    injection.identity = identity;
    let router = webhook::router(injection);
    info!(%addr, "serving the sidecar-injection webhook");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    Ok((addr, task))
}

async fn kube_client(config: &Config) -> Result<Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::KubeConfig(e.to_string()))?,
    };
    Client::try_from(kube_config).map_err(Error::Kube)
}

/// The election loop: stand by until the Lease is ours, claim the fencing key, run the
/// controllers until leadership is lost or shutdown, release, and start over.
async fn lead(
    config: Config,
    client: Client,
    store: EtcdStore,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<()> {
    let identity = config.identity();
    let elector = LeaderElector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        Timings {
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            retry_period: config.retry_period,
        },
    );
    let settings = controllers::Settings {
        peer_port: config.sidecar_peer_port,
        namespace: config.watch_namespace.clone(),
    };
    loop {
        health.set(Phase::Standby);
        info!(%identity, lease = %config.lease_name, "standing by for the lease");
        let Some(leadership) = elector.acquire(&store, &config.fence_key, &shutdown).await else {
            break;
        };
        let term = leadership.term;
        metrics.term.set(i64::try_from(term).unwrap_or(i64::MAX));
        match store
            .claim(&config.fence_key, &identity, term, leadership.guard.clone())
            .await
        {
            Ok(writer) => {
                info!(%identity, term, "leading: controllers start");
                health.set(Phase::Leading);
                metrics.leader.set(1);
                let stop = shutdown.child_token();
                let guard = leadership.guard.clone();
                let stopper = tokio::spawn({
                    let stop = stop.clone();
                    async move {
                        tokio::select! {
                            () = guard.lost() => stop.cancel(),
                            () = stop.cancelled() => {}
                        }
                    }
                });
                controllers::run(
                    client.clone(),
                    writer,
                    metrics.clone(),
                    settings.clone(),
                    stop.clone(),
                )
                .await;
                stop.cancel();
                stopper.abort();
                metrics.leader.set(0);
                info!(%identity, term, "stopped leading");
            }
            Err(error) => warn!(%identity, term, %error, "claiming the fencing key failed"),
        }
        elector.release(leadership).await;
        if shutdown.is_cancelled() {
            break;
        }
        // Let another replica (or a recovered etcd) have a turn before trying again.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    Ok(())
}
