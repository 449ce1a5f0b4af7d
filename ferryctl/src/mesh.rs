//! A local mesh: one `ferry-sidecar` process per local pod, sharing one routing file.
//!
//! `ferryctl dev`, `ferryctl bench` and the process-level tests all start sidecars through
//! this module, so that what a test proves is what a developer runs.

pub mod identity;
pub mod plan;
pub mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_api::local::{LocalPod, Problem, build_table};
use ferry_api::manifest::Manifests;
use ferry_api::routing::RoutingTable;
use futures::future::join_all;

pub use plan::{DEFAULT_SUBNET, Endpoints, SidecarSpec};
pub use process::{Launch, ProcessError, SidecarProcess};

/// File name of the routing table every sidecar of the mesh follows.
pub const ROUTING_FILE: &str = "routing.json";

/// Why a mesh could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("writing the routing file {path}: {source}")]
    RoutingFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local identity: {0}")]
    Identity(#[from] ferry_api::identity::IdentityError),
    #[error("no sidecar for pod {0} in this mesh")]
    UnknownPod(String),
}

/// How to start a mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub sidecar_bin: PathBuf,
    /// Routing file, logs, and one data folder per pod live under here.
    pub data_root: PathBuf,
    /// First three octets of the sidecars' loopback addresses.
    pub subnet: [u8; 3],
    pub ready_timeout: Duration,
    pub shutdown_grace: Duration,
    pub env: Vec<(String, String)>,
}

impl MeshConfig {
    /// Defaults for a mesh under `data_root`.
    pub fn new(sidecar_bin: PathBuf, data_root: PathBuf) -> Self {
        Self {
            sidecar_bin,
            data_root,
            subnet: DEFAULT_SUBNET,
            ready_timeout: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(5),
            env: Vec::new(),
        }
    }
}

/// A mesh before it starts: addresses, routing table, and what is wrong with the CRs.
#[derive(Debug, Clone)]
pub struct Planned {
    pub specs: Vec<SidecarSpec>,
    pub table: RoutingTable,
    pub problems: Vec<Problem>,
}

impl Planned {
    /// Gives each pod its address and builds the table (revision 1) that lists them.
    pub fn new(
        config: &MeshConfig,
        manifests: &Manifests,
        pods: &[LocalPod],
    ) -> Result<Self, MeshError> {
        let specs = plan::plan(pods, config.subnet, &config.data_root)?;
        let (table, problems) =
            build_table(manifests, pods, |pod| plan::peer_address(&specs, pod), 1);
        Ok(Self {
            specs,
            table,
            problems,
        })
    }
}

/// The running sidecars of a local mesh.
#[derive(Debug)]
pub struct Mesh {
    pub specs: Vec<SidecarSpec>,
    pub table: RoutingTable,
    pub problems: Vec<Problem>,
    launch: Launch,
    running: BTreeMap<String, SidecarProcess>,
}

impl Mesh {
    /// Plans addresses, builds the routing table, writes it, starts every sidecar and waits
    /// (concurrently, each with `ready_timeout`) for all of them to be ready. On an error
    /// the sidecars already started are killed when the returned error drops them.
    pub async fn start(
        config: &MeshConfig,
        manifests: &Manifests,
        pods: &[LocalPod],
    ) -> Result<Self, MeshError> {
        Self::start_planned(config, Planned::new(config, manifests, pods)?).await
    }

    /// [`Mesh::start`] for a plan the caller already looked at (to print its problems first).
    pub async fn start_planned(config: &MeshConfig, planned: Planned) -> Result<Self, MeshError> {
        let Planned {
            specs,
            table,
            problems,
        } = planned;
        let launch = Launch {
            bin: config.sidecar_bin.clone(),
            routing_file: config.data_root.join(ROUTING_FILE),
            log_dir: config.data_root.join("logs"),
            shutdown_grace: config.shutdown_grace,
            ready_timeout: config.ready_timeout,
            env: config.env.clone(),
        };
        let mut mesh = Self {
            specs,
            table,
            problems,
            launch,
            running: BTreeMap::new(),
        };
        mesh.write_routing_file()?;
        identity::issue_all(&config.data_root, &mesh.specs)?;
        let started = join_all(
            mesh.specs
                .iter()
                .map(|spec| SidecarProcess::start(spec, &mesh.launch)),
        )
        .await;
        for process in started {
            let process = process?;
            mesh.running.insert(process.spec.pod.id(), process);
        }
        Ok(mesh)
    }

    /// Removes and returns the sidecars that exited by themselves.
    pub fn reap_exited(&mut self) -> Vec<SidecarProcess> {
        let gone: Vec<String> = self
            .running
            .iter_mut()
            .filter_map(|(id, p)| (!p.is_running()).then(|| id.clone()))
            .collect();
        gone.iter()
            .filter_map(|id| self.running.remove(id))
            .collect()
    }

    /// Where the routing file is.
    pub fn routing_file(&self) -> &Path {
        &self.launch.routing_file
    }

    /// Folder of the sidecars' output logs.
    pub fn log_dir(&self) -> &Path {
        &self.launch.log_dir
    }

    /// Rebuilds the table from changed CRs (the pods stay as they are) and, if it differs,
    /// writes it with the next revision; the sidecars pick it up from the file. Returns the
    /// new table's problems, or `None` when nothing changed.
    pub fn reload(&mut self, manifests: &Manifests) -> Result<Option<Vec<Problem>>, MeshError> {
        let pods: Vec<LocalPod> = self.specs.iter().map(|s| s.pod.clone()).collect();
        let revision = self.table.revision + 1;
        let (table, problems) = build_table(
            manifests,
            &pods,
            |pod| plan::peer_address(&self.specs, pod),
            revision,
        );
        if (RoutingTable {
            revision: self.table.revision,
            ..table.clone()
        }) == self.table
        {
            return Ok(None);
        }
        self.table = table;
        self.problems = problems.clone();
        self.write_routing_file()?;
        Ok(Some(problems))
    }

    /// Writes the table atomically (temporary file, then rename), so that a sidecar that
    /// re-reads it never sees half a file.
    fn write_routing_file(&self) -> Result<(), MeshError> {
        let path = &self.launch.routing_file;
        let err = |source| MeshError::RoutingFile {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let json =
            serde_json::to_vec_pretty(&self.table).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The spec of a pod (`namespace/name`, or just `name` in `default`).
    pub fn spec(&self, pod: &str) -> Result<&SidecarSpec, MeshError> {
        let id = qualify(pod);
        self.specs
            .iter()
            .find(|s| s.pod.id() == id)
            .ok_or(MeshError::UnknownPod(id))
    }

    /// The endpoints of a pod's sidecar.
    pub fn endpoints(&self, pod: &str) -> Result<Endpoints, MeshError> {
        Ok(self.spec(pod)?.endpoints)
    }

    /// The running process of a pod's sidecar.
    pub fn process(&self, pod: &str) -> Result<&SidecarProcess, MeshError> {
        let id = qualify(pod);
        self.running.get(&id).ok_or(MeshError::UnknownPod(id))
    }

    /// Every running sidecar, by pod id.
    pub fn processes(&self) -> impl Iterator<Item = &SidecarProcess> {
        self.running.values()
    }

    /// `kill -9` of a pod's sidecar; it stays down until [`Mesh::restart`].
    pub async fn kill9(&mut self, pod: &str) -> Result<(), MeshError> {
        let id = qualify(pod);
        let mut process = self.running.remove(&id).ok_or(MeshError::UnknownPod(id))?;
        process.kill9().await?;
        Ok(())
    }

    /// SIGTERM of a pod's sidecar, waiting up to `timeout` (then SIGKILL). Returns whether
    /// it exited by itself and with status 0.
    pub async fn terminate(&mut self, pod: &str, timeout: Duration) -> Result<bool, MeshError> {
        let id = qualify(pod);
        let mut process = self.running.remove(&id).ok_or(MeshError::UnknownPod(id))?;
        let (status, clean) = process.terminate(timeout).await?;
        Ok(clean && status.success())
    }

    /// Starts a stopped pod's sidecar again on the same data folder and address.
    pub async fn restart(&mut self, pod: &str) -> Result<&SidecarProcess, MeshError> {
        let spec = self.spec(pod)?.clone();
        let id = spec.pod.id();
        if let Some(mut old) = self.running.remove(&id) {
            old.terminate(self.launch.shutdown_grace + Duration::from_secs(5))
                .await?;
        }
        let process = SidecarProcess::start(&spec, &self.launch).await?;
        Ok(self.running.entry(id).or_insert(process))
    }

    /// [`Mesh::restart`] with extra environment for this one start of the pod's sidecar
    /// (tests: a fault to inject, a skewed clock); later restarts go without it.
    pub async fn restart_with_env(
        &mut self,
        pod: &str,
        env: &[(String, String)],
    ) -> Result<&SidecarProcess, MeshError> {
        let spec = self.spec(pod)?.clone();
        let id = spec.pod.id();
        if let Some(mut old) = self.running.remove(&id) {
            old.terminate(self.launch.shutdown_grace + Duration::from_secs(5))
                .await?;
        }
        let mut launch = self.launch.clone();
        launch.env.extend(env.iter().cloned());
        let process = SidecarProcess::start(&spec, &launch).await?;
        Ok(self.running.entry(id).or_insert(process))
    }

    /// SIGTERMs every sidecar at once and waits for them (grace period plus a margin, then
    /// SIGKILL). Returns the pods that did not exit cleanly.
    pub async fn shutdown(&mut self) -> Vec<String> {
        let timeout = self.launch.shutdown_grace + Duration::from_secs(5);
        let mut processes: Vec<SidecarProcess> =
            std::mem::take(&mut self.running).into_values().collect();
        let results = join_all(processes.iter_mut().map(|p| p.terminate(timeout))).await;
        processes
            .iter()
            .zip(results)
            .filter(|(_, r)| !matches!(r, Ok((status, true)) if status.success()))
            .map(|(p, _)| p.spec.pod.id())
            .collect()
    }
}

/// `name` means `default/name`.
fn qualify(pod: &str) -> String {
    if pod.contains('/') {
        pod.to_owned()
    } else {
        format!("default/{pod}")
    }
}
