//! One end-to-end test's world on the local control plane: a namespace of its own, a
//! [`Fabric`] of pod network namespaces, a `ferry-operator` process that also serves the
//! sidecar-injection webhook (registered for the namespace), one Node per zone, and
//! "pods": a Pod created through the API server asking for injection, bound to its zone's
//! Node, given an IP in a network namespace, and its injected `ferry-sidecar` container run
//! from the mutated spec by the suite's [`kubelet`](crate::kubelet). Apps (`ferry-e2e-app`)
//! run next to their pod's sidecar.
//!
//! The sidecars reach the control plane's etcd (which listens on the host's loopback)
//! through one forwarder on the fabric's service address, which every pod reaches; the
//! operator's `sidecar.yaml` names it, as a platform team names its etcd Service.

mod apps;
mod pods;
mod webhook;

pub use crate::http::http_get;
pub use apps::AppProcess;
pub use pods::{APP_IMAGE, E2ePod, SERVICE_ACCOUNT};
pub use webhook::SIDECAR_IMAGE;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::binaries::{Binaries, binaries};
use crate::kubelet::Images;
use crate::netns::{Fabric, Zone};
use crate::toxic_proxy::ToxicProxy;
use crate::{CRDS_DIR, ControlPlane};

/// Deadline of waits for the operator and the sidecars to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);
/// A kubeconfig naming a remote cluster to test against; the suite refuses it (see
/// [`E2e::new`]) rather than silently testing something else.
pub const REMOTE_KUBECONFIG_ENV: &str = "FERRY_E2E_KUBECONFIG";

/// How a world's operator differs from the chart's defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Lifetime of the sidecars' workload certificates (`--workload-cert-ttl`, default
    /// 24 h); the sidecars renew at half of it.
    pub workload_cert_ttl: Option<Duration>,
}

/// The world of one end-to-end test.
pub struct E2e {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub fabric: Fabric,
    pub bins: Binaries,
    pub dir: tempfile::TempDir,
    /// What the world's kubelet can run: the built sidecar for [`SIDECAR_IMAGE`].
    images: Images,
    /// The sidecars' way to etcd, on the fabric's service address.
    etcd_forwarder: ToxicProxy,
    operator: Option<Child>,
    pods: BTreeMap<String, E2ePod>,
    apps: Vec<PathBuf>,
    next_app: u32,
}

impl E2e {
    /// Builds the binaries, joins the shared control plane, installs the CRDs, creates a
    /// namespace `e2e-<name>-<random>` with its `default` ServiceAccount (as the
    /// controller-manager would), the fabric, a Node per zone, starts the operator
    /// (watching that namespace only, with its own Lease and fencing key, serving the
    /// webhook) and registers its webhook for the namespace, waiting until it injects.
    pub async fn new(name: &str) -> Result<Self> {
        Self::with(name, Options::default()).await
    }

    /// [`E2e::new`] with `options` for the operator.
    pub async fn with(name: &str, options: Options) -> Result<Self> {
        if let Some(kubeconfig) = std::env::var_os(REMOTE_KUBECONFIG_ENV) {
            bail!(
                "{REMOTE_KUBECONFIG_ENV}={} is set, but this suite runs its pods as network \
                 namespaces beside the local control plane it starts, and cannot drive a \
                 remote cluster; for a kind cluster use kind-tests/kind/run.sh (see \
                 kind-tests/README.md), or unset it",
                kubeconfig.to_string_lossy()
            );
        }
        let bins = tokio::task::spawn_blocking(binaries).await??;
        let fabric = Fabric::new()?;
        let cp = ControlPlane::shared().await?;
        cp.install_crds(CRDS_DIR).await?;
        let client = cp.client().await?;
        let ns = format!("e2e-{name}-{}", random_suffix());
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": SERVICE_ACCOUNT}}))?;
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &account)
            .await
            .with_context(|| format!("creating serviceaccount {SERVICE_ACCOUNT} in {ns}"))?;
        let nodes: Api<Node> = Api::all(client.clone());
        for zone in [Zone::A, Zone::B] {
            let node: Node = serde_json::from_value(json!({"metadata": {
                "name": format!("{ns}-{}", zone.label()),
                "labels": {"topology.kubernetes.io/zone": zone.label()},
            }}))?;
            nodes.create(&PostParams::default(), &node).await?;
        }
        let etcd: SocketAddr = cp
            .etcd_endpoints()
            .trim_start_matches("http://")
            .parse()
            .context("the control plane's etcd endpoint")?;
        let listen = SocketAddr::from((fabric.service_ip(), 0));
        let etcd_forwarder = ToxicProxy::start(listen, etcd).await?;
        let dir = tempfile::Builder::new().prefix("ferry-e2e-").tempdir()?;
        let images = Images::default().with(
            SIDECAR_IMAGE,
            bins.sidecar.clone(),
            webhook::SIDECAR_ENTRYPOINT,
        );
        let mut world = Self {
            cp,
            client,
            ns,
            fabric,
            bins,
            dir,
            images,
            etcd_forwarder,
            operator: None,
            pods: BTreeMap::new(),
            apps: Vec::new(),
            next_app: 0,
        };
        let (webhook, ca) = world.start_operator(&options).await?;
        webhook::register(&world.client, &world.ns, webhook, &ca).await?;
        webhook::wait_injecting(&world.api::<Pod>()).await?;
        println!(
            "e2e world {}: files in {}",
            world.ns,
            world.dir.path().display()
        );
        Ok(world)
    }

    /// Starts the operator with a webhook certificate and `sidecar.yaml` of its own, and its
    /// identity service on the fabric's service address (as the chart runs it by default:
    /// the injected sidecars get their certificates from it, peer traffic is mutual TLS);
    /// returns the webhook's address and the CA that signed its certificate.
    async fn start_operator(&mut self, options: &Options) -> Result<(SocketAddr, Vec<u8>)> {
        let log = std::fs::File::create(self.dir.path().join("operator.log"))?;
        let metrics = free_port()?;
        let webhook_dir = self.dir.path().join("webhook");
        let ca = webhook::make_certs(&webhook_dir)?;
        let sidecar_config = self.dir.path().join("sidecar.yaml");
        webhook::write_sidecar_config(&sidecar_config, self.etcd_forwarder.listen)?;
        let webhook = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        // The identity service, where every pod reaches it (the chart's Service).
        let identity = {
            let listener = std::net::TcpListener::bind((self.fabric.service_ip(), 0))?;
            listener.local_addr()?
        };
        let ttl = options
            .workload_cert_ttl
            .map_or_else(|| "24h".to_owned(), |d| format!("{}s", d.as_secs()));
        let child = Command::new(&self.bins.operator)
            .args(["--etcd-endpoints", self.cp.etcd_endpoints()])
            .arg("--kubeconfig")
            .arg(self.cp.kubeconfig_path())
            .args([
                "--lease-namespace",
                &self.ns,
                "--lease-name",
                "ferry-operator",
            ])
            .args(["--fence-key", &format!("/ferry/e2e/{}/leader", self.ns)])
            .args(["--watch-namespace", &self.ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--identity", &format!("{}-operator", self.ns)])
            .args(["--lease-duration", "4s", "--renew-deadline", "3s"])
            .args(["--retry-period", "500ms"])
            .arg("--webhook-cert-dir")
            .arg(webhook_dir.join("certs"))
            .args(["--webhook-addr", &webhook.to_string()])
            .arg("--sidecar-config")
            .arg(&sidecar_config)
            .args(["--identity-addr", &identity.to_string()])
            .args(["--identity-url", &format!("https://{identity}")])
            .args(["--workload-cert-ttl", &ttl])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting ferry-operator")?;
        self.operator = Some(child);
        Ok((webhook, ca))
    }

    /// `kubectl apply` of a YAML text, with `namespace: default` turned into this world's.
    pub async fn apply_yaml(&self, label: &str, yaml: &str) -> Result<()> {
        let text = yaml.replace("namespace: default", &format!("namespace: {}", self.ns));
        let file = self.dir.path().join(format!("{label}.yaml"));
        std::fs::write(&file, text)?;
        let out = self
            .cp
            .kubectl([
                "apply".as_ref(),
                "-n".as_ref(),
                self.ns.as_ref(),
                "-f".as_ref(),
                file.as_os_str(),
            ])
            .await?;
        ensure!(
            out.status.success(),
            "kubectl apply {label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Waits until every Ferry object of the namespace is Ready (`kubectl wait`).
    pub async fn wait_all_ready(&self) -> Result<()> {
        let out = self
            .cp
            .kubectl([
                "wait",
                "--for=condition=Ready",
                "--timeout=60s",
                "topics.ferry.dev,consumergroups.ferry.dev,subscriptions.ferry.dev",
                "--all",
                "-n",
                &self.ns,
            ])
            .await?;
        ensure!(
            out.status.success(),
            "kubectl wait: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The world's folder: logs, sidecar data, app histories.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for E2e {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2e")
            .field("ns", &self.ns)
            .field("dir", &self.dir.path())
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        // Kill the processes first (apps die with `kill_on_drop`), then the fields drop:
        // the fabric deletes the network namespaces and the bridge. The namespace and the
        // Nodes stay in the shared control plane, which goes away with the test process.
        if let Some(mut operator) = self.operator.take() {
            let _ = operator.start_kill();
        }
        for pod in self.pods.values_mut() {
            if let Some(mut child) = pod.sidecar.take() {
                let _ = child.start_kill();
            }
        }
        // A failed test keeps its logs and histories for the post-mortem.
        if std::thread::panicking() || std::env::var_os("FERRY_E2E_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "e2e world {}: files kept in {}",
                self.ns,
                self.dir.path().display()
            );
        }
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    let n: u32 = rand::rng().random();
    format!("{:06x}", n & 0xff_ffff)
}

/// A free loopback port (bound, then released).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
