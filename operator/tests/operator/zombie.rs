//! docs/reliability.md row 18, zombie leader (CI smoke variant): the leader is a real
//! `ferry-operator` process, frozen with SIGSTOP past the lease duration while an
//! in-process standby takes over and changes the table, then resumed with SIGCONT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use ferry_api::{ConsumerGroup, Topic};
use ferry_kind_tests::wait_for_value;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::faults::*;
use crate::support::*;

/// The zombie's and the new leader's sidecar peer ports: they differ on purpose (as two
/// operator versions during a rolling upgrade might), so that the zombie, once resumed,
/// wants to write member entries that differ from the new leader's.
const ZOMBIE_PORT: u16 = 7710;
const STANDBY_PORT: u16 = 7711;

/// A `ferry-operator` process (the binary Cargo built for this package).
struct OperatorProcess {
    child: Child,
    metrics: SocketAddr,
}

impl OperatorProcess {
    async fn start(world: &World, identity: &str, log: &std::path::Path) -> Result<Self> {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let file = std::fs::File::create(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_ferry-operator"))
            .args(["--etcd-endpoints", world.cp.etcd_endpoints()])
            .arg("--kubeconfig")
            .arg(world.cp.kubeconfig_path())
            .args(["--lease-namespace", &world.ns])
            .args(["--lease-name", "ferry-operator"])
            .args(["--fence-key", &world.fence_key()])
            .args(["--watch-namespace", &world.ns])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--identity", identity])
            .args(["--lease-duration", "3s", "--renew-deadline", "2s"])
            .args(["--retry-period", "500ms"])
            .args(["--sidecar-peer-port", &ZOMBIE_PORT.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("starting ferry-operator")?;
        Ok(Self { child, metrics })
    }

    fn pid(&self) -> Result<u32> {
        self.child.id().context("ferry-operator has exited")
    }

    /// Waits until `/readyz` answers `phase`.
    async fn wait_phase(&self, phase: &str) -> Result<()> {
        let expected = (200, format!("{phase}\n"));
        wait_for_value(CONVERGE, || async {
            Ok((http_get(self.metrics, "/readyz").await? == expected).then_some(()))
        })
        .await
        .with_context(|| format!("the ferry-operator process is {phase}"))
    }

    async fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(self.metrics, "/metrics").await?;
        ensure!(code == 200, "/metrics: {code}");
        Ok(body)
    }

    /// SIGTERM and wait for the exit, with a deadline.
    async fn stop(mut self) -> Result<()> {
        signal(self.pid()?, "TERM").await?;
        let status = tokio::time::timeout(CONVERGE, self.child.wait())
            .await
            .context("ferry-operator did not exit after SIGTERM")??;
        ensure!(status.success(), "ferry-operator exited with {status}");
        Ok(())
    }
}

#[tokio::test]
async fn zombie_leader() -> Result<()> {
    let world = World::new("zombie-leader").await?;
    let logs = tempfile::tempdir()?;
    let nodes: Api<Node> = Api::all(world.client.clone());
    let node_name = format!("{}-node", world.ns);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let result = zombie_leader_in(&world, &node_name, logs.path().join("zombie.log")).await;
    if result.is_err()
        && let Ok(text) = std::fs::read_to_string(logs.path().join("zombie.log"))
    {
        println!("--- the zombie's log ---\n{text}");
    }
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    result
}

async fn zombie_leader_in(world: &World, node_name: &str, log: PathBuf) -> Result<()> {
    // The leader: a real process, converged on a topic and a group with one ready member.
    let zombie = OperatorProcess::start(world, "op-zombie", &log).await?;
    zombie.wait_phase("leading").await?;
    world.apply::<Topic>(topic("t", "Disk")).await?;
    world.apply::<ConsumerGroup>(group("g", "w")).await?;
    let manifest: Pod = serde_json::from_value(pod("w1", "w", node_name, "native"))?;
    world
        .api::<Pod>()
        .create(&PostParams::default(), &manifest)
        .await?;
    set_pod_status(world, "w1", "10.8.0.1", true).await?;
    topic_ready(world, "t", "True").await?;
    let member_key = format!("/ferry/v1/members/{}/g/w1", world.ns);
    let zombie_address = format!("10.8.0.1:{ZOMBIE_PORT}");
    world
        .wait_key(&member_key, |v| v["address"] == zombie_address.as_str())
        .await?;

    // The standby, in process.
    let mut config = world.config("op-standby");
    config.lease_duration = Duration::from_secs(3);
    config.renew_deadline = Duration::from_secs(2);
    config.sidecar_peer_port = STANDBY_PORT;
    let standby = Operator::start(config).await?;
    wait_for_value(CONVERGE, || async {
        Ok((standby.http_get("/readyz").await? == (200, "standby\n".into())).then_some(()))
    })
    .await
    .context("the in-process operator stands by")?;
    let fence = world.fence_key();
    let zombie_claim = world
        .etcd
        .read_fence(&fence)
        .await?
        .context("the leader claimed the fence")?;
    ensure!(
        zombie_claim.value.identity == "op-zombie",
        "{zombie_claim:?}"
    );

    // Freeze the leader past the lease duration: the standby takes over.
    let pid = zombie.pid()?;
    pause(pid).await?;
    let paused = Paused(pid);
    let frozen = Instant::now();
    standby.wait_leading().await?;
    println!(
        "the standby leads {:.1}s after SIGSTOP of the leader (pid {pid})",
        frozen.elapsed().as_secs_f64()
    );
    let new_claim = world.etcd.read_fence(&fence).await?.context("fence")?;
    ensure!(
        new_claim.value.identity == "op-standby" && new_claim.value.term > zombie_claim.value.term,
        "the standby claimed with a newer term: {zombie_claim:?} -> {new_claim:?}"
    );

    // The new leader changes the table: a CR edit, and its own member addresses.
    world.apply::<Topic>(topic("t", "Memory")).await?;
    world
        .wait_key(&world.key("topics", "t"), |v| v["durability"] == "Memory")
        .await?;
    let standby_address = format!("10.8.0.1:{STANDBY_PORT}");
    world
        .wait_key(&member_key, |v| v["address"] == standby_address.as_str())
        .await?;
    // An event for the zombie's group controller to act on when it wakes up: it will want
    // its own address in the member entry.
    world
        .api::<Pod>()
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await?;
    // Let the standby process that event too, so that the table is final before SIGCONT.
    wait_for_value(CONVERGE, || async {
        let g = world.api::<ConsumerGroup>().get("g").await?;
        Ok(g.status.is_some_and(|s| s.ready_members == 1).then_some(()))
    })
    .await?;
    let table = world.table().await?;
    let revision = world.table_revision().await?;
    let standby_changes = standby.metric("ferry_operator_etcd_changes_total");
    println!(
        "frozen {:.1}s; the new leader wrote {standby_changes} keys; table {revision:?}",
        frozen.elapsed().as_secs_f64()
    );

    // Wake the zombie up.
    resume(pid).await?;
    drop(paused);
    let resumed = Instant::now();
    zombie.wait_phase("standby").await?;
    // Whichever defence noticed first (the renewal finding another holder, the lease
    // guard's deadline, or the fence) logs why it steps down; the election loop then logs
    // that the controllers stopped.
    wait_for_value(CONVERGE, || async {
        Ok((!log_lines(&log, "stopped leading")?.is_empty()).then_some(()))
    })
    .await
    .context("the zombie logs that it stopped leading")?;
    let stepped = log_lines(&log, "stepping down")?;
    ensure!(!stepped.is_empty(), "the zombie logs why it stepped down");
    let metrics = zombie.metrics().await?;
    let not_leader = metric_sum(
        &metrics,
        "ferry_operator_reconcile_errors_total",
        &["reason=\"not_leader\""],
    );
    let fenced = metric_sum(&metrics, "ferry_operator_fenced_writes_total", &[]);
    println!(
        "the zombie stood down {:.1}s after SIGCONT; refused writes: {not_leader} by its lease guard, {fenced} by the etcd fence; log:\n  {}",
        resumed.elapsed().as_secs_f64(),
        stepped.join("\n  ")
    );
    ensure!(
        metric_sum(&metrics, "ferry_operator_leader", &[]) == 0.0,
        "the zombie no longer leads"
    );

    // Nothing the zombie did landed: no routing key written since the new leader's last
    // write, the member entry is the new leader's, and the fence still holds its claim.
    let after = world.table_revision().await?;
    ensure!(
        after == revision,
        "the zombie wrote routing keys: {revision:?} -> {after:?}"
    );
    ensure!(
        world.table().await? == table,
        "the table is the new leader's"
    );
    let member = members(world, "g").await?;
    ensure!(
        member
            .get("w1")
            .is_some_and(|m| m.address == standby_address),
        "member entry: {member:?}"
    );
    let fence_now = world.etcd.read_fence(&fence).await?.context("fence")?;
    ensure!(
        fence_now == new_claim,
        "the fence changed: {new_claim:?} -> {fence_now:?}"
    );
    ensure!(
        standby.metric("ferry_operator_leader") == 1.0,
        "the new leader still leads"
    );

    // The new leader still acts on changes.
    world.apply::<Topic>(topic("t", "Disk")).await?;
    world
        .wait_key(&world.key("topics", "t"), |v| v["durability"] == "Disk")
        .await?;
    zombie.stop().await?;
    standby.stop().await
}
