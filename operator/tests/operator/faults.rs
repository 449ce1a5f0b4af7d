//! Fault injection for the reliability rows: signals to real processes (etcd,
//! kube-apiserver, a `ferry-operator` process), a routing-table etcd of a test's own, a
//! private control plane, and reading counters off `/metrics`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use ferry_kind_tests::{CRDS_DIR, ControlPlane, wait_for_value};
use ferry_operator::etcd::EtcdStore;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use tokio::process::{Child, Command};

use crate::support::World;

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to `pid`.
pub async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .await
        .with_context(|| format!("kill -s {signal} {pid}"))?;
    ensure!(status.success(), "kill -s {signal} {pid}: {status}");
    Ok(())
}

/// The process state letter of `pid` from `/proc/PID/stat` (`T` while stopped).
pub fn process_state(pid: u32) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))
}

/// Stops `pid` with SIGSTOP and waits until the kernel reports it stopped.
pub async fn pause(pid: u32) -> Result<()> {
    signal(pid, "STOP").await?;
    wait_for_value(Duration::from_secs(5), || async {
        Ok((process_state(pid)? == 'T').then_some(()))
    })
    .await
    .with_context(|| format!("pid {pid} is stopped"))
}

/// Resumes `pid` with SIGCONT.
pub async fn resume(pid: u32) -> Result<()> {
    signal(pid, "CONT").await
}

/// SIGCONTs a paused process when dropped, so that a failing test never leaves etcd or the
/// API server frozen for the tests that come after it.
pub struct Paused(pub u32);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-s", "CONT", &self.0.to_string()])
            .status();
    }
}

/// The PID in `DIR/NAME.pid` of a control plane started by `control-plane.sh`.
pub fn control_plane_pid(cp: &ControlPlane, name: &str) -> Result<u32> {
    let file = cp.dir().join(format!("{name}.pid"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", file.display()))
}

/// `KEY=VALUE` lines of the control plane's `state.env`.
fn state(cp: &ControlPlane) -> Result<HashMap<String, String>> {
    let path = cp.dir().join("state.env");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// A private control plane (its own etcd and kube-apiserver, which a test may pause),
/// leaked so that a [`World`] can borrow it; [`stop_private`] stops it (and the script's
/// watchdog does when the test binary exits).
pub async fn private_world(name: &str) -> Result<World> {
    let cp: &'static ControlPlane = Box::leak(Box::new(ControlPlane::start().await?));
    println!("private control plane: {}", cp.start_report().trim());
    world_on(cp, name).await
}

/// Stops a control plane of [`private_world`] and deletes its folder.
pub async fn stop_private(cp: &ControlPlane) -> Result<()> {
    let output = Command::new("bash")
        .arg(ferry_kind_tests::control_plane::SCRIPT)
        .arg("stop")
        .arg(cp.dir())
        .arg("--rm")
        .stdin(Stdio::null())
        .output()
        .await
        .context("control-plane.sh stop")?;
    ensure!(
        output.status.success(),
        "control-plane.sh stop: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A [`World`] (CRDs, a fresh namespace) on the control plane `cp`.
pub async fn world_on(cp: &'static ControlPlane, name: &str) -> Result<World> {
    cp.install_crds(CRDS_DIR).await?;
    let client = cp.client().await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let ns = format!("op-{name}-{}", &suffix[..6]);
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns}
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let etcd =
        EtcdStore::connect(&[cp.etcd_endpoints().to_owned()], Duration::from_secs(5)).await?;
    Ok(World {
        cp,
        client,
        ns,
        etcd,
    })
}

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// An etcd process of the test's own for the routing table, separate from the API
/// server's (as in production, where the routing table has its own etcd), so that pausing
/// it leaves the API server working.
pub struct RoutingEtcd {
    pub endpoint: String,
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl RoutingEtcd {
    /// Starts the pinned etcd binary of `cp` in a temporary folder and waits until it
    /// answers.
    pub async fn start(cp: &ControlPlane) -> Result<Self> {
        let bin = PathBuf::from(
            state(cp)?
                .get("FERRY_ETCD_BIN")
                .context("FERRY_ETCD_BIN in state.env")?,
        )
        .join("etcd");
        let dir = tempfile::Builder::new()
            .prefix("ferry-routing-etcd-")
            .tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = Command::new(&bin)
            .arg("--name=routing")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=routing={peer_url}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let etcd = Self {
            endpoint,
            child,
            _dir: dir,
        };
        wait_for_value(Duration::from_secs(30), || async {
            let store =
                EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(1))
                    .await?;
            store.get_prefix("/ferry/").await?;
            Ok(Some(()))
        })
        .await
        .context("the routing etcd answers")?;
        Ok(etcd)
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("the routing etcd has exited")
    }

    pub async fn store(&self) -> Result<EtcdStore> {
        Ok(
            EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
                .await?,
        )
    }
}

pub use ferry_kind_tests::http::http_get;

/// The sum of the samples of metric `name` (exact name, before `{` or the value) whose
/// labels contain every one of `labels` (e.g. `reason="etcd"`).
pub fn metric_sum(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            let (metric, rest) = sample.split_once('{').unwrap_or((sample, ""));
            (metric == name && labels.iter().all(|l| rest.contains(l)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .fold(0.0, |sum, v| sum + v)
}

/// Lines of a log file that contain `needle`.
pub fn log_lines(path: &Path, needle: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect())
}

/// Fails unless the operator task is still running.
pub fn ensure_running(task: &tokio::task::JoinHandle<ferry_operator::Result<()>>) -> Result<()> {
    if task.is_finished() {
        bail!("the operator task ended");
    }
    Ok(())
}
