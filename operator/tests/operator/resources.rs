//! Topics, ConsumerGroups and Subscriptions → the routing table and their statuses.

use anyhow::{Context as _, Result, ensure};
use ferry_api::routing::{GroupEntry, SubscriptionEntry, TopicEntry};
use ferry_api::{ConsumerGroup, Subscription, Topic};
use ferry_kind_tests::wait_for_value;
use kube::ResourceExt;
use kube::api::DeleteParams;

use crate::support::*;

#[tokio::test]
async fn resources_reach_etcd_turn_ready_and_leave_on_delete() -> Result<()> {
    let world = World::new("crud").await?;
    let operator = Operator::start(world.config("op-a")).await?;

    world.apply::<Topic>(topic("orders", "Disk")).await?;
    world
        .apply::<ConsumerGroup>(group("billing", "billing"))
        .await?;
    world
        .apply::<Subscription>(subscription("billing-orders", "orders", "billing"))
        .await?;

    // Statuses: Ready, for the current generation, and the finalizer is on.
    let t = topic_ready(&world, "orders", "True").await?;
    let g = group_ready(&world, "billing").await?;
    let s = subscription_ready(&world, "billing-orders", "True").await?;
    for finalizers in [t.finalizers(), g.finalizers(), s.finalizers()] {
        ensure!(
            finalizers == ["ferry.dev/routing-table"],
            "finalizers: {finalizers:?}"
        );
    }

    // etcd holds exactly the entries the api crate computes from the stored objects.
    let value = world
        .wait_key(&world.key("topics", "orders"), |_| true)
        .await?;
    ensure!(serde_json::from_value::<TopicEntry>(value)? == TopicEntry::from_topic(&t)?);
    let value = world
        .wait_key(&world.key("groups", "billing"), |_| true)
        .await?;
    ensure!(serde_json::from_value::<GroupEntry>(value)? == GroupEntry::from_group(&g));
    let value = world
        .wait_key(&world.key("subscriptions", "billing-orders"), |_| true)
        .await?;
    let entry: SubscriptionEntry = serde_json::from_value(value)?;
    ensure!(entry == SubscriptionEntry::from_subscription(&s)?);
    ensure!(entry.topic == format!("{}/orders", world.ns));
    // Cross-checked with etcdctl, independently of the operator's own client.
    let out = world
        .cp
        .etcdctl([
            "get",
            "--prefix",
            "--keys-only",
            &format!("/ferry/v1/topics/{}/", world.ns),
        ])
        .await?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains(&world.key("topics", "orders")));

    // A spec change: new generation, new value, observedGeneration follows.
    world.apply::<Topic>(topic("orders", "Memory")).await?;
    world
        .wait_key(&world.key("topics", "orders"), |v| {
            v["durability"] == "Memory"
        })
        .await?;
    let t = topic_ready(&world, "orders", "True").await?;
    ensure!(
        t.metadata.generation == Some(2),
        "generation {:?}",
        t.metadata.generation
    );

    // Metrics and health on the metrics address.
    let (code, body) = operator.http_get("/metrics").await?;
    ensure!(code == 200, "/metrics {code}");
    ensure!(
        body.contains("ferry_operator_reconciles_total{kind=\"Topic\"}"),
        "{body}"
    );
    ensure!(
        body.contains("ferry_operator_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    ensure!(operator.http_get("/healthz").await? == (200, "ok\n".into()));
    ensure!(operator.http_get("/readyz").await? == (200, "leading\n".into()));

    // Delete: the keys go, then the objects go (the finalizer waited for etcd).
    world
        .api::<Subscription>()
        .delete("billing-orders", &DeleteParams::default())
        .await?;
    world
        .api::<ConsumerGroup>()
        .delete("billing", &DeleteParams::default())
        .await?;
    world
        .api::<Topic>()
        .delete("orders", &DeleteParams::default())
        .await?;
    wait_gone::<Subscription>(&world, "billing-orders").await?;
    wait_gone::<ConsumerGroup>(&world, "billing").await?;
    wait_gone::<Topic>(&world, "orders").await?;
    let table = world.table().await?;
    ensure!(table.is_empty(), "keys left after delete: {table:?}");

    operator.stop().await
}

#[tokio::test]
async fn a_subscription_waits_for_its_topic_and_group() -> Result<()> {
    let world = World::new("missing").await?;
    let operator = Operator::start(world.config("op-a")).await?;

    world.apply::<ConsumerGroup>(group("g", "g")).await?;
    world
        .apply::<Subscription>(subscription("s", "later", "g"))
        .await?;
    world
        .apply::<Subscription>(subscription("s2", "later", "nogroup"))
        .await?;

    let s = subscription_ready(&world, "s", "False").await?;
    let conds = s.status.map(|s| s.conditions).unwrap_or_default();
    let c = ready(&conds).context("Ready condition")?;
    ensure!(c.reason == "TopicNotFound", "{c:?}");
    ensure!(c.message.contains(&format!("{}/later", world.ns)), "{c:?}");

    let s2 = subscription_ready(&world, "s2", "False").await?;
    let conds = s2.status.map(|s| s.conditions).unwrap_or_default();
    let c = ready(&conds).context("Ready condition")?;
    ensure!(
        c.reason == "TopicNotFound" && c.message.contains("nogroup"),
        "both named: {c:?}"
    );
    ensure!(
        !world
            .table()
            .await?
            .contains_key(&world.key("subscriptions", "s"))
    );

    // The topic appears: s turns Ready through the Topic watch; s2 now lacks its group only.
    world.apply::<Topic>(topic("later", "Disk")).await?;
    subscription_ready(&world, "s", "True").await?;
    world
        .wait_key(&world.key("subscriptions", "s"), |_| true)
        .await?;
    let s2 = wait_for_value(CONVERGE, || async {
        let s2 = world.api::<Subscription>().get("s2").await?;
        let reason = s2
            .status
            .as_ref()
            .and_then(|s| ready(&s.conditions).map(|c| c.reason.clone()));
        Ok((reason.as_deref() == Some("GroupNotFound")).then_some(s2))
    })
    .await
    .context("s2 becomes GroupNotFound")?;
    let conds = s2.status.map(|s| s.conditions).unwrap_or_default();
    ensure!(ready(&conds).is_some_and(|c| c.message.contains(&format!("{}/nogroup", world.ns))));

    // The group appears too: s2 turns Ready through the ConsumerGroup watch.
    world.apply::<ConsumerGroup>(group("nogroup", "x")).await?;
    subscription_ready(&world, "s2", "True").await?;

    // The topic goes: both subscriptions leave the table and say so.
    world
        .api::<Topic>()
        .delete("later", &DeleteParams::default())
        .await?;
    world
        .wait_no_key(&world.key("subscriptions", "s"), CONVERGE)
        .await?;
    world
        .wait_no_key(&world.key("subscriptions", "s2"), CONVERGE)
        .await?;
    subscription_ready(&world, "s", "False").await?;

    operator.stop().await
}

#[tokio::test]
async fn deleting_while_the_operator_is_down_waits_for_it() -> Result<()> {
    let world = World::new("down").await?;
    let operator = Operator::start(world.config("op-a")).await?;
    world.apply::<Topic>(topic("t", "Disk")).await?;
    topic_ready(&world, "t", "True").await?;
    world.wait_key(&world.key("topics", "t"), |_| true).await?;
    operator.stop().await?;

    world
        .api::<Topic>()
        .delete("t", &DeleteParams::default())
        .await?;
    let t = world.api::<Topic>().get("t").await?;
    ensure!(
        t.metadata.deletion_timestamp.is_some(),
        "Terminating while the operator is down"
    );
    world.wait_key(&world.key("topics", "t"), |_| true).await?;

    let operator = Operator::start(world.config("op-b")).await?;
    world
        .wait_no_key(&world.key("topics", "t"), CONVERGE)
        .await?;
    wait_gone::<Topic>(&world, "t").await?;
    operator.stop().await
}
