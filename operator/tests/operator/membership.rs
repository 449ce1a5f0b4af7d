//! Pods and nodes → a group's members.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use ferry_api::ConsumerGroup;
use ferry_kind_tests::wait_for_value;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::*;

/// The design's promise for a pod that stops being Ready or is deleted.
const MEMBER_LEAVES: Duration = Duration::from_secs(2);

#[tokio::test]
async fn members_follow_pods_readiness_and_zones() -> Result<()> {
    let world = World::new("members").await?;
    let nodes: Api<Node> = Api::all(world.client.clone());
    let node_name = format!("{}-node", world.ns);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let operator = Operator::start(world.config("op-a")).await?;
    world
        .apply::<ConsumerGroup>(group("workers", "worker"))
        .await?;

    let pods = world.api::<Pod>();
    for (name, sidecar, ip) in [
        ("p1", "native", "10.1.0.1"),
        ("p2", "plain", "10.1.0.2"),
        ("p3", "none", "10.1.0.3"),
        ("p4", "named", "10.1.0.4"),
    ] {
        let manifest: Pod = serde_json::from_value(pod(name, "worker", &node_name, sidecar))?;
        pods.create(&PostParams::default(), &manifest).await?;
        set_pod_status(&world, name, ip, true).await?;
    }
    wait_members(&world, "workers", &["p1", "p2"], CONVERGE).await?;
    let found = members(&world, "workers").await?;
    let p1 = found.get("p1").context("p1")?;
    ensure!(
        p1.address == "10.1.0.1:7710" && p1.zone == "zone-a" && p1.node == node_name && p1.ready,
        "{p1:?}"
    );
    let g = wait_for_value(CONVERGE, || async {
        let g = world.api::<ConsumerGroup>().get("workers").await?;
        let ok = g
            .status
            .as_ref()
            .is_some_and(|s| s.members == 2 && s.ready_members == 2 && s.zones == ["zone-a"]);
        Ok(ok.then_some(g))
    })
    .await
    .context("group status counts 2 ready members in zone-a")?;
    println!("status: {:?}", g.status);

    // Not Ready: the member leaves within the design's 2 s; it still counts as a member.
    set_pod_status(&world, "p1", "10.1.0.1", false).await?;
    let took = wait_members(&world, "workers", &["p2"], MEMBER_LEAVES).await?;
    println!("not-ready pod left the table in {took:?}");
    wait_for_value(CONVERGE, || async {
        let g = world.api::<ConsumerGroup>().get("workers").await?;
        Ok(g.status
            .is_some_and(|s| s.members == 2 && s.ready_members == 1)
            .then_some(()))
    })
    .await
    .context("group status counts 1 ready of 2")?;

    // The node moves zone: the member's zone follows.
    nodes
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}}}),
            ),
        )
        .await?;
    world
        .wait_key(&format!("/ferry/v1/members/{}/workers/p2", world.ns), |v| {
            v["zone"] == "zone-b"
        })
        .await?;

    // Ready again, then deleted (gracefully: it stays Terminating without a kubelet).
    set_pod_status(&world, "p1", "10.1.0.1", true).await?;
    wait_members(&world, "workers", &["p1", "p2"], CONVERGE).await?;
    pods.delete("p2", &DeleteParams::default()).await?;
    let took = wait_members(&world, "workers", &["p1"], MEMBER_LEAVES).await?;
    println!("terminating pod left the table in {took:?}");
    // Removed for good.
    pods.delete(
        "p1",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    let took = wait_members(&world, "workers", &[], MEMBER_LEAVES).await?;
    println!("deleted pod left the table in {took:?}");

    operator.stop().await?;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    Ok(())
}
