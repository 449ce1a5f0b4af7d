//! DESIGN "Only durable records are delivered", docs/reliability.md row 10 with a consumer
//! running during the fault: the `fsync` of a `Disk` topic's segment fails (the sidecar's
//! `log::fsync` failpoint, feature `failpoints`) while the reading app is connected.
//!
//! A publish whose fsync failed is refused to the producer and never reaches the consumer,
//! neither while the fault lasts (its record was written to the page cache, not made
//! durable) nor after a restart (it must not come back from the segment file). The
//! poisoned log makes the producer's sidecar not ready (`/readyz` on the admin port), is
//! counted in `ferry_sidecar_log_poisoned{topic}`, and its log line says to restart.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{TestMesh, wait_for};
use ferry_sidecar_tests::history::{Expect, History};

use super::common::{drain, ledger_mesh, topic_metric};
use super::durable_app::{publish_with, reconnecting_consumer};

const LEDGER: &str = "default/ledger";

/// `GET /readyz` of `pod`'s sidecar: its status code and body.
async fn readyz(mesh: &TestMesh, pod: &str) -> anyhow::Result<(u16, String)> {
    let r = ferryctl::http::get(mesh.mesh.endpoints(pod)?.admin, "/readyz").await?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// Ids attempted but never acked to their publisher.
fn refused(history: &History) -> BTreeSet<String> {
    let acked = history.acked_ids();
    history
        .attempted_ids()
        .into_iter()
        .filter(|id| !acked.contains(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_whose_fsync_failed_is_never_delivered() -> anyhow::Result<()> {
    let mut mesh = ledger_mesh().await?;
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = reconnecting_consumer(
        mesh.app_addr("reader-a")?,
        "default/readers-ledger",
        "readers",
        "reader-a",
        history.clone(),
        stop.clone(),
    );
    let expect = [Expect::AnyMember {
        group: "readers".into(),
        topic: LEDGER.into(),
        check_order: false,
    }];

    // Every fsync of the ledger's segment files fails from the producer's start on, before
    // its log exists (an existing log is fsynced when it is opened, which would fail the
    // open instead); the reader stays connected to its own sidecar, which the producer's
    // sidecar forwards to.
    let fault = vec![(
        "FAILPOINTS".to_owned(),
        "log::fsync=return(ledger/0000)".to_owned(),
    )];
    mesh.mesh.restart_with_env("producer", &fault).await?;
    let mut app = mesh.app("producer").await?;
    for i in 0..10 {
        let id = format!("failing-{i}");
        if let Ok(ok) = publish_with(&mut app, &history, LEDGER, &id, |_| {}).await {
            anyhow::bail!("{id} was acked while fsync fails: {ok:?}");
        }
    }

    // The poisoned log says so: not ready, counted, and a line saying what to do. Each
    // broken promise is collected, so that one run shows all of them.
    let mut broken = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = readyz(&mesh, "producer").await?;
        if status != 200 || tokio::time::Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("durable_only: /readyz of the poisoned producer: {status} {body:?}");
    if status != 503 || !body.contains(LEDGER) || !body.contains("restart") {
        broken.push(format!(
            "/readyz of a poisoned log must be 503 naming the topic and saying to restart: {status} {body:?}"
        ));
    }
    let poisoned = topic_metric(&mesh, "producer", "log_poisoned", LEDGER).await?;
    if poisoned != 1.0 {
        broken.push(format!(
            "ferry_sidecar_log_poisoned{{topic={LEDGER}}} = {poisoned}"
        ));
    }
    let lines = mesh.log_lines("producer", "poisoned")?;
    if !lines.iter().any(|l| l.contains("restart the sidecar")) {
        broken.push("no log line says to restart the poisoned sidecar".to_owned());
    }
    let during: BTreeSet<String> = history
        .deliveries()
        .into_iter()
        .map(|d| d.message_id)
        .filter(|id| id.starts_with("failing-"))
        .collect();
    println!("durable_only: refused publishes delivered during the fault: {during:?}");

    // Restarted without the fault: what the failed fsyncs wrote must not come back. The
    // messages published after it are delivered after any older record of the log, so
    // once they all arrived the refused ones had every chance to.
    mesh.mesh.restart("producer").await?;
    let mut app = mesh.app("producer").await?;
    for i in 0..20 {
        publish_with(&mut app, &history, LEDGER, &format!("after-{i}"), |_| {}).await?;
    }
    let after: BTreeSet<String> = (0..20).map(|i| format!("after-{i}")).collect();
    wait_for(Duration::from_secs(60), "every after-* delivered", || {
        let got: BTreeSet<String> = history
            .deliveries()
            .into_iter()
            .map(|d| d.message_id)
            .collect();
        after.is_subset(&got)
    })
    .await?;
    let counts = drain(&history, &expect, Duration::from_secs(30), "durable_only").await?;
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.await;

    let refused = refused(&history);
    let delivered_refused: BTreeSet<String> = history
        .deliveries()
        .into_iter()
        .map(|d| d.message_id)
        .filter(|id| refused.contains(id))
        .collect();
    println!(
        "durable_only: refused={} delivered after refusal={} {delivered_refused:?}",
        refused.len(),
        delivered_refused.len()
    );
    anyhow::ensure!(refused.len() == 10, "10 publishes refused: {counts}");
    if !delivered_refused.is_empty() {
        broken.push(format!(
            "refused publishes reached the consumer: {delivered_refused:?} ({} while the fault lasted)",
            during.len()
        ));
    }
    anyhow::ensure!(broken.is_empty(), "{}", broken.join("; "));
    anyhow::ensure!(counts.acked == 20, "20 publishes acked: {counts}");
    anyhow::ensure!(
        (counts.lost, counts.unexpected) == (0, 0),
        "lost or unexpected messages: {counts}"
    );
    anyhow::ensure!(
        counts.unexplained_duplicates == 0,
        "duplicates no redelivery explains: {counts}"
    );
    mesh.mesh.shutdown().await;
    Ok(())
}

/// The same promise for `Replicated` (`replicas: 3`): with one of the two peers that can
/// hold a copy paused, a publish is refused (UNAVAILABLE, one answered) while the consumer
/// runs on the other peer; the refused message must not reach it, though the producer's
/// log stored and fsynced it, and the paused peer's return changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_publish_refused_for_missing_copies_is_never_delivered() -> anyhow::Result<()>
{
    use super::common::{group, pod, subscription, topic};
    use ferry_sidecar_tests::harness::{Behavior, publish, spawn_consumer};
    use nix::sys::signal::Signal;

    let crs = [
        topic("orders", "durability: Replicated, replicas: 3"),
        group("senders", "senders", ""),
        group("billing", "billing", ""),
        group("spares", "spare", ""),
        subscription("billing-orders", "orders", "billing", ""),
    ]
    .concat();
    let pods = [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-b", "billing"),
        pod("spare-a", "zone-b", "spare"),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("billing-a")?,
        "default/billing-orders",
        "billing",
        "billing-a",
        &history,
        Behavior::Ack,
        tokio::time::Instant::now() + super::common::RUN_LIMIT,
    )
    .await?;
    let topic = "default/orders";
    let mut app = mesh.app("producer").await?;
    let p = |id: &str| (id.to_owned(), vec![1u8; 8]);

    mesh.mesh.process("spare-a")?.signal(Signal::SIGSTOP)?;
    let (id, payload) = p("refused");
    let status = publish(&mut app, &history, "producer", topic, &id, None, payload)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("acked with one of two copies"))?;
    println!(
        "durable_only: replicated publish refused: {:?} {:?}",
        status.code(),
        status.message()
    );
    anyhow::ensure!(status.code() == tonic::Code::Unavailable, "{status:?}");
    mesh.mesh.process("spare-a")?.signal(Signal::SIGCONT)?;

    // Publishing resumes; these are delivered after anything older in the log.
    let mut after = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while after.len() < 10 && tokio::time::Instant::now() < deadline {
        let (id, payload) = p(&format!("after-{}", after.len()));
        if publish(&mut app, &history, "producer", topic, &id, None, payload)
            .await
            .is_ok()
        {
            after.insert(id);
        }
    }
    anyhow::ensure!(after.len() == 10, "publishing did not resume: {after:?}");
    wait_for(Duration::from_secs(60), "every after-* delivered", || {
        let got: BTreeSet<String> = history
            .deliveries()
            .into_iter()
            .map(|d| d.message_id)
            .collect();
        after.is_subset(&got)
    })
    .await?;
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: topic.into(),
        check_order: false,
    }];
    let counts = drain(
        &history,
        &expect,
        Duration::from_secs(30),
        "durable_only replicated",
    )
    .await?;
    consumer.abort();
    let refused = refused(&history);
    let delivered_refused: Vec<String> = history
        .deliveries()
        .into_iter()
        .map(|d| d.message_id)
        .filter(|id| refused.contains(id))
        .collect();
    println!(
        "durable_only replicated: refused={} delivered after refusal={delivered_refused:?}",
        refused.len()
    );
    anyhow::ensure!(
        delivered_refused.is_empty(),
        "a refused Replicated publish reached the consumer: {delivered_refused:?}"
    );
    anyhow::ensure!(
        (counts.lost, counts.unexpected) == (0, 0),
        "lost or unexpected messages: {counts}"
    );
    Ok(())
}
