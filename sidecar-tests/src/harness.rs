//! Starting real sidecars for a test, and the loops every test shares: publishing with the
//! history recorded, consuming with it recorded, and waiting for a condition with a deadline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_api::local::parse_pods;
use ferry_api::manifest::Manifests;
use ferry_api::proto::v1::{AckLevel, PublishRequest};
use ferry_api::routing::MemberEntry;
use ferryctl::client::{self, App, Consumer, Event};
use ferryctl::mesh::{Mesh, MeshConfig};
use ferryctl::sidecar_bin;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::history::{Delivered, History};

/// Builds `ferry-sidecar` (with its test-only `failpoints` and `powerloss` features) and
/// `ferryctl` once per test process (so the tests always run the current code) and returns the sidecar's path: `FERRY_SIDECAR_BIN` if set, else the binary Cargo puts next to
/// this test executable's `deps/` folder, built with the same profile.
pub fn sidecar_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_sidecar().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_sidecar() -> Result<PathBuf> {
    if std::env::var_os(sidecar_bin::SIDECAR_BIN_ENV).is_some() {
        return Ok(sidecar_bin::locate()?);
    }
    let exe = std::env::current_exe()?;
    let release = exe
        .ancestors()
        .nth(2)
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--quiet", "-p", "ferry-sidecar", "-p", "ferryctl"])
        // Fault injection for the tests that ask for it (inert unless configured through
        // FAILPOINTS or FERRY_SIMULATE_POWER_LOSS).
        .args([
            "--features",
            "ferry-sidecar/failpoints,ferry-sidecar/powerloss",
        ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("running cargo build -p ferry-sidecar")?;
    if !status.success() {
        bail!("cargo build -p ferry-sidecar failed: {status}");
    }
    Ok(sidecar_bin::locate_near(&exe)?)
}

/// The `ferryctl` binary built by [`sidecar_bin`], next to the sidecar.
pub fn ferryctl_bin() -> Result<PathBuf> {
    let sidecar = sidecar_bin()?;
    let path = sidecar.with_file_name("ferryctl");
    if path.is_file() {
        Ok(path)
    } else {
        bail!("no ferryctl next to {}", sidecar.display())
    }
}

/// A loopback /24 no other mesh of this test process uses, and unlikely to clash with
/// another test process: `127.<100 + pid % 100>.<n>.0`.
pub fn next_subnet() -> [u8; 3] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let second = 100 + u8::try_from(std::process::id() % 100).unwrap_or(0);
    [127, second, NEXT.fetch_add(1, Ordering::Relaxed)]
}

/// The seed of a randomized test: `FERRY_TEST_SEED`, or a fresh one; printed either way so
/// that a failure can be replayed.
pub fn seeded_rng(test: &str) -> StdRng {
    let seed = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("{test}: seed {seed} (replay with FERRY_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// A mesh of real sidecars in a temporary folder, deleted when dropped.
#[derive(Debug)]
pub struct TestMesh {
    pub mesh: Mesh,
    pub dir: tempfile::TempDir,
}

impl TestMesh {
    /// Starts one sidecar per pod of `pods_yaml`, routing per the CRs in `crs_yaml`.
    pub async fn start(crs_yaml: &str, pods_yaml: &str) -> Result<Self> {
        Self::start_with_env(crs_yaml, pods_yaml, &[]).await
    }

    /// [`TestMesh::start`] with extra environment for every sidecar (`FERRY_*` flags).
    pub async fn start_with_env(
        crs_yaml: &str,
        pods_yaml: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut manifests = Manifests::default();
        manifests.add_str(Path::new("<test>"), crs_yaml)?;
        let pods = parse_pods(Path::new("<test pods>"), pods_yaml)?;
        let dir = tempfile::tempdir()?;
        let mut config = MeshConfig::new(sidecar_bin()?, dir.path().to_owned());
        config.subnet = next_subnet();
        config.shutdown_grace = Duration::from_secs(2);
        config.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mesh = Mesh::start(&config, &manifests, &pods).await?;
        if !mesh.problems.is_empty() {
            bail!("the test's CRs have problems: {:?}", mesh.problems);
        }
        for p in mesh.processes() {
            println!(
                "sidecar {} zone={} app_grpc={} pid={}",
                p.spec.pod.id(),
                p.spec.pod.zone,
                p.spec.endpoints.app_grpc,
                p.pid
            );
        }
        Ok(Self { mesh, dir })
    }

    /// The app gRPC address of a pod's sidecar.
    pub fn app_addr(&self, pod: &str) -> Result<String> {
        Ok(self.mesh.endpoints(pod)?.app_grpc.to_string())
    }

    /// Removes `pod`'s member records from the routing table and writes the routing file
    /// with the next revision (atomically), as the operator does when a pod is deleted. The
    /// sidecars pick it up on their next poll of the file.
    pub fn remove_member(&mut self, pod: &str) -> Result<()> {
        let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
        let table = &mut self.mesh.table;
        for members in table.members.values_mut() {
            members.retain(|_, m| !(m.namespace == namespace && m.pod == name));
        }
        table.members.retain(|_, m| !m.is_empty());
        self.write_table()
    }

    /// Adds (or replaces) a member record of `group` (`namespace/name`) and writes the
    /// routing file with the next revision, as the operator does when a pod of the group
    /// becomes ready. The record's address need not have a sidecar behind it.
    pub fn add_member(&mut self, group: &str, member: MemberEntry) -> Result<()> {
        self.mesh
            .table
            .members
            .entry(group.to_owned())
            .or_default()
            .insert(member.pod.clone(), member);
        self.write_table()
    }

    /// The member records of `pod` (`namespace/name` or `name`), by group.
    pub fn member_records(&self, pod: &str) -> Vec<(String, MemberEntry)> {
        let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
        self.mesh
            .table
            .members
            .iter()
            .flat_map(|(group, members)| {
                members
                    .values()
                    .filter(|m| m.namespace == namespace && m.pod == name)
                    .map(|m| (group.clone(), m.clone()))
            })
            .collect()
    }

    /// Writes the table with the next revision, atomically.
    fn write_table(&mut self) -> Result<()> {
        self.mesh.table.revision += 1;
        let path = self.mesh.routing_file().to_owned();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.mesh.table)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Every output line of a pod's running sidecar that contains `needle`.
    pub fn log_lines(&self, pod: &str, needle: &str) -> Result<Vec<String>> {
        Ok(self
            .mesh
            .process(pod)?
            .output
            .lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect())
    }

    /// A gRPC client of a pod's sidecar.
    pub async fn app(&self, pod: &str) -> Result<App> {
        Ok(client::connect(&self.app_addr(pod)?).await?)
    }
}

/// Polls `condition` every 20 ms until it holds; fails after `timeout` with `what`.
pub async fn wait_for(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a producer sidecar logs when it starts on a recovered log with unsettled messages:
/// "redelivering N unsettled messages of <topic>/<subscription> after restart".
const REDELIVERY_LOG: &str = " unsettled messages of ";

/// The sum of N over a sidecar's "redelivering N unsettled messages of `what` after
/// restart" lines (`what` is `<topic>/<subscription>`): how many duplicates a restart can
/// explain.
pub fn logged_redeliveries(lines: &[String], what: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l.contains(REDELIVERY_LOG) && l.contains(&format!("{what} after restart")))
        .filter_map(|l| {
            let rest = &l[l.find("redelivering ")? + "redelivering ".len()..];
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Publishes one message with its attempt and ack recorded; returns the gRPC status on
/// failure (the message then counts as attempted, not acked).
pub async fn publish(
    app: &mut App,
    history: &History,
    producer: &str,
    topic: &str,
    id: &str,
    key: Option<&str>,
    payload: Vec<u8>,
) -> std::result::Result<(), tonic::Status> {
    history.publish_attempt(producer, topic, id, key);
    let request = PublishRequest {
        topic: topic.into(),
        message_id: id.into(),
        key: key.map(str::to_owned),
        payload: payload.into(),
        ack_level: AckLevel::Stored.into(),
        headers: HashMap::new(),
        ..PublishRequest::default()
    };
    app.publish(request).await?;
    history.publish_acked(id);
    Ok(())
}

/// What a test consumer does with each delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Ack,
    /// Nack with this delay in milliseconds (a poison-message app).
    Nack(u64),
    /// Nack the messages of this key with this delay, ack the others (one poison key).
    NackKey(&'static str, u64),
}

/// Subscribes to `subscription` on `addr` as member `member` of `group` (returning once the
/// sidecar confirmed it), then consumes until `stop_at` in a task, recording every delivery
/// (before settling it, so arrival order is the recorded order) and every ack.
pub async fn spawn_consumer(
    addr: &str,
    subscription: &str,
    group: &str,
    member: &str,
    history: &History,
    behavior: Behavior,
    stop_at: Instant,
) -> Result<JoinHandle<Result<u64>>> {
    let (group, member, history) = (group.to_owned(), member.to_owned(), history.clone());
    let mut app = client::connect(addr).await?;
    let mut consumer = Consumer::subscribe(&mut app, subscription, 64)
        .await
        .with_context(|| format!("{member} subscribing to {subscription}"))?;
    Ok(tokio::spawn(async move {
        let mut received = 0u64;
        let mut settle_errors = 0u64;
        while Instant::now() < stop_at {
            match consumer.next(Duration::from_millis(100)).await? {
                Some(Event::Delivery(d)) => {
                    received += 1;
                    history.delivered(Delivered::of(&group, &member, &d));
                    let nack = match behavior {
                        Behavior::Ack => None,
                        Behavior::Nack(delay_ms) => Some(delay_ms),
                        Behavior::NackKey(key, delay_ms) => {
                            (d.key.as_deref() == Some(key)).then_some(delay_ms)
                        }
                    };
                    match nack {
                        None => {
                            consumer.ack_and_refill(&d.delivery_id)?;
                            history.consumer_acked(&group, &member, &d.message_id);
                        }
                        Some(delay_ms) => {
                            consumer.nack(&d.delivery_id, delay_ms)?;
                            consumer.credit(1)?;
                        }
                    }
                }
                Some(Event::SettleError(e)) => {
                    settle_errors += 1;
                    if settle_errors <= 3 {
                        let error = e
                            .error
                            .map(|e| format!("code {}: {}", e.code, e.message))
                            .unwrap_or_default();
                        println!("{member}: settle error for {}: {error}", e.delivery_id);
                    }
                }
                None => {}
            }
        }
        drop(app);
        if settle_errors > 3 {
            println!("{member}: {settle_errors} settle errors in all");
        }
        Ok(received)
    }))
}
