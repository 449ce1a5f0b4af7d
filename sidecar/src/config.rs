//! The sidecar's configuration: one clap struct, every flag also readable from a `FERRY_`
//! environment variable (what the injection webhook sets), validated once at start so that
//! a bad value stops the sidecar with a message naming the flag instead of failing later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ferry_api::consts::IDENTITY_TOKEN_PATH;

use crate::error::Error;

/// Default of `--dedup-max-ids`: 2 minutes of ids at about 2,000 messages per second, about
/// 40 MiB at the limit.
pub const DEFAULT_DEDUP_MAX_IDS: usize = 1 << 18;
/// Default of `--replica-max-bytes`: the CRD's default `retention.maxBytes` (1Gi).
pub const DEFAULT_REPLICA_MAX_BYTES: u64 = 1 << 30;
/// Default of `--ordered-max-keys`: about 10 MiB of keys per ordered topic at the limit.
pub const DEFAULT_ORDERED_MAX_KEYS: usize = 100_000;
/// Default of `--max-unconfirmed-publishes`.
pub const DEFAULT_MAX_UNCONFIRMED_PUBLISHES: usize = 1 << 16;

/// Command line and environment of `ferry-sidecar`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ferry-sidecar",
    version,
    about = "The Ferry sidecar: app API, local log, forwarding and delivery"
)]
pub struct Config {
    /// Name of the pod this sidecar serves; part of its producer identity.
    #[arg(long, env = "FERRY_POD_NAME")]
    pub pod_name: String,
    /// Namespace of the pod; topics and subscriptions named without a namespace are here.
    #[arg(long, env = "FERRY_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Local mode only (`ferryctl dev` sets it from its pods file): the zone this sidecar
    /// routes by. With `--etcd-endpoints` it is ignored: a cluster's sidecar learns its
    /// zone from its pod record, which the operator writes with the node's
    /// `topology.kubernetes.io/zone` label (see `placement.rs`).
    #[arg(long, env = "FERRY_ZONE", default_value = "")]
    pub zone: String,
    /// Local mode only, as `--zone`: the node this sidecar runs on.
    #[arg(long, env = "FERRY_NODE", default_value = "")]
    pub node: String,
    /// How long after start `/readyz` waits for this pod's record (its zone) in the routing
    /// table before it turns ready without it, routing with no zone preference until the
    /// record arrives. The operator writes the record when the pod is scheduled, so it is
    /// normally there at once; a bound keeps a down operator from keeping pods unready.
    #[arg(long, env = "FERRY_POD_RECORD_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub pod_record_wait: Duration,
    /// Directory of the local logs; one subdirectory per topic.
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// App gRPC API; loopback only.
    #[arg(long, env = "FERRY_APP_GRPC_ADDR", default_value = "127.0.0.1:7700")]
    pub app_grpc_addr: SocketAddr,
    /// App HTTP/JSON API; loopback only.
    #[arg(long, env = "FERRY_APP_HTTP_ADDR", default_value = "127.0.0.1:7701")]
    pub app_http_addr: SocketAddr,
    /// Sidecar-to-sidecar gRPC listener.
    #[arg(long, env = "FERRY_PEER_ADDR", default_value = "0.0.0.0:7710")]
    pub peer_addr: SocketAddr,
    /// Peer address other sidecars dial (the member `address` in the routing table).
    /// Defaults to the bound peer address when that is not a wildcard.
    #[arg(long, env = "FERRY_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,
    /// Metrics, health and readiness.
    #[arg(long, env = "FERRY_ADMIN_ADDR", default_value = "0.0.0.0:7790")]
    pub admin_addr: SocketAddr,
    /// Local mode: a JSON `RoutingTable`, re-read when it changes.
    #[arg(long, env = "FERRY_ROUTING_FILE")]
    pub routing_file: Option<PathBuf>,
    /// Cluster mode: etcd client URLs (comma-separated) holding the routing table, listed
    /// and watched. Exclusive with `--routing-file`.
    #[arg(
        long,
        env = "FERRY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        conflicts_with = "routing_file"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Cluster mode without etcd access: the operator's routing service
    /// (`https://host:port`, the identity service's URL), which streams this pod's scoped
    /// view of the routing table over mutual TLS (needs `--identity-url` or `--tls-dir`,
    /// and `--identity-server`). Exclusive with `--routing-file` and `--etcd-endpoints`; the
    /// webhook sets it when the operator serves identities.
    #[arg(
        long,
        env = "FERRY_ROUTING_URL",
        conflicts_with_all = ["routing_file", "etcd_endpoints"],
        requires = "identity_server"
    )]
    pub routing_url: Option<String>,
    /// Time to drain the backlog after SIGTERM before exiting anyway (e.g. `25s`, `500ms`).
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Service account of the pod, checked against topics' `allowedPublishers`.
    #[arg(long, env = "FERRY_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// fsync interval of `DiskAsync` topics.
    #[arg(long, env = "FERRY_ASYNC_SYNC_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    pub async_sync_interval: Duration,
    /// Most message ids a topic's publish dedup window remembers. The window is time-based
    /// (`dedupWindow`), and at a high publish rate it would hold millions of ids; past this
    /// many the oldest are forgotten before their time (`ferry_sidecar_dedup_evicted_total`
    /// counts them), which shortens the window rather than growing memory without bound.
    /// About 150 bytes per id. The same bound holds for the message ids an `ExactlyOnce`
    /// subscription remembers as acked (`ferry_sidecar_exactly_once_evicted_total`).
    #[arg(long, env = "FERRY_DEDUP_MAX_IDS", default_value_t = DEFAULT_DEDUP_MAX_IDS)]
    pub dedup_max_ids: usize,
    /// Most keys per ordered topic whose last `key_sequence` is remembered. Past this many
    /// the least recently published key is forgotten (`ferry_sidecar_ordered_keys_evicted_total`):
    /// its next number then jumps ahead instead of going up by one, and never goes back.
    /// About 100 bytes per key.
    #[arg(long, env = "FERRY_ORDERED_MAX_KEYS", default_value_t = DEFAULT_ORDERED_MAX_KEYS)]
    pub ordered_max_keys: usize,
    /// Most `ACK_LEVEL_NONE` publishes accepted and not yet stored. The app hears back
    /// before the store does; past this many, a publish with that level waits until it is
    /// stored, like `ACK_LEVEL_STORED` (backpressure, as a Kafka producer with `acks=0`
    /// blocks once its buffer is full), so that a fast publisher cannot queue without bound
    /// (`ferry_sidecar_unconfirmed_publishes`, `ferry_sidecar_unconfirmed_publishes_waited_total`).
    #[arg(long, env = "FERRY_MAX_UNCONFIRMED_PUBLISHES", default_value_t = DEFAULT_MAX_UNCONFIRMED_PUBLISHES)]
    pub max_unconfirmed_publishes: usize,
    /// A replica takes custody of a producer's `Replicated` copies once the producer has not
    /// answered for this long (it does so at once when the producer's member record leaves
    /// the routing table). Shorter means faster recovery from a lost node and more
    /// duplicates when a producer was only cut off for a while.
    #[arg(long, env = "FERRY_REPLICA_TAKEOVER_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub replica_takeover_after: Duration,
    /// Most bytes of unsettled copies this sidecar holds as a replica per producer and
    /// topic when the topic's routing entry has no `retention.maxBytes` (0); otherwise that
    /// limit applies. Past it a `Replicate` gets RESOURCE_EXHAUSTED
    /// (`ferry_sidecar_replica_full_total`), so that no peer can fill this pod's disk.
    #[arg(long, env = "FERRY_REPLICA_MAX_BYTES", default_value_t = DEFAULT_REPLICA_MAX_BYTES)]
    pub replica_max_bytes: u64,
    /// Drain and exit, as on SIGTERM, once stdin reaches end of file. For a supervisor that
    /// runs the sidecar as its child with a pipe on its stdin (`ferryctl dev`, the process
    /// tests): the pipe closes when the supervisor dies, even by `kill -9`, so its sidecars
    /// never outlive it and keep its ports. Off by default: a container's stdin is empty,
    /// which would stop the sidecar at once.
    #[arg(long, env = "FERRY_DRAIN_ON_STDIN_EOF")]
    pub drain_on_stdin_eof: bool,
    /// Folder of this sidecar's workload certificate: `tls.crt` (chain, leaf first),
    /// `tls.key` and `ca.crt` (the trust bundle), the layout of a `kubernetes.io/tls`
    /// Secret. With it, every peer connection is mutual TLS and a peer is known by the
    /// identity its certificate proves; the files are re-read when they change (rotation).
    /// The certificate must name this pod's namespace and service account.
    #[arg(long, env = "FERRY_TLS_DIR", conflicts_with = "identity_url")]
    pub tls_dir: Option<PathBuf>,
    /// The operator's identity service (`https://HOST:PORT`), which issues this sidecar its
    /// workload certificate for its pod's projected token and renews it at half-life; the
    /// webhook sets it. The certificate stays in memory.
    #[arg(long, env = "FERRY_IDENTITY_URL", requires_all = ["identity_server", "identity_trust_anchors"])]
    pub identity_url: Option<String>,
    /// The identity (`spiffe://...`) the identity service must prove.
    #[arg(long, env = "FERRY_IDENTITY_SERVER")]
    pub identity_server: Option<String>,
    /// The CA certificates (PEM text) the identity service's certificate must chain to, until
    /// the service's answers bring the mesh's current bundle.
    #[arg(long, env = "FERRY_IDENTITY_TRUST_ANCHORS", hide_env_values = true)]
    pub identity_trust_anchors: Option<String>,
    /// Lets an embedding program (the in-process tests) run the peer port in plaintext,
    /// with no caller known and nothing authorized. No flag or variable sets it: the
    /// `ferry-sidecar` binary always needs `--tls-dir` or `--identity-url`.
    #[arg(skip)]
    pub plaintext_peers_in_process: bool,
    /// The pod's projected service-account token for the audience `ferry.dev/identity`.
    #[arg(long, env = "FERRY_IDENTITY_TOKEN_FILE", default_value = IDENTITY_TOKEN_PATH)]
    pub identity_token_file: PathBuf,
}

/// Parses a Go-style duration (`25s`, `1m30s`, `200ms`) as the CRDs write them.
fn parse_duration(s: &str) -> Result<Duration, String> {
    ferry_api::duration::parse(s).map_err(|e| e.to_string())
}

impl Config {
    /// A configuration for tests and embedding: loopback, random ports, the given data dir.
    pub fn local(pod_name: &str, namespace: &str, zone: &str, data_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            pod_name: pod_name.into(),
            namespace: namespace.into(),
            zone: zone.into(),
            node: format!("node-{zone}"),
            data_dir,
            app_grpc_addr: any,
            app_http_addr: any,
            peer_addr: any,
            advertise_addr: None,
            admin_addr: any,
            routing_file: None,
            etcd_endpoints: Vec::new(),
            routing_url: None,
            shutdown_grace: Duration::from_secs(5),
            service_account: "default".into(),
            async_sync_interval: Duration::from_millis(50),
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            ordered_max_keys: DEFAULT_ORDERED_MAX_KEYS,
            max_unconfirmed_publishes: DEFAULT_MAX_UNCONFIRMED_PUBLISHES,
            replica_takeover_after: Duration::from_secs(60),
            replica_max_bytes: DEFAULT_REPLICA_MAX_BYTES,
            tls_dir: None,
            identity_url: None,
            identity_server: None,
            identity_trust_anchors: None,
            identity_token_file: IDENTITY_TOKEN_PATH.into(),
            plaintext_peers_in_process: true,
            drain_on_stdin_eof: false,
            pod_record_wait: Duration::from_secs(10),
        }
    }

    /// Checks what clap cannot: names, loopback-only app API, a usable data dir.
    /// Whether the routing table comes from a cluster (etcd or the operator), where pod
    /// records say where this pod runs.
    pub fn cluster_routing(&self) -> bool {
        !self.etcd_endpoints.is_empty() || self.routing_url.is_some()
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |flag: &str, why: String| Err(Error::Config(format!("--{flag}: {why}")));
        if self.dedup_max_ids == 0 {
            return bad(
                "dedup-max-ids",
                "must be at least 1 (set a topic's dedupWindow to 0 to turn deduplication off)"
                    .into(),
            );
        }
        if self.ordered_max_keys == 0 {
            return bad("ordered-max-keys", "must be at least 1".into());
        }
        if self.max_unconfirmed_publishes == 0 {
            return bad("max-unconfirmed-publishes", "must be at least 1".into());
        }
        if self.pod_name.trim().is_empty() {
            return bad("pod-name", "must not be empty".into());
        }
        if self.namespace.trim().is_empty() || self.namespace.contains('/') {
            return bad(
                "namespace",
                format!("{:?} is not a namespace name", self.namespace),
            );
        }
        for (flag, addr) in [
            ("app-grpc-addr", self.app_grpc_addr),
            ("app-http-addr", self.app_http_addr),
        ] {
            if !addr.ip().is_loopback() {
                return bad(
                    flag,
                    format!(
                        "{addr} is not a loopback address; the app API listens on loopback only"
                    ),
                );
            }
        }
        if let Some(a) = self.advertise_addr
            && (a.ip().is_unspecified() || a.port() == 0)
        {
            return bad(
                "advertise-addr",
                format!("{a} cannot be dialed by other sidecars"),
            );
        }
        // clap's `conflicts_with` also sees the environment; this covers `Config` built in code.
        if self.routing_file.is_some() && !self.etcd_endpoints.is_empty() {
            return bad(
                "etcd-endpoints",
                "cannot be used with --routing-file: pick one routing source".into(),
            );
        }
        if self.routing_url.is_some()
            && (self.routing_file.is_some() || !self.etcd_endpoints.is_empty())
        {
            return bad(
                "routing-url",
                "cannot be used with --routing-file or --etcd-endpoints: pick one routing source"
                    .into(),
            );
        }
        if self.etcd_endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("etcd-endpoints", "an endpoint is empty".into());
        }
        if self.shutdown_grace.is_zero() {
            return bad("shutdown-grace", "must be greater than 0".into());
        }
        if let Err(e) = std::fs::create_dir_all(&self.data_dir) {
            return bad(
                "data-dir",
                format!("cannot create {}: {e}", self.data_dir.display()),
            );
        }
        Ok(())
    }

    /// `namespace/pod`: how this sidecar names itself to peers as a producer.
    pub fn producer_id(&self) -> String {
        format!("{}/{}", self.namespace, self.pod_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::try_parse_from([
            "ferry-sidecar",
            "--pod-name",
            "p",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.app_grpc_addr.port(), ferry_api::consts::APP_GRPC_PORT);
        assert_eq!(c.peer_addr.port(), ferry_api::consts::PEER_GRPC_PORT);
        c.validate().unwrap();
    }

    #[test]
    fn etcd_endpoints_exclude_the_routing_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let c = Config::try_parse_from([
            "ferry-sidecar",
            "--pod-name=p",
            "--data-dir",
            data,
            "--etcd-endpoints=http://a:2379,http://b:2379",
        ])
        .unwrap();
        assert_eq!(c.etcd_endpoints, ["http://a:2379", "http://b:2379"]);
        c.validate().unwrap();
        let both = Config::try_parse_from([
            "ferry-sidecar",
            "--pod-name=p",
            "--data-dir",
            data,
            "--etcd-endpoints=http://a:2379",
            "--routing-file=/tmp/r.json",
        ]);
        assert!(both.is_err());
        let mut c = Config::local("p", "ns", "z", dir.path().into());
        c.routing_file = Some("/tmp/r.json".into());
        c.etcd_endpoints = vec!["http://a:2379".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--etcd-endpoints"), "{e}");
    }

    #[test]
    fn app_api_must_be_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::local("p", "ns", "z", dir.path().into());
        c.app_http_addr = "0.0.0.0:7701".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--app-http-addr"), "{e}");
    }

    #[test]
    fn every_flag_is_documented_with_its_environment_variable() {
        use clap::CommandFactory;
        let breaches = ferry_api::flags::convention_breaches(&Config::command());
        assert!(breaches.is_empty(), "ferry-sidecar --help: {breaches:#?}");
    }
}
