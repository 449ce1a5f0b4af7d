//! Pods and nodes → a record per pod that carries the sidecar
//! (`/ferry/v1/pods/<namespace>/<pod>`), from which its sidecar learns its zone and node.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::*;

/// As long as a member takes to leave the table (the design's 2 s), with room for a slow
/// machine: a deleted pod's record goes with it.
const RECORD_LEAVES: Duration = Duration::from_secs(5);

/// Binds `pod` to `node` as the scheduler does (`pods/binding`).
async fn bind(world: &World, pod: &str, node: &str) -> Result<()> {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    world
        .api::<Pod>()
        .create_subresource::<serde_json::Value, serde_json::Value>(
            "binding",
            pod,
            &PostParams::default(),
            &binding,
        )
        .await
        .with_context(|| format!("binding pod {pod} to {node}"))?;
    Ok(())
}

#[tokio::test]
async fn every_sidecar_pod_gets_a_record_with_its_nodes_zone() -> Result<()> {
    let world = World::new("podrec").await?;
    let nodes: Api<Node> = Api::all(world.client.clone());
    let node_name = format!("{}-node", world.ns);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let operator = Operator::start(world.config("op-podrec")).await?;
    let pods = world.api::<Pod>();

    // Not scheduled yet, then a producer-only pod (no group exists at all) on the node,
    // then one without the sidecar.
    let mut unscheduled = pod("later", "producer", &node_name, "native");
    unscheduled["spec"]
        .as_object_mut()
        .context("pod spec")?
        .remove("nodeName");
    let mut producer = pod("producer", "producer", &node_name, "native");
    producer["spec"]["serviceAccountName"] = json!("publisher");
    for manifest in [
        unscheduled,
        producer,
        pod("bare", "producer", &node_name, "none"),
    ] {
        let manifest: Pod = serde_json::from_value(manifest)?;
        pods.create(&PostParams::default(), &manifest).await?;
    }
    let key = |pod: &str| world.key("pods", pod);
    let record = world
        .wait_key(&key("producer"), |v| v["zone"] == "zone-a")
        .await
        .context("the producer pod's record with its node's zone")?;
    println!("record: {record}");
    let uid = pods.get("producer").await?.metadata.uid;
    ensure!(
        record["schemaVersion"] == 1
            && record["namespace"] == world.ns.as_str()
            && record["pod"] == "producer"
            && record["node"] == node_name.as_str()
            && record["serviceAccount"] == "publisher"
            && record["uid"].as_str() == uid.as_deref(),
        "{record}"
    );
    // `later` was created before `producer`: the pass that wrote producer's record saw it.
    let table = world.table().await?;
    ensure!(
        !table.contains_key(&key("later")),
        "a pod that is not scheduled has a record: {table:#?}"
    );
    ensure!(
        !table.contains_key(&key("bare")),
        "a pod without the sidecar has a record"
    );

    // Scheduled: the record appears. The pod IP, once the kubelet reports it, too.
    bind(&world, "later", &node_name).await?;
    world
        .wait_key(&key("later"), |v| {
            v["zone"] == "zone-a" && v["node"] == node_name.as_str()
        })
        .await
        .context("the record of a pod once it is scheduled")?;
    set_pod_status(&world, "later", "10.3.0.7", false).await?;
    world
        .wait_key(&key("later"), |v| v["podIP"] == "10.3.0.7")
        .await
        .context("the record follows the pod IP")?;

    // The node moves zone: both records follow.
    nodes
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}}}),
            ),
        )
        .await?;
    for pod in ["producer", "later"] {
        world
            .wait_key(&key(pod), |v| v["zone"] == "zone-b")
            .await
            .with_context(|| format!("{pod}'s record follows its node's zone"))?;
    }

    // Terminating (it stays so without a kubelet): the record stays while the sidecar
    // drains, and still follows its node. Deleted for good: it goes.
    pods.delete("producer", &DeleteParams::default()).await?;
    nodes
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-a"}}}),
            ),
        )
        .await?;
    world
        .wait_key(&key("producer"), |v| v["zone"] == "zone-a")
        .await
        .context("a terminating pod keeps its record")?;
    pods.delete(
        "producer",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    world.wait_no_key(&key("producer"), RECORD_LEAVES).await?;
    let table = world.table().await?;
    ensure!(
        table.contains_key(&key("later")),
        "the other pod's record went too"
    );

    operator.stop().await?;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    Ok(())
}
