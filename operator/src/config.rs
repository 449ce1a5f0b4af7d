//! Command-line flags and `FERRY_*` environment variables: one clap struct, validated once.
//!
//! Every flag has an environment variable of the same name with the `FERRY_` prefix
//! (`--etcd-endpoints` is `FERRY_ETCD_ENDPOINTS`), so that the Helm chart can set them
//! either way; `ferry-operator --help` lists both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ferry_api::consts::{
    OPERATOR_METRICS_PORT, OPERATOR_SERVICE_ACCOUNT, PEER_GRPC_PORT, WEBHOOK_PORT,
};
use ferry_api::identity::DEFAULT_TRUST_DOMAIN;
use ferry_api::routing::PREFIX;

use crate::error::{Error, Result};

/// Default etcd key that fences writers; outside the routing table's prefix so that no
/// sidecar ever reads it as a routing entry.
pub const DEFAULT_FENCE_KEY: &str = "/ferry/leader";

/// Default name of the Secret that holds the mesh's CA.
pub const DEFAULT_CA_SECRET: &str = "ferry-identity-ca";

/// Default image of the injected sidecar.
pub const DEFAULT_SIDECAR_IMAGE: &str = concat!(
    "ghcr.io/ferry-dev/ferry-sidecar:",
    env!("CARGO_PKG_VERSION")
);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The Ferry operator: reconciles Topics, ConsumerGroups and Subscriptions (and the pods a
/// group selects) into the routing table in etcd. Only the replica holding the Lease writes.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-operator", version, about, long_about = None)]
pub struct Config {
    /// etcd client URLs of the routing table, comma-separated
    /// (e.g. `http://etcd-0.etcd:2379,http://etcd-1.etcd:2379`).
    #[arg(
        long,
        env = "FERRY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,

    /// Timeout of each etcd request; a hung etcd fails the reconcile, which is retried with
    /// backoff, instead of blocking it.
    #[arg(long, env = "FERRY_ETCD_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,

    /// etcd key that fences the leader's writes (see the `etcd` module). Must lie outside
    /// the routing table's prefix `/ferry/v1/`.
    #[arg(long, env = "FERRY_FENCE_KEY", default_value = DEFAULT_FENCE_KEY)]
    pub fence_key: String,

    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "FERRY_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], OPERATOR_METRICS_PORT)))]
    pub metrics_addr: SocketAddr,

    /// Name of the `coordination.k8s.io/v1` Lease the replicas elect a leader on.
    #[arg(long, env = "FERRY_LEASE_NAME", default_value = "ferry-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (normally the operator's own).
    #[arg(long, env = "FERRY_LEASE_NAMESPACE", default_value = "ferry-system")]
    pub lease_namespace: String,

    /// This replica's identity in the Lease. Default: the host name (the pod name in a
    /// cluster) followed by a random suffix, so that two processes never share one.
    #[arg(long, env = "FERRY_IDENTITY")]
    pub identity: Option<String>,

    /// How long a Lease stays valid without renewal; a standby takes over after it.
    #[arg(long, env = "FERRY_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps writing without a successful renewal; it steps down
    /// after it. Must be shorter than --lease-duration.
    #[arg(long, env = "FERRY_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,

    /// Interval between two renewals or acquisition attempts. Must be shorter than
    /// --renew-deadline.
    #[arg(long, env = "FERRY_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,

    /// Peer gRPC port of the sidecars; a member's address is `podIP:PORT`.
    #[arg(long, env = "FERRY_SIDECAR_PEER_PORT", default_value_t = PEER_GRPC_PORT)]
    pub sidecar_peer_port: u16,

    /// Only reconcile Ferry resources and pods of this namespace (default: every
    /// namespace). Cross-namespace topics outside it are then not watched.
    #[arg(long, env = "FERRY_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Kubeconfig file; without it, the in-cluster service account (or `$KUBECONFIG`, or
    /// `~/.kube/config`) is used.
    #[arg(long, env = "FERRY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Folder with `tls.crt` and `tls.key` (a mounted `kubernetes.io/tls` Secret) for the
    /// sidecar-injection webhook; re-read when they change. Without it, no webhook is served.
    #[arg(long, env = "FERRY_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// Address of the sidecar-injection webhook (HTTPS, path `/mutate-pods`).
    #[arg(long, env = "FERRY_WEBHOOK_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], WEBHOOK_PORT)))]
    pub webhook_addr: SocketAddr,

    /// Image of the sidecar the webhook injects.
    #[arg(long, env = "FERRY_SIDECAR_IMAGE", default_value = DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,

    /// Defaults of the injected sidecar: a YAML file with `image`, `imagePullPolicy`,
    /// `resources`, `ports`, `etcdEndpoints` and `env` (the Helm chart's `sidecar.yaml`).
    /// Where it and a flag both set something, the file wins. Read once at start.
    #[arg(long, env = "FERRY_SIDECAR_CONFIG")]
    pub sidecar_config: Option<PathBuf>,

    /// Log format (the filter is `RUST_LOG`, default `info`).
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub workload_identity: IdentityFlags,
}

/// The identity service: the mesh's CA, issuing sidecars their workload certificates.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityFlags {
    /// Address of the identity service (`ferry.v1.Identity`, gRPC over TLS). Without it the
    /// operator issues no certificates and the webhook injects no identity settings, so the
    /// injected sidecars need another source of certificates (`--tls-dir`).
    #[arg(long, env = "FERRY_IDENTITY_ADDR")]
    pub identity_addr: Option<SocketAddr>,

    /// URL the injected sidecars reach the identity service at (e.g.
    /// `https://ferry-identity.ferry-system.svc:8444`, the chart's Service); the webhook puts
    /// it in their environment. Required with `--identity-addr`.
    #[arg(long, env = "FERRY_IDENTITY_URL")]
    pub identity_url: Option<String>,

    /// Trust domain of the workload identities (`spiffe://<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "FERRY_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Secret (`kubernetes.io/tls`, in `--lease-namespace`, the operator's own namespace)
    /// that holds the CA; made on first start when missing, or provided by cert-manager.
    #[arg(long, env = "FERRY_CA_SECRET", default_value = DEFAULT_CA_SECRET)]
    pub ca_secret: String,

    /// Lifetime of a workload certificate; sidecars renew at half of it.
    #[arg(long, env = "FERRY_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// Service account the operator runs as: the identity service proves
    /// `spiffe://<domain>/ns/<lease namespace>/sa/<this>` to the sidecars.
    #[arg(long, env = "FERRY_SERVICE_ACCOUNT", default_value = OPERATOR_SERVICE_ACCOUNT)]
    pub service_account: String,
}

impl Default for IdentityFlags {
    fn default() -> Self {
        Self {
            identity_addr: None,
            identity_url: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            ca_secret: DEFAULT_CA_SECRET.into(),
            workload_cert_ttl: Duration::from_secs(24 * 3600),
            service_account: OPERATOR_SERVICE_ACCOUNT.into(),
        }
    }
}

impl Config {
    /// A configuration with every default and the given etcd endpoints: what tests and
    /// embedders start from.
    pub fn new(etcd_endpoints: Vec<String>) -> Self {
        Self {
            etcd_endpoints,
            etcd_timeout: Duration::from_secs(5),
            fence_key: DEFAULT_FENCE_KEY.into(),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], OPERATOR_METRICS_PORT)),
            lease_name: "ferry-operator".into(),
            lease_namespace: "ferry-system".into(),
            identity: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            sidecar_peer_port: PEER_GRPC_PORT,
            watch_namespace: None,
            kubeconfig: None,
            webhook_cert_dir: None,
            webhook_addr: SocketAddr::from(([0, 0, 0, 0], WEBHOOK_PORT)),
            sidecar_image: DEFAULT_SIDECAR_IMAGE.into(),
            sidecar_config: None,
            log_format: LogFormat::Text,
            workload_identity: IdentityFlags::default(),
        }
    }

    /// Checks the values clap cannot check alone, and fills in the default identity.
    pub fn validate(mut self) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(m));
        self.etcd_endpoints = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if self.etcd_endpoints.is_empty() {
            return bad("--etcd-endpoints: at least one endpoint is required".into());
        }
        for endpoint in &self.etcd_endpoints {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"))
                .unwrap_or(endpoint);
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return bad(format!(
                    "--etcd-endpoints: {endpoint:?} is not a URL like http://HOST:PORT"
                ));
            }
        }
        if !self.fence_key.starts_with('/') || self.fence_key.starts_with(PREFIX) {
            return bad(format!(
                "--fence-key: {:?} must start with '/' and lie outside the routing table's prefix {PREFIX}",
                self.fence_key
            ));
        }
        for (flag, value) in [
            ("--lease-name", &self.lease_name),
            ("--lease-namespace", &self.lease_namespace),
        ] {
            if !is_dns_label(value) {
                return bad(format!("{flag}: {value:?} is not a DNS-1123 name"));
            }
        }
        if let Some(ns) = &self.watch_namespace
            && !is_dns_label(ns)
        {
            return bad(format!("--watch-namespace: {ns:?} is not a namespace name"));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return bad(
                "--lease-duration: must be at least 1s (the Lease counts whole seconds)".into(),
            );
        }
        if self.renew_deadline >= self.lease_duration {
            return bad(format!(
                "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?}): the leader must stop writing before a standby may take over",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return bad(format!(
                "--retry-period ({:?}) must be above zero and shorter than --renew-deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        if self.etcd_timeout.is_zero() {
            return bad("--etcd-timeout: must be above zero".into());
        }
        if self.sidecar_image.trim().is_empty() {
            return bad("--sidecar-image: must not be empty".into());
        }
        if let Some(dir) = &self.webhook_cert_dir
            && !dir.is_dir()
        {
            return bad(format!(
                "--webhook-cert-dir: {} is not a folder",
                dir.display()
            ));
        }
        if self.sidecar_peer_port == 0 {
            return bad("--sidecar-peer-port: must not be 0".into());
        }
        let w = &self.workload_identity;
        if w.identity_addr.is_some() != w.identity_url.is_some() {
            return bad(
                "--identity-addr and --identity-url go together: the service, and where the sidecars reach it".into(),
            );
        }
        if let Some(url) = &w.identity_url
            && !url.starts_with("https://")
        {
            return bad(format!("--identity-url: {url:?} must be an https:// URL"));
        }
        if w.workload_cert_ttl < Duration::from_secs(60) {
            return bad("--workload-cert-ttl: must be at least 1m".into());
        }
        if let Err(e) = ferry_api::identity::SpiffeId::new(
            &w.trust_domain,
            &self.lease_namespace,
            &w.service_account,
        ) {
            return bad(format!("--trust-domain/--service-account: {e}"));
        }
        match &self.identity {
            Some(id) if id.trim().is_empty() => return bad("--identity: must not be empty".into()),
            Some(_) => {}
            None => self.identity = Some(default_identity()),
        }
        Ok(self)
    }

    /// The identity, after [`Config::validate`] filled in the default.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(default_identity)
    }
}

/// Host name (the pod name in a cluster) plus a random suffix, as client-go's leader
/// election does: a restarted process never mistakes the previous one's lease for its own.
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "ferry-operator".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}_{}", &suffix[..8])
}

fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Parses a Go-style duration (`15s`, `1m30s`), the same syntax the CRDs use.
fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
    ferry_api::duration::parse(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, String> {
        let mut argv = vec!["ferry-operator"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_design() -> std::result::Result<(), String> {
        let config = parse(&["--etcd-endpoints", "http://127.0.0.1:2379"])?;
        assert_eq!(config.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(config.lease_duration, Duration::from_secs(15));
        assert_eq!(config.renew_deadline, Duration::from_secs(10));
        assert_eq!(config.sidecar_peer_port, 7710);
        assert_eq!(config.fence_key, "/ferry/leader");
        assert_eq!(config.webhook_addr.to_string(), "0.0.0.0:8443");
        assert!(config.webhook_cert_dir.is_none());
        let config = config.validate().map_err(|e| e.to_string())?;
        assert!(config.identity.is_some_and(|id| id.contains('_')));
        Ok(())
    }

    #[test]
    fn bad_values_are_rejected_naming_the_flag() -> std::result::Result<(), String> {
        let cases: [(&[&str], &str); 5] = [
            (&["--etcd-endpoints", "http://etcd"], "--etcd-endpoints"),
            (
                &[
                    "--etcd-endpoints",
                    "http://e:2379",
                    "--fence-key",
                    "/ferry/v1/leader",
                ],
                "--fence-key",
            ),
            (
                &[
                    "--etcd-endpoints",
                    "http://e:2379",
                    "--renew-deadline",
                    "20s",
                ],
                "--renew-deadline",
            ),
            (
                &["--etcd-endpoints", "http://e:2379", "--retry-period", "10s"],
                "--retry-period",
            ),
            (
                &[
                    "--etcd-endpoints",
                    "http://e:2379",
                    "--lease-name",
                    "Bad_Name",
                ],
                "--lease-name",
            ),
        ];
        for (args, flag) in cases {
            let error = parse(args)?
                .validate()
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert!(
                error.as_ref().is_err_and(|e| e.contains(flag)),
                "{args:?}: {error:?}"
            );
        }
        assert!(parse(&["--lease-duration", "15 seconds", "--etcd-endpoints", "x:1"]).is_err());
        Ok(())
    }

    #[test]
    fn every_flag_is_documented_with_its_environment_variable() {
        use clap::CommandFactory;
        let breaches = ferry_api::flags::convention_breaches(&Config::command());
        assert!(breaches.is_empty(), "ferry-operator --help: {breaches:#?}");
    }
}
