//! docs/reliability.md rows 15 (`etcd_outage`, operator side) and 17 (`apiserver_outage`), CI
//! smoke variants: each outage is a real SIGSTOP of the real process for a few seconds.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use ferry_api::Topic;
use ferry_api::{ConsumerGroup, Subscription};
use ferry_kind_tests::wait_for_value;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::Api;

use crate::faults::*;
use crate::support::*;

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(5);

/// Most reconcile errors per second of outage that count as "backing off" (the objects
/// here are four; a hot loop would make hundreds).
const MAX_ERRORS_PER_SECOND: f64 = 20.0;

/// Rows 15 and 20(b): the routing table's etcd is paused while a Topic is created, another
/// one is changed and a third is deleted. The operator keeps running, retries with backoff, does not claim Ready for
/// what it could not write, and writes it all once etcd is back.
///
/// The routing etcd is an etcd of its own, as in production: pausing the API server's etcd
/// would stop the CR changes themselves from being stored.
#[tokio::test]
async fn etcd_outage() -> Result<()> {
    let world = World::new("etcd-outage").await?;
    let etcd = RoutingEtcd::start(world.cp).await?;
    let routing = etcd.store().await?;
    let mut config = world.config("op-etcd-outage");
    config.etcd_endpoints = vec![etcd.endpoint.clone()];
    // A paused etcd fails each request after this, so the retries (not the timeout) are
    // what the outage exercises.
    config.etcd_timeout = Duration::from_secs(1);
    let operator = Operator::start(config).await?;
    operator.wait_leading().await?;

    world.apply::<Topic>(topic("changed", "Disk")).await?;
    world.apply::<ConsumerGroup>(group("g", "w")).await?;
    world
        .apply::<Subscription>(subscription("s", "changed", "g"))
        .await?;
    // Row 20(b): "doomed" is deleted while etcd is down.
    world.apply::<Topic>(topic("doomed", "Disk")).await?;
    topic_ready(&world, "changed", "True").await?;
    topic_ready(&world, "doomed", "True").await?;
    group_ready(&world, "g").await?;
    subscription_ready(&world, "s", "True").await?;
    let changed_key = world.key("topics", "changed");
    let new_key = world.key("topics", "created");
    let doomed_key = world.key("topics", "doomed");
    wait_for_value(CONVERGE, || async {
        let kv = routing
            .get_keys(&[changed_key.clone(), doomed_key.clone()])
            .await?;
        Ok((kv.contains_key(&changed_key) && kv.contains_key(&doomed_key)).then_some(()))
    })
    .await
    .context("the topic reaches the routing etcd")?;

    let errors_of = |text: &str| {
        (
            metric_sum(text, "ferry_operator_reconcile_errors_total", &[]),
            metric_sum(
                text,
                "ferry_operator_reconcile_errors_total",
                &["reason=\"etcd\""],
            ),
        )
    };
    let (_, body) = operator.http_get("/metrics").await?;
    let (errors_before, etcd_errors_before) = errors_of(&body);

    // The outage: etcd frozen, CR changes go on in the API server.
    let pid = etcd.pid()?;
    pause(pid).await?;
    let paused = Paused(pid);
    let start = Instant::now();
    world.apply::<Topic>(topic("created", "Memory")).await?;
    world.apply::<Topic>(topic("changed", "Memory")).await?;
    world
        .api::<Topic>()
        .delete("doomed", &Default::default())
        .await?;
    let changed_generation = world
        .api::<Topic>()
        .get("changed")
        .await?
        .metadata
        .generation;
    // Ready tells the truth during the outage: the new generations are not in the table.
    let unavailable = |t: &Topic| {
        t.status.as_ref().is_some_and(|s| {
            ready(&s.conditions).is_some_and(|c| {
                c.status == "False"
                    && c.reason == "RoutingTableUnavailable"
                    && c.observed_generation == t.metadata.generation
            })
        })
    };
    wait_for_value(OUTAGE * 3, || async {
        let changed = world.api::<Topic>().get("changed").await?;
        let created = world.api::<Topic>().get("created").await?;
        Ok((unavailable(&changed) && unavailable(&created)).then_some(()))
    })
    .await
    .context("both topics say RoutingTableUnavailable while etcd is paused")?;
    // The rest of the fault window: etcd stays frozen for at least OUTAGE.
    tokio::time::sleep(OUTAGE.saturating_sub(start.elapsed())).await;

    // During the outage: still running, still leading, healthy, and no status claims the
    // new generation is Ready (it is not in the table) — they say why instead.
    ensure_running(&operator.running.task)?;
    ensure!(
        operator.metric("ferry_operator_leader") == 1.0,
        "still leads"
    );
    ensure!(operator.http_get("/healthz").await? == (200, "ok\n".into()));
    let changed = world.api::<Topic>().get("changed").await?;
    let created = world.api::<Topic>().get("created").await?;
    let claims_ready = |t: &Topic| {
        t.status.as_ref().is_some_and(|s| {
            ready(&s.conditions).is_some_and(|c| {
                c.status == "True" && c.observed_generation == t.metadata.generation
            })
        })
    };
    println!(
        "during the outage: changed (generation {changed_generation:?}) status {:?}; created status {:?}",
        changed.status, created.status
    );
    ensure!(
        !claims_ready(&changed) && !claims_ready(&created),
        "a status claims Ready for a generation etcd never got"
    );
    // The deleted topic waits, Terminating with its finalizer, for its key to go.
    let doomed = world.api::<Topic>().get_opt("doomed").await?;
    ensure!(
        doomed
            .as_ref()
            .is_some_and(|t| t.metadata.deletion_timestamp.is_some()
                && t.finalizers()
                    .iter()
                    .any(|f| f == ferry_api::consts::FINALIZER)),
        "a topic deleted while etcd is down lost its finalizer before its key: {doomed:?}"
    );
    let (_, body) = operator.http_get("/metrics").await?;
    let (errors_during, etcd_errors_during) = errors_of(&body);
    let outage = start.elapsed().as_secs_f64();
    resume(pid).await?;
    drop(paused);

    let errors = errors_during - errors_before;
    let etcd_errors = etcd_errors_during - etcd_errors_before;
    println!(
        "etcd paused {outage:.1}s: {errors} reconcile errors ({etcd_errors} etcd), {:.2}/s",
        errors / outage
    );
    ensure!(
        etcd_errors >= 1.0,
        "the outage was not noticed (no etcd error counted)"
    );
    ensure!(
        errors / outage < MAX_ERRORS_PER_SECOND,
        "a hot loop: {errors} errors in {outage:.1}s"
    );

    // After: the changes made during the outage reach etcd, the statuses turn Ready for
    // their generation, and the operator is the same task, still leading.
    let recovered = Instant::now();
    wait_for_value(CONVERGE, || async {
        let kv = routing
            .get_keys(&[changed_key.clone(), new_key.clone()])
            .await?;
        let memory = |k: &String| {
            kv.get(k)
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                .is_some_and(|v| v["durability"] == "Memory")
        };
        Ok((memory(&changed_key) && memory(&new_key)).then_some(()))
    })
    .await
    .context("the changes made during the outage reach etcd")?;
    topic_ready(&world, "changed", "True").await?;
    topic_ready(&world, "created", "True").await?;
    // The deleted topic's key goes first, then the object.
    wait_for_value(CONVERGE, || async {
        let kv = routing.get_keys(std::slice::from_ref(&doomed_key)).await?;
        Ok((!kv.contains_key(&doomed_key)).then_some(()))
    })
    .await
    .context("the topic deleted during the outage leaves etcd")?;
    wait_gone::<Topic>(&world, "doomed").await?;
    subscription_ready(&world, "s", "True").await?;
    println!(
        "after SIGCONT: etcd holds both changes and they are Ready after {:.1}s",
        recovered.elapsed().as_secs_f64()
    );
    ensure_running(&operator.running.task)?;
    ensure!(operator.metric("ferry_operator_leader") == 1.0);
    operator.stop().await
}

/// Row 17: the API server is paused. The routing table does not change at all during the
/// outage or when the operator comes back; the operator survives, holds the Lease again,
/// and acts on a CR change afterwards.
#[tokio::test]
async fn apiserver_outage() -> Result<()> {
    let world = private_world("apiserver-outage").await?;
    let result = apiserver_outage_on(&world).await;
    stop_private(world.cp).await?;
    result
}

async fn apiserver_outage_on(world: &World) -> Result<()> {
    let identity = "op-apiserver-outage";
    let mut config = world.config(identity);
    config.lease_duration = Duration::from_secs(3);
    config.renew_deadline = Duration::from_secs(2);
    let operator = Operator::start(config).await?;
    operator.wait_leading().await?;
    world.apply::<Topic>(topic("t", "Disk")).await?;
    world.apply::<ConsumerGroup>(group("g", "w")).await?;
    world
        .apply::<Subscription>(subscription("s", "t", "g"))
        .await?;
    topic_ready(world, "t", "True").await?;
    group_ready(world, "g").await?;
    subscription_ready(world, "s", "True").await?;
    let table = world.table().await?;
    let revision = world.table_revision().await?;
    let term_before = operator.metric("ferry_operator_leader_term");
    let changes_before = operator.metric("ferry_operator_etcd_changes_total");
    let reconciles_before: Vec<f64> = ["Topic", "ConsumerGroup", "Subscription"]
        .iter()
        .map(|k| operator.metric(&format!("ferry_operator_reconciles_total{{kind=\"{k}\"}}")))
        .collect();
    println!("before: table {revision:?} (max mod_revision, keys), term {term_before}");

    let pid = control_plane_pid(world.cp, "kube-apiserver")?;
    pause(pid).await?;
    let paused = Paused(pid);
    let start = Instant::now();
    let mut samples = 0;
    let mut stepped_down = None;
    // The fault window: sample the routing table (etcd stays up) for OUTAGE, and longer if
    // need be (up to a deadline) until the leader, which cannot renew, has stepped down.
    while start.elapsed() < OUTAGE || (stepped_down.is_none() && start.elapsed() < 3 * OUTAGE) {
        let now = world.table_revision().await?;
        ensure!(
            now == revision,
            "the routing table changed during the outage: {revision:?} -> {now:?}"
        );
        if stepped_down.is_none() && operator.metric("ferry_operator_leader") == 0.0 {
            stepped_down = Some(start.elapsed());
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure_running(&operator.running.task)?;
    resume(pid).await?;
    drop(paused);
    println!(
        "API server paused {:.1}s: table unchanged in {samples} samples; stepped down after {stepped_down:?}",
        start.elapsed().as_secs_f64()
    );
    // Renewals fail for longer than the renew deadline: the leader must stop writing.
    ensure!(
        stepped_down.is_some(),
        "the leader kept leading without renewals"
    );

    // Back: the Lease is ours again, every kind is reconciled again, and that wrote nothing.
    let leases: Api<Lease> = Api::namespaced(world.client.clone(), &world.ns);
    wait_for_value(CONVERGE, || async {
        let holder = leases
            .get("ferry-operator")
            .await?
            .spec
            .and_then(|s| s.holder_identity);
        Ok(
            (holder.as_deref() == Some(identity)
                && operator.metric("ferry_operator_leader") == 1.0)
                .then_some(()),
        )
    })
    .await
    .context("the operator holds the Lease again")?;
    wait_for_value(CONVERGE, || async {
        let again = ["Topic", "ConsumerGroup", "Subscription"]
            .iter()
            .zip(&reconciles_before)
            .all(|(k, before)| {
                operator.metric(&format!("ferry_operator_reconciles_total{{kind=\"{k}\"}}"))
                    > *before
            });
        Ok(again.then_some(()))
    })
    .await
    .context("the new leadership reconciles every kind")?;
    let term_after = operator.metric("ferry_operator_leader_term");
    let after = world.table_revision().await?;
    println!("after: table {after:?}, term {term_before} -> {term_after}");
    ensure!(
        after == revision,
        "the table was written: {revision:?} -> {after:?}"
    );
    ensure!(world.table().await? == table);
    ensure!(
        operator.metric("ferry_operator_etcd_changes_total") == changes_before,
        "a reconcile after the outage changed etcd keys"
    );
    ensure!(term_after > term_before, "re-acquired with a new term");
    ensure_running(&operator.running.task)?;

    // And it acts on changes again.
    world.apply::<Topic>(topic("t", "Memory")).await?;
    world
        .wait_key(&world.key("topics", "t"), |v| v["durability"] == "Memory")
        .await?;
    topic_ready(world, "t", "True").await?;
    operator.stop().await
}
