//! One end-to-end test's world on the local control plane: a namespace of its own, a
//! [`Fabric`] of pod network namespaces, a `ferry-operator` process, one Node per zone,
//! and "pods": a Pod object created through the API server with its status set as a
//! kubelet would (IP, Ready), and a `ferry-sidecar` process in the pod's namespace with
//! that IP. Apps (`ferry-e2e-app`) run next to their pod's sidecar.
//!
//! The sidecars reach the control plane's etcd (which listens on the host's loopback)
//! through a forwarder on each zone's gateway address.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::app_events::{AppEvent, read_events};
use crate::binaries::{Binaries, binaries};
use crate::netns::{Fabric, NetPod, PEER_PORT, Zone};
use crate::toxic_proxy::ToxicProxy;
use crate::{CRDS_DIR, ControlPlane, wait_for_value};

/// Deadline of waits for the operator and the sidecars to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);
/// A kubeconfig naming a remote cluster to test against; the suite refuses it (see
/// [`E2e::new`]) rather than silently testing something else.
pub const REMOTE_KUBECONFIG_ENV: &str = "FERRY_E2E_KUBECONFIG";
/// Field manager of what the suite applies.
const MANAGER: &str = "ferry-e2e";

/// A pod of the world: its namespace, and its sidecar while one runs.
#[derive(Debug)]
pub struct E2ePod {
    pub name: String,
    pub net: NetPod,
    pub labels: BTreeMap<String, String>,
    sidecar: Option<Child>,
    data_dir: PathBuf,
}

/// A running `ferry-e2e-app`; killed when dropped.
#[derive(Debug)]
pub struct AppProcess {
    pub pod: String,
    pub history: PathBuf,
    child: Child,
}

impl AppProcess {
    /// Its history so far.
    pub fn events(&self) -> Result<Vec<AppEvent>> {
        Ok(read_events(&self.history)?)
    }

    /// Waits until its history has an event that satisfies `check`.
    pub async fn wait_event(&self, what: &str, check: impl Fn(&AppEvent) -> bool) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            Ok(self.events()?.iter().any(&check).then_some(()))
        })
        .await
        .with_context(|| format!("app on {}: {what}", self.pod))
    }

    /// Waits for a publisher's `done`.
    pub async fn wait_done(&self) -> Result<()> {
        self.wait_event("publishes everything", |e| {
            matches!(e, AppEvent::Done { .. })
        })
        .await
    }

    /// Waits for a consumer's `subscribed`.
    pub async fn wait_subscribed(&self) -> Result<()> {
        self.wait_event("subscribes", |e| matches!(e, AppEvent::Subscribed { .. }))
            .await
    }

    /// Kills it (`SIGKILL`) and reaps it.
    pub async fn kill(mut self) -> Result<()> {
        self.child.start_kill().ok();
        self.child.wait().await?;
        Ok(())
    }
}

/// The world of one end-to-end test.
pub struct E2e {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub fabric: Fabric,
    pub bins: Binaries,
    pub dir: tempfile::TempDir,
    etcd_forwarders: BTreeMap<Zone, ToxicProxy>,
    operator: Option<Child>,
    pods: BTreeMap<String, E2ePod>,
    apps: Vec<PathBuf>,
    next_app: u32,
}

impl E2e {
    /// Builds the binaries, joins the shared control plane, installs the CRDs, creates a
    /// namespace `e2e-<name>-<random>`, the fabric, a Node per zone, and starts the
    /// operator (watching that namespace only, with its own Lease and fencing key).
    pub async fn new(name: &str) -> Result<Self> {
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
        let mut etcd_forwarders = BTreeMap::new();
        for zone in [Zone::A, Zone::B] {
            let listen = SocketAddr::from((fabric.gateway(zone), 0));
            etcd_forwarders.insert(zone, ToxicProxy::start(listen, etcd).await?);
        }
        let dir = tempfile::Builder::new().prefix("ferry-e2e-").tempdir()?;
        let mut world = Self {
            cp,
            client,
            ns,
            fabric,
            bins,
            dir,
            etcd_forwarders,
            operator: None,
            pods: BTreeMap::new(),
            apps: Vec::new(),
            next_app: 0,
        };
        world.start_operator().await?;
        println!(
            "e2e world {}: files in {}",
            world.ns,
            world.dir.path().display()
        );
        Ok(world)
    }

    async fn start_operator(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("operator.log"))?;
        let metrics = free_port()?;
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
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting ferry-operator")?;
        self.operator = Some(child);
        Ok(())
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

    /// Creates pod `name` in `zone` with `labels`: a network namespace with a new IP, a
    /// Pod with a `ferry-sidecar` native sidecar on the zone's Node, status Running and
    /// Ready with that IP, and the sidecar process (waited on until it answers `/readyz`).
    pub async fn add_pod(
        &mut self,
        name: &str,
        zone: Zone,
        labels: &BTreeMap<String, String>,
    ) -> Result<Ipv4Addr> {
        ensure!(!self.pods.contains_key(name), "pod {name} exists");
        let net = self.fabric.add_pod(name, zone)?;
        let ip = net.ip;
        let manifest: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": format!("{}-{}", self.ns, zone.label()),
                "initContainers": [{"name": "ferry-sidecar", "image": "ferry/sidecar", "restartPolicy": "Always"}],
                "containers": [{"name": "app", "image": "ferry/e2e-app"}],
            }
        }))?;
        self.api::<Pod>()
            .create(&PostParams::default(), &manifest)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        let data_dir = self.dir.path().join("data").join(format!("{name}-{ip}"));
        self.pods.insert(
            name.to_owned(),
            E2ePod {
                name: name.to_owned(),
                net,
                labels: labels.clone(),
                sidecar: None,
                data_dir,
            },
        );
        self.start_sidecar(name).await?;
        self.set_ready(name, true).await?;
        Ok(ip)
    }

    /// Starts the pod's sidecar (again, on the same data dir) and waits until it is ready.
    pub async fn start_sidecar(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let etcd = self
            .etcd_forwarders
            .get(&pod.net.zone)
            .map(|p| format!("http://{}", p.listen))
            .context("etcd forwarder")?;
        let log_path = self.dir.path().join(format!("sidecar-{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = self
            .fabric
            .command(&pod.net, &self.bins.sidecar)
            .env("FERRY_POD_NAME", name)
            .env("FERRY_NAMESPACE", &self.ns)
            .env("FERRY_ZONE", pod.net.zone.label())
            .env(
                "FERRY_NODE",
                format!("{}-{}", self.ns, pod.net.zone.label()),
            )
            .env("FERRY_DATA_DIR", &pod.data_dir)
            .env("FERRY_ETCD_ENDPOINTS", etcd)
            .env(
                "FERRY_ADVERTISE_ADDR",
                format!("{}:{PEER_PORT}", pod.net.ip),
            )
            .env("FERRY_SHUTDOWN_GRACE", "5s")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the sidecar of {name}"))?;
        let admin = SocketAddr::from((pod.net.ip, 7790));
        if let Some(pod) = self.pods.get_mut(name) {
            pod.sidecar = Some(child);
        }
        wait_for_value(CONVERGE, || async {
            let (status, _) = http_get(admin, "/readyz").await?;
            Ok((status == 200).then_some(()))
        })
        .await
        .with_context(|| format!("the sidecar of {name} is ready ({})", log_path.display()))
    }

    /// Kills the pod's sidecar (`SIGKILL`).
    pub async fn kill_sidecar(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get_mut(name)
            .with_context(|| format!("no pod {name}"))?;
        if let Some(mut child) = pod.sidecar.take() {
            child.start_kill().ok();
            child.wait().await?;
        }
        Ok(())
    }

    /// Sets the pod's status as a kubelet would: Running, its IP, Ready true or false.
    pub async fn set_ready(&self, name: &str, ready: bool) -> Result<()> {
        let ip = self.pod(name)?.net.ip.to_string();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        }});
        self.api::<Pod>()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting the status of pod {name}"))?;
        Ok(())
    }

    /// Deletes the pod's Pod object (grace 0) and waits until it is gone; its sidecar and
    /// namespace stay until [`E2e::destroy_pod`].
    pub async fn delete_pod_object(&self, name: &str) -> Result<()> {
        let grace = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        self.api::<Pod>().delete(name, &grace).await?;
        wait_for_value(CONVERGE, || async {
            Ok(self
                .api::<Pod>()
                .get_opt(name)
                .await?
                .is_none()
                .then_some(()))
        })
        .await
        .with_context(|| format!("pod {name} is gone"))
    }

    /// Kills the pod's sidecar and deletes its network namespace (what is left of a pod
    /// after [`E2e::delete_pod_object`]); the name can then be used again.
    pub async fn destroy_pod(&mut self, name: &str) -> Result<()> {
        self.kill_sidecar(name).await?;
        if let Some(pod) = self.pods.remove(name) {
            self.fabric.remove_pod(&pod.net)?;
        }
        Ok(())
    }

    /// The member entry of `pod` in `group` (JSON), if any.
    pub async fn member(&self, group: &str, pod: &str) -> Result<Option<serde_json::Value>> {
        let key = format!("/ferry/v1/members/{}/{group}/{pod}", self.ns);
        let out = self.cp.etcdctl(["get", "--print-value-only", &key]).await?;
        ensure!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(text)?))
    }

    pub fn pod(&self, name: &str) -> Result<&E2ePod> {
        self.pods
            .get(name)
            .with_context(|| format!("no pod {name}"))
    }

    /// Starts `ferry-e2e-app ARGS` in the pod's namespace, history in a new file.
    pub async fn app(&mut self, pod: &str, args: &[&str]) -> Result<AppProcess> {
        self.next_app += 1;
        let history = self
            .dir
            .path()
            .join(format!("app-{}-{pod}.jsonl", self.next_app));
        let log = std::fs::File::create(history.with_extension("log"))?;
        let net = self.pod(pod)?.net.clone();
        let child = self
            .fabric
            .command(&net, &self.bins.app)
            .arg("--history")
            .arg(&history)
            .args(["--pod", pod])
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting ferry-e2e-app on {pod}"))?;
        self.apps.push(history.clone());
        Ok(AppProcess {
            pod: pod.to_owned(),
            history,
            child,
        })
    }

    /// A consumer app: `consume --subscription <ns>/<sub> --group <group>`, waited on
    /// until it is subscribed.
    pub async fn consumer(
        &mut self,
        pod: &str,
        subscription: &str,
        group: &str,
    ) -> Result<AppProcess> {
        let sub = format!("{}/{subscription}", self.ns);
        let app = self
            .app(pod, &["consume", "--subscription", &sub, "--group", group])
            .await?;
        app.wait_subscribed().await?;
        Ok(app)
    }

    /// A publisher app: `count` messages `<prefix>-<i>` to `<ns>/<topic>` (plus `extra`
    /// arguments), waited on until it is done.
    pub async fn publish(
        &mut self,
        pod: &str,
        topic: &str,
        prefix: &str,
        count: u64,
        extra: &[&str],
    ) -> Result<AppProcess> {
        let topic = format!("{}/{topic}", self.ns);
        let count = count.to_string();
        let mut args = vec![
            "publish", "--topic", &topic, "--prefix", prefix, "--count", &count,
        ];
        args.extend_from_slice(extra);
        let app = self.app(pod, &args).await?;
        app.wait_done().await?;
        Ok(app)
    }

    /// Every history line of every app of this world, file by file.
    pub fn events(&self) -> Result<Vec<AppEvent>> {
        let mut all = Vec::new();
        for path in &self.apps {
            all.extend(read_events(path)?);
        }
        Ok(all)
    }

    /// Ids delivered to `member` (in arrival order, repeats included).
    pub fn delivered_to(&self, member: &str) -> Result<Vec<String>> {
        Ok(self
            .events()?
            .into_iter()
            .filter_map(|e| match e {
                AppEvent::Delivered { member: m, id, .. } if m == member => Some(id),
                _ => None,
            })
            .collect())
    }

    /// Waits until `check` holds for the current events.
    pub async fn wait_events(&self, what: &str, check: impl Fn(&[AppEvent]) -> bool) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            Ok(check(&self.events()?).then_some(()))
        })
        .await
        .with_context(|| what.to_owned())
    }

    /// The pod names of a group's members in the routing table.
    pub async fn members(&self, group: &str) -> Result<Vec<String>> {
        let prefix = format!("/ferry/v1/members/{}/{group}/", self.ns);
        let out = self
            .cp
            .etcdctl(["get", "--prefix", "--keys-only", &prefix])
            .await?;
        ensure!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Waits until a group's members are exactly `expected` (sorted pod names).
    pub async fn wait_members(
        &self,
        group: &str,
        expected: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let mut want: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        wait_for_value(timeout, || async {
            let mut found = self.members(group).await?;
            found.sort();
            Ok((found == want).then_some(()))
        })
        .await
        .with_context(|| format!("members of {group} become {expected:?}"))
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

    /// Server-side applies a JSON manifest (without namespace) as the suite.
    pub async fn apply_json<K>(&self, object: serde_json::Value) -> Result<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("manifest without metadata.name"))?
            .to_owned();
        Ok(self
            .api::<K>()
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?)
    }

    /// A sidecar's log so far.
    pub fn sidecar_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("sidecar-{name}.log")))
            .unwrap_or_default()
    }

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
        // Sidecars and the operator are killed on drop (`kill_on_drop`); the fabric then
        // deletes the namespaces. Nodes are cluster-scoped: delete them in the background
        // of the shared control plane, best effort.
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

/// `GET path` over plain HTTP/1.1: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .context("reading the HTTP response")??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Fails if any pod's sidecar has exited (a crash is a failure, not a slow convergence).
pub fn ensure_sidecars_alive(world: &mut E2e) -> Result<()> {
    for pod in world.pods.values_mut() {
        if let Some(child) = pod.sidecar.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("the sidecar of {} exited: {status}", pod.name);
        }
    }
    Ok(())
}
