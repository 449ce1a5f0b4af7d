//! A real etcd and kube-apiserver on loopback, driven by `kind-tests/control-plane.sh`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::process::Command;
use tokio::sync::OnceCell;

/// The control-plane script (install, start, stop, env, status).
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/control-plane.sh");

/// How long [`ControlPlane::install_crds`] waits for each CRD to be `Established`.
pub const CRD_TIMEOUT: Duration = Duration::from_secs(30);

/// The result of `control-plane.sh install`, run once per process.
static INSTALLED: OnceCell<std::result::Result<String, String>> = OnceCell::const_new();

/// The control plane shared by the tests of one test binary.
static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

/// A running etcd and kube-apiserver, state in a temporary folder.
///
/// Dropping it stops both processes and deletes the folder. If the process ends without
/// dropping it (a `static`, a panic that aborts, a killed test), the script's watchdog
/// notices that this process is gone and does the same within a second.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    etcd_endpoints: String,
    apiserver_url: String,
    etcd_version: String,
    kube_version: String,
    kubectl: PathBuf,
    etcdctl: PathBuf,
    start_report: String,
}

impl ControlPlane {
    /// Builds (first time only) and caches the pinned binaries: `control-plane.sh install`,
    /// run at most once per process. Returns the versions and paths it printed.
    pub async fn install() -> Result<String> {
        let result = INSTALLED
            .get_or_init(|| async {
                run_script(&["install"])
                    .await
                    .map_err(|error| format!("{error:#}"))
            })
            .await;
        result.clone().map_err(|error| anyhow!(error))
    }

    /// Starts a new control plane of its own in a fresh temporary folder and waits until
    /// etcd is healthy and kube-apiserver is ready.
    pub async fn start() -> Result<Self> {
        Self::install().await?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-control-plane-")
            .tempdir()
            .context("creating a folder for the control plane")?
            // From here on the folder belongs to the script: `stop --rm` (from `Drop` or
            // the watchdog) deletes it.
            .keep();
        let dir_arg = dir.to_string_lossy().into_owned();
        let pid = std::process::id().to_string();
        let start_report =
            match run_script(&["start", &dir_arg, "--parent-pid", &pid, "--rm"]).await {
                Ok(report) => report,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(error);
                }
            };
        let state = read_state(&dir.join("state.env"))?;
        let get = |key: &str| {
            state
                .get(key)
                .cloned()
                .with_context(|| format!("{key} is missing from {}/state.env", dir.display()))
        };
        Ok(Self {
            kubeconfig: PathBuf::from(get("KUBECONFIG")?),
            etcd_endpoints: get("FERRY_ETCD_ENDPOINTS")?,
            apiserver_url: get("FERRY_APISERVER_URL")?,
            etcd_version: get("FERRY_ETCD_VERSION")?,
            kube_version: get("FERRY_KUBE_VERSION")?,
            kubectl: Path::new(&get("FERRY_KUBE_BIN")?).join("kubectl"),
            etcdctl: Path::new(&get("FERRY_ETCD_BIN")?).join("etcdctl"),
            start_report,
            dir,
        })
    }

    /// The control plane shared by all tests in this test binary, started on first use.
    ///
    /// Tests share its etcd and API server, so give each test its own namespace and etcd
    /// key prefix. It is never dropped; the watchdog stops it when the test binary exits.
    pub async fn shared() -> Result<&'static Self> {
        SHARED.get_or_try_init(Self::start).await
    }

    /// A new client for the API server, authenticated as an admin (`system:masters`).
    ///
    /// Make one per test (per tokio runtime): a client's connections belong to the runtime
    /// that made them.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", self.kubeconfig.display()))?;
        Client::try_from(config).context("building a kube client")
    }

    /// etcd's client URL (`http://127.0.0.1:PORT`), as `FERRY_ETCD_ENDPOINTS` takes it.
    pub fn etcd_endpoints(&self) -> &str {
        &self.etcd_endpoints
    }

    /// The admin kubeconfig.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:PORT`).
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// The running etcd's version, as it reports it (e.g. `3.6.16`).
    pub fn etcd_version(&self) -> &str {
        &self.etcd_version
    }

    /// The running kube-apiserver's version, as it reports it (e.g. `v1.36.3`).
    pub fn kube_version(&self) -> &str {
        &self.kube_version
    }

    /// The folder with the kubeconfig, certificates, etcd data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `control-plane.sh start` printed (versions, endpoints, start time).
    pub fn start_report(&self) -> &str {
        &self.start_report
    }

    /// Runs the pinned `kubectl` with `KUBECONFIG` set to this control plane.
    /// The caller checks `status`.
    pub async fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(&self.kubectl);
        command.args(args).env("KUBECONFIG", &self.kubeconfig);
        output_of(command, "kubectl").await
    }

    /// Runs the pinned `etcdctl` against this control plane's etcd
    /// (`ETCDCTL_ENDPOINTS` set). The caller checks `status`.
    pub async fn etcdctl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(&self.etcdctl);
        command
            .args(args)
            .env("ETCDCTL_ENDPOINTS", &self.etcd_endpoints)
            .env("ETCDCTL_API", "3");
        output_of(command, "etcdctl").await
    }

    /// Server-side applies every CRD in `dir/*.yaml` (use [`crate::CRDS_DIR`] for the
    /// repository's) and waits until each is `Established`, at most [`CRD_TIMEOUT`] each.
    pub async fn install_crds(
        &self,
        dir: impl AsRef<Path>,
    ) -> Result<Vec<CustomResourceDefinition>> {
        let client = self.client().await?;
        crate::crds::install_crds(&client, dir, CRD_TIMEOUT).await
    }

    /// Stops etcd and kube-apiserver and deletes the folder. `Drop` does this too.
    pub fn stop(&mut self) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let output = std::process::Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .arg("--rm")
            .output()
            .context("running control-plane.sh stop")?;
        check("stop", &output).map(drop)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!(
                "stopping the control plane in {}: {error:#}",
                self.dir.display()
            );
        }
    }
}

/// Runs `control-plane.sh ARGS` and returns its standard output; on failure the error
/// carries its standard error (which includes the tail of the failing log).
async fn run_script(args: &[&str]) -> Result<String> {
    let mut command = Command::new("bash");
    command.arg(SCRIPT).args(args);
    let what = format!(
        "control-plane.sh {}",
        args.first().copied().unwrap_or_default()
    );
    let output = output_of(command, &what).await?;
    check(args.first().copied().unwrap_or_default(), &output)
}

async fn output_of(mut command: Command, what: &str) -> Result<Output> {
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))
}

fn check(subcommand: &str, output: &Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    bail!(
        "control-plane.sh {subcommand} failed ({}):\n{}{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Parses the script's `state.env` (`KEY=VALUE` lines, values unquoted).
fn read_state(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.to_owned()))
        .collect())
}
