//! Restarts, failover and fencing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use ferry_api::{ConsumerGroup, Subscription, Topic};
use ferry_kind_tests::wait_for_value;
use ferry_operator::Error;
use ferry_operator::etcd::EtcdStore;
use ferry_operator::leader::LeaseGuard;
use ferry_operator::metrics::Metrics;
use ferry_operator::reconcile::{self, Context};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector;
use serde_json::json;

use crate::support::*;

/// The resourceVersions of the three objects of `a_restart_changes_nothing`.
async fn versions(w: &World) -> Result<(Option<String>, Option<String>, Option<String>)> {
    Ok((
        w.api::<Topic>().get("t").await?.resource_version(),
        w.api::<ConsumerGroup>().get("g").await?.resource_version(),
        w.api::<Subscription>().get("s").await?.resource_version(),
    ))
}

#[tokio::test]
async fn a_restart_changes_nothing() -> Result<()> {
    let world = World::new("restart").await?;
    let nodes: Api<Node> = Api::all(world.client.clone());
    let node_name = format!("{}-node", world.ns);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;

    let first = Operator::start(world.config("op-first")).await?;
    converge_three(&world, &node_name, "10.2.0.1").await?;
    first.stop().await?;

    let before = world.table_revision().await?;
    let versions_before = versions(&world).await?;

    // A new instance (another identity) takes over and reconciles everything once.
    let second = Operator::start(world.config("op-second")).await?;
    second.wait_leading().await?;
    second.wait_reconciled_all().await?;

    let after = world.table_revision().await?;
    ensure!(
        before == after,
        "routing keys were written: (max mod_revision, count) {before:?} -> {after:?}"
    );
    ensure!(
        versions(&world).await? == versions_before,
        "a status or finalizer patch was sent"
    );
    second.assert_wrote_nothing()?;
    println!(
        "after restart: (max mod_revision, keys) = {after:?}, resourceVersions {versions_before:?}"
    );
    second.stop().await?;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_stale_term_cannot_write() -> Result<()> {
    let world = World::new("fence").await?;
    let store = EtcdStore::connect(
        &[world.cp.etcd_endpoints().to_owned()],
        Duration::from_secs(5),
    )
    .await?;
    let fence = world.fence_key();
    let key = world.key("topics", "fenced");
    let guard = || LeaseGuard::new(Duration::from_secs(60));

    let old = store.claim(&fence, "old", 5, guard()).await?;
    old.put(&key, "from-old").await?;
    let new = store.claim(&fence, "new", 6, guard()).await?;
    match old.put(&key, "late-write").await {
        Err(Error::Fenced { term: 5, .. }) => {}
        other => bail!("the stale leader's write was not fenced: {other:?}"),
    }
    ensure!(old.guard().is_lost(), "the fenced leader steps down");
    // Neither an older nor an equal term can claim back.
    for (identity, term) in [("old", 5), ("other", 6)] {
        match store.claim(&fence, identity, term, guard()).await {
            Err(Error::StaleTerm { .. }) => {}
            other => bail!("{identity} claimed with stale term {term}: {other:?}"),
        }
    }
    new.put(&key, "from-new").await?;
    ensure!(
        world
            .etcd
            .get_keys(std::slice::from_ref(&key))
            .await?
            .get(&key)
            .map(String::as_str)
            == Some("from-new")
    );
    // Re-claiming one's own claim (a lost response) is adopted, not refused.
    let again = store.claim(&fence, "new", 6, guard()).await?;
    again.put(&key, "again").await?;
    new.put(&key, "still-valid").await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_fenced_out_by_a_newer_claim_cannot_write() -> Result<()> {
    let world = World::new("zombie").await?;
    let operator = Operator::start(world.config("op-a")).await?;
    world.apply::<Topic>(topic("t", "Disk")).await?;
    topic_ready(&world, "t", "True").await?;
    let fence = world.fence_key();
    let term = world
        .etcd
        .read_fence(&fence)
        .await?
        .context("the leader claimed the fence")?
        .value
        .term;

    // A newer leader claims the fence while the old one still believes it leads (its Lease
    // renewals keep succeeding, as for a leader paused and resumed): only etcd stops it.
    let intruder = world
        .etcd
        .claim(&fence, "intruder", term + 1, LeaseGuard::new(CONVERGE))
        .await?;
    let intruder_claim = world.etcd.read_fence(&fence).await?.context("fence")?;

    // The old leader acts on a change: its write is refused, it steps down, takes the Lease
    // again with a newer term, claims the fence and only then writes.
    world.apply::<Topic>(topic("t", "Memory")).await?;
    wait_for_value(CONVERGE, || async {
        Ok((operator.metric("ferry_operator_fenced_writes_total") >= 1.0).then_some(()))
    })
    .await
    .context("the stale leader's write is refused")?;
    world
        .wait_key(&world.key("topics", "t"), |v| v["durability"] == "Memory")
        .await?;
    let reclaim = world.etcd.read_fence(&fence).await?.context("fence")?;
    ensure!(
        reclaim.value.identity == "op-a" && reclaim.value.term > term + 1,
        "re-claimed with a newer term: {reclaim:?}"
    );
    ensure!(operator.metric("ferry_operator_leader_term") == reclaim.value.term as f64);

    // etcd's history: at the re-claim, the topic still held what it held before the
    // intruder's claim, so no write of the stale leader landed in between.
    let key = world.key("topics", "t");
    let at_reclaim = world
        .cp
        .etcdctl([
            "get",
            key.as_str(),
            "--print-value-only",
            &format!("--rev={}", reclaim.mod_revision),
        ])
        .await?;
    let value: serde_json::Value = serde_json::from_slice(&at_reclaim.stdout)
        .with_context(|| String::from_utf8_lossy(&at_reclaim.stderr).into_owned())?;
    ensure!(
        value["durability"] == "Disk",
        "written between the claims {} and {}: {value}",
        intruder_claim.mod_revision,
        reclaim.mod_revision
    );

    // And now the intruder is the stale one.
    match intruder.put(&world.key("topics", "t"), "{}").await {
        Err(Error::Fenced { .. }) => {}
        other => bail!("the intruder could still write: {other:?}"),
    }
    operator.stop().await
}

/// Converges a Topic, a ConsumerGroup with one ready member, and a Subscription.
async fn converge_three(world: &World, node_name: &str, ip: &str) -> Result<()> {
    world.apply::<Topic>(topic("t", "Disk")).await?;
    world.apply::<ConsumerGroup>(group("g", "w")).await?;
    world
        .apply::<Subscription>(subscription("s", "t", "g"))
        .await?;
    let manifest: Pod = serde_json::from_value(pod("w1", "w", node_name, "native"))?;
    world
        .api::<Pod>()
        .create(&PostParams::default(), &manifest)
        .await?;
    set_pod_status(world, "w1", ip, true).await?;
    topic_ready(world, "t", "True").await?;
    subscription_ready(world, "s", "True").await?;
    wait_members(world, "g", &["w1"], CONVERGE).await?;
    world
        .wait_key(&world.key("pods", "w1"), |v| v["podIP"] == ip)
        .await?;
    wait_for_value(CONVERGE, || async {
        let g = world.api::<ConsumerGroup>().get("g").await?;
        Ok(g.status.is_some_and(|s| s.ready_members == 1).then_some(()))
    })
    .await
    .context("the group's status counts its member")
}

#[tokio::test]
async fn a_standby_takes_over_after_a_crash_and_changes_nothing() -> Result<()> {
    let world = World::new("failover").await?;
    let nodes: Api<Node> = Api::all(world.client.clone());
    let node_name = format!("{}-node", world.ns);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;

    let leader = Operator::start(world.config("op-leader")).await?;
    leader.wait_leading().await?;
    let standby = Operator::start(world.config("op-standby")).await?;
    converge_three(&world, &node_name, "10.4.0.1").await?;
    ensure!(standby.http_get("/readyz").await? == (200, "standby\n".into()));
    ensure!(standby.metric("ferry_operator_leader") == 0.0);
    let before = world.table_revision().await?;
    let versions_before = versions(&world).await?;

    // The leader dies without releasing the Lease: the standby waits for it to expire.
    leader.kill().await?;
    standby.wait_leading().await?;
    standby.wait_reconciled_all().await?;
    let after = world.table_revision().await?;
    ensure!(
        before == after,
        "failover wrote routing keys: {before:?} -> {after:?}"
    );
    ensure!(
        versions(&world).await? == versions_before,
        "failover patched an object"
    );
    standby.assert_wrote_nothing()?;

    // The new leader acts on changes.
    world.apply::<Topic>(topic("t", "Memory")).await?;
    world
        .wait_key(&world.key("topics", "t"), |v| v["durability"] == "Memory")
        .await?;
    standby.stop().await?;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn reconciling_again_and_again_writes_nothing() -> Result<()> {
    let world = World::new("again").await?;
    let operator = Operator::start(world.config("op-a")).await?;
    world.apply::<Topic>(topic("t", "Disk")).await?;
    world.apply::<ConsumerGroup>(group("g", "w")).await?;
    world
        .apply::<Subscription>(subscription("s", "t", "g"))
        .await?;
    topic_ready(&world, "t", "True").await?;
    subscription_ready(&world, "s", "True").await?;
    operator.stop().await?;

    // Call the reconcilers directly, as the controller would, with a writer of a newer term.
    let held = world.etcd.read_fence(&world.fence_key()).await?;
    let term = held.map_or(0, |f| f.value.term) + 1;
    let writer = world
        .etcd
        .claim(
            &world.fence_key(),
            "direct",
            term,
            LeaseGuard::new(CONVERGE),
        )
        .await?;
    let metrics = Arc::new(Metrics::new());
    let (pods, _pod_writer) = reflector::store();
    let (nodes, _node_writer) = reflector::store();
    let ctx = Arc::new(Context::new(
        world.client.clone(),
        writer,
        metrics.clone(),
        7710,
        pods,
        nodes,
    ));
    let before = world.table_revision().await?;
    let objects = |w: &World| {
        let (topics, subscriptions) = (w.api::<Topic>(), w.api::<Subscription>());
        async move {
            Ok::<_, anyhow::Error>((
                topics.get("t").await?.resource_version(),
                subscriptions.get("s").await?.resource_version(),
            ))
        }
    };
    let versions_before = objects(&world).await?;
    const ROUNDS: usize = 5;
    for _ in 0..ROUNDS {
        let t = Arc::new(world.api::<Topic>().get("t").await?);
        reconcile::topic::reconcile(t, ctx.clone()).await?;
        let s = Arc::new(world.api::<Subscription>().get("s").await?);
        reconcile::subscription::reconcile(s, ctx.clone()).await?;
    }
    ensure!(
        world.table_revision().await? == before,
        "a reconcile wrote etcd"
    );
    ensure!(
        objects(&world).await? == versions_before,
        "a reconcile patched an object"
    );
    let text = metrics.encode();
    let sample = format!("ferry_operator_reconciles_total{{kind=\"Topic\"}} {ROUNDS}");
    ensure!(text.contains(&sample), "{text}");
    ensure!(
        !text.contains("ferry_operator_status_patches_total{"),
        "{text}"
    );
    println!("{ROUNDS} rounds of reconciles: table revision {before:?}, no patch, no put");
    Ok(())
}
