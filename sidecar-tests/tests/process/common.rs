//! Small builders for the CR and pods YAML the tests start meshes with.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer};
use ferry_sidecar_tests::history::{Counts, Expect, History};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A Topic document; `spec` is a YAML flow mapping's inside, e.g. `durability: Disk`.
pub fn topic(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
    )
}

/// A ConsumerGroup of the pods labelled `app: <app>`; `spec` adds fields.
pub fn group(name: &str, app: &str, spec: &str) -> String {
    let sep = if spec.is_empty() { "" } else { ", " };
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {{name: {name}}}\nspec: {{selector: {{matchLabels: {{app: {app}}}}}{sep}{spec}}}\n"
    )
}

/// A Subscription; `spec` adds fields.
pub fn subscription(name: &str, topic: &str, group: &str, spec: &str) -> String {
    let sep = if spec.is_empty() { "" } else { ", " };
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec: {{topic: {topic}, group: {group}{sep}{spec}}}\n"
    )
}

/// One line of a pods file; `app` empty for a pod in no group.
pub fn pod(name: &str, zone: &str, app: &str) -> String {
    if app.is_empty() {
        format!("- {{name: {name}, zone: {zone}}}\n")
    } else {
        format!("- {{name: {name}, zone: {zone}, labels: {{app: {app}}}}}\n")
    }
}

/// The pods of the single-producer tests: `producer`, and `reader-a` (app `reader`), both
/// in `zone-a`.
pub fn producer_and_reader() -> String {
    [
        pod("reader-a", "zone-a", "reader"),
        pod("producer", "zone-a", ""),
    ]
    .concat()
}

/// The Disk Topic `ledger`, read by group `readers` (Subscription `readers-ledger`,
/// `ackWait: 5s`), on the pods of [`producer_and_reader`].
pub async fn ledger_mesh() -> anyhow::Result<TestMesh> {
    let crs = [
        topic("ledger", "durability: Disk"),
        group("readers", "reader", ""),
        subscription("readers-ledger", "ledger", "readers", "ackWait: 5s"),
    ]
    .concat();
    TestMesh::start(&crs, &producer_and_reader()).await
}

/// Reads `default/ledger` back through `reader-a` (the pods of [`producer_and_reader`],
/// Subscription `default/readers-ledger` of group `readers`) until every acked message is
/// delivered, then prints and returns the counts.
pub async fn read_back_ledger(
    mesh: &TestMesh,
    history: &History,
    test: &str,
) -> anyhow::Result<Counts> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = super::durable_app::reconnecting_consumer(
        mesh.app_addr("reader-a")?,
        "default/readers-ledger",
        "readers",
        "reader-a",
        history.clone(),
        stop.clone(),
    );
    let expect = [Expect::AnyMember {
        group: "readers".into(),
        topic: "default/ledger".into(),
        check_order: false,
    }];
    let counts = drain(history, &expect, Duration::from_secs(60), test).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = consumer.await;
    counts
}

/// How long a test lets its consumers run at most.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Waits until nothing is lost against `expect` (the drain), then prints and returns the
/// counts.
pub async fn drain(
    history: &History,
    expect: &[Expect],
    timeout: Duration,
    test: &str,
) -> anyhow::Result<Counts> {
    let result =
        ferry_sidecar_tests::harness::wait_for(timeout, "every acked message delivered", || {
            history.check(expect).lost == 0
        })
        .await;
    let counts = history.check(expect);
    println!("{test}: history {counts}");
    result.map(|()| counts)
}

/// The mesh most process tests start from, all in zone-a: the Topic `orders`
/// (`topic_spec`), the group `billing` with one member `billing-a`, the Subscription
/// `billing-orders` (`subscription_spec`), and a `producer` pod in no group.
pub async fn orders_mesh(topic_spec: &str, subscription_spec: &str) -> anyhow::Result<TestMesh> {
    orders_mesh_with_env(topic_spec, subscription_spec, &[]).await
}

/// [`orders_mesh`] with extra environment for every sidecar (`FERRY_*` flags), restarts
/// included.
pub async fn orders_mesh_with_env(
    topic_spec: &str,
    subscription_spec: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<TestMesh> {
    let crs = [
        topic("orders", topic_spec),
        group("billing", "billing", ""),
        subscription("billing-orders", "orders", "billing", subscription_spec),
    ]
    .concat();
    let pods = [
        pod("billing-a", "zone-a", "billing"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    TestMesh::start_with_env(&crs, &pods, env).await
}

/// Publishes one message per id to `default/orders` from the `producer` pod, each acked
/// before the next, all with `payload`.
pub async fn publish_orders(
    mesh: &TestMesh,
    history: &History,
    ids: impl IntoIterator<Item = String>,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut app = mesh.app("producer").await?;
    for id in ids {
        publish(
            &mut app,
            history,
            "producer",
            "default/orders",
            &id,
            None,
            payload.to_vec(),
        )
        .await?;
    }
    Ok(())
}

/// Starts the `billing-a` app of [`orders_mesh`]: it consumes `default/billing-orders` and
/// acks everything, for at most [`RUN_LIMIT`].
pub async fn billing_consumer(
    mesh: &TestMesh,
    history: &History,
) -> anyhow::Result<JoinHandle<anyhow::Result<u64>>> {
    spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await
}

/// [`drain`] for [`orders_mesh`]: every acked order reaches the `billing` group once.
pub async fn drain_orders(
    history: &History,
    timeout: Duration,
    test: &str,
) -> anyhow::Result<Counts> {
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: "default/orders".into(),
        check_order: false,
    }];
    drain(history, &expect, timeout, test).await
}

/// The sum of a pod's sidecar metric samples for `topic` whose name contains `word`
/// (`dropped`, `backlog_bytes`; not the `_created` timestamps).
pub async fn topic_metric(
    mesh: &TestMesh,
    pod: &str,
    word: &str,
    topic: &str,
) -> anyhow::Result<f64> {
    let samples = ferryctl::metrics::scrape(mesh.mesh.endpoints(pod)?.admin).await?;
    Ok(samples
        .iter()
        .filter(|s| s.name.contains(word) && !s.name.ends_with("_created"))
        .filter(|s| s.labels.get("topic").is_some_and(|t| t == topic))
        .map(|s| s.value)
        .sum())
}

/// Waits until `pod`'s sidecar holds nothing of `topic` unsettled (`backlog_bytes` 0): from
/// then on it has nothing left to deliver or redeliver.
pub async fn wait_settled(
    mesh: &TestMesh,
    pod: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if topic_metric(mesh, pod, "backlog_bytes", topic).await? == 0.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{pod} still holds unsettled messages of {topic} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
