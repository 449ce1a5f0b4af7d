//! docs/reliability.md row 2 (SIGTERM part), small variant: SIGTERM to the producer's sidecar
//! with a backlog, for each durability (`Memory`, `DiskAsync`, `Disk`, `Replicated`). It
//! refuses new publishes with a clear status, keeps delivering until the backlog is drained,
//! and exits 0 within its grace period; nothing acked is lost. (A backlog that cannot drain
//! is handed to a peer: `handoff.rs`.)

use std::time::Duration;

use ferry_api::proto::v1::PublishRequest;
use ferry_sidecar_tests::history::History;
use nix::sys::signal::Signal;
use tokio::time::Instant;
use tonic::Code;

use super::common::{billing_consumer, drain_orders, orders_mesh, publish_orders};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sigterm_refuses_publishes_and_drains_its_backlog() -> anyhow::Result<()> {
    sigterm_drains("durability: Disk", "producer_sigterm").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sigterm_drains_a_memory_backlog() -> anyhow::Result<()> {
    sigterm_drains("durability: Memory", "producer_sigterm_memory").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sigterm_drains_a_disk_async_backlog() -> anyhow::Result<()> {
    sigterm_drains("durability: DiskAsync", "producer_sigterm_disk_async").await
}

/// The replica of each message is `billing-a`'s sidecar, the only other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sigterm_drains_a_replicated_backlog() -> anyhow::Result<()> {
    sigterm_drains(
        "durability: Replicated, replicas: 2",
        "producer_sigterm_replicated",
    )
    .await
}

/// A backlog of 300 on a topic of `topic_spec`, then SIGTERM as the consumer starts.
async fn sigterm_drains(topic_spec: &str, test: &str) -> anyhow::Result<()> {
    let mut mesh = orders_mesh(topic_spec, "").await?;
    let history = History::default();

    // A backlog: 300 acked publishes while no app consumes.
    publish_orders(
        &mesh,
        &history,
        (0..300).map(|i| format!("backlog-{i}")),
        &[b'b'; 256],
    )
    .await?;
    let mut app = mesh.app("producer").await?;

    // The consuming app starts, and at once the producer's sidecar is told to stop.
    let consumer = billing_consumer(&mesh, &history).await?;
    mesh.mesh.process("producer")?.signal(Signal::SIGTERM)?;
    let sent = Instant::now();

    // Publishing during the drain is refused with UNAVAILABLE, never acked.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let request = PublishRequest {
            topic: "default/orders".into(),
            message_id: "during-drain".into(),
            payload: b"late".to_vec().into(),
            ..PublishRequest::default()
        };
        match app.publish(request).await {
            Err(status) if status.code() == Code::Unavailable => break status,
            Err(status) => anyhow::bail!("publish during drain: unexpected {status:?}"),
            Ok(_) if Instant::now() < deadline => {
                // Accepted before the signal was handled; it is part of the backlog now.
                history.publish_attempt("producer", "default/orders", "during-drain", None);
                history.publish_acked("during-drain");
            }
            Ok(_) => anyhow::bail!("publishes still accepted 5 s after SIGTERM"),
        }
    };
    println!(
        "publish during drain: {:?} {:?}",
        refused.code(),
        refused.message()
    );
    assert!(
        refused.message().contains("shutting down"),
        "the status does not say why: {refused:?}"
    );

    // It exits by itself, cleanly, within its grace period (2 s here) plus a margin.
    let clean = mesh
        .mesh
        .terminate("producer", Duration::from_secs(10))
        .await?;
    let took = sent.elapsed();
    println!(
        "producer sidecar exited {} after {took:?}",
        if clean { "cleanly" } else { "NOT cleanly" }
    );
    assert!(clean, "the producer's sidecar did not exit 0 by itself");

    // Everything acked reached the consuming app before the exit: nothing waits on disk.
    let c = drain_orders(&history, Duration::from_secs(5), test).await?;
    assert_eq!((c.lost, c.unexpected, c.duplicated), (0, 0, 0), "{c}");
    consumer.abort();
    Ok(())
}
