//! Issue #6 item 2, consumer side: an `ExactlyOnce` subscription's consuming sidecar dies
//! (`abort`, as abrupt as `kill -9`) right after its app acked a message and the ack was
//! persisted, before the producer heard of it. The producer redelivers after the restart;
//! the consuming sidecar recognises the id and answers ACKED: 0 duplicates reach the app.
//!
//! The kill point is the `consumer::acked_persisted` failpoint (feature `failpoints`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{TestMesh, wait_for};
use ferry_sidecar_tests::history::{Expect, History};

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::{publish_with, reconnecting_consumer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_survives_consumer_kill_between_app_ack_and_upstream_ack() -> anyhow::Result<()>
{
    consumer_crash(false, "exactly_once_restart").await
}

/// The same, each abort followed by a power loss of the consuming sidecar's node: restarted
/// with `FERRY_SIMULATE_POWER_LOSS=1`, it keeps only what it fsynced. The acked ids it
/// answers from must have been fsynced before the ack counted as persisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_survives_consumer_power_loss_between_app_ack_and_upstream_ack()
-> anyhow::Result<()> {
    consumer_crash(true, "exactly_once_power_loss").await
}

/// Aborts the consuming sidecar twice right after it persisted an app's ack, restarting it
/// each time (after a simulated power loss if `power_loss`); then counts duplicates.
async fn consumer_crash(power_loss: bool, test: &str) -> anyhow::Result<()> {
    let crs = [
        topic("payments", "durability: Disk, dedupWindow: 5m"),
        group("ledger", "ledger", ""),
        subscription(
            "ledger-payments",
            "payments",
            "ledger",
            "qos: ExactlyOnce, ackWait: 2s, backoff: {initial: 100ms, max: 500ms, multiplier: 2}",
        ),
    ]
    .concat();
    let pods = [
        pod("ledger-a", "zone-a", "ledger"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    // The consuming sidecar aborts at its 6th persisted ack, then once more at the 4th
    // after its first restart.
    let kill_at = [5, 3];
    let failpoint = |n: usize| {
        vec![(
            "FAILPOINTS".to_owned(),
            format!("consumer::acked_persisted={n}*off->return"),
        )]
    };
    mesh.mesh
        .restart_with_env("ledger-a", &failpoint(kill_at[0]))
        .await?;
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = reconnecting_consumer(
        mesh.app_addr("ledger-a")?,
        "default/ledger-payments",
        "ledger",
        "ledger-a",
        history.clone(),
        stop.clone(),
    );
    let topic = "default/payments";
    let mut app = mesh.app("producer").await?;
    let total: u32 = 30;
    let mut published = 0u32;
    let expect = [Expect::AnyMember {
        group: "ledger".into(),
        topic: topic.into(),
        check_order: false,
    }];
    for (round, n) in kill_at.iter().enumerate() {
        // One message at a time, each acked by the app before the next, so that exactly
        // one message is in flight when the failpoint fires at ack n + 1.
        for _ in 0..=*n {
            published += 1;
            publish_with(
                &mut app,
                &history,
                topic,
                &format!("pay-{published}"),
                |_| {},
            )
            .await?;
            let want = published;
            wait_for(Duration::from_secs(30), "the app acked the message", || {
                history.check(&expect).consumer_acks >= u64::from(want)
            })
            .await?;
        }
        wait_for(
            Duration::from_secs(30),
            "the consuming sidecar aborts",
            || !mesh.mesh.reap_exited().is_empty(),
        )
        .await?;
        println!(
            "{test} round {}: consuming sidecar aborted after persisting ack {} ({published} published)",
            round + 1,
            n + 1
        );
        let mut env = kill_at
            .get(round + 1)
            .map(|n| failpoint(*n))
            .unwrap_or_default();
        if power_loss {
            env.push(("FERRY_SIMULATE_POWER_LOSS".to_owned(), "1".to_owned()));
        }
        let restarted = mesh.mesh.restart_with_env("ledger-a", &env).await?;
        if power_loss {
            let said = restarted
                .output
                .lines()
                .into_iter()
                .find(|l| l.contains("simulated power loss: dropped"))
                .unwrap_or_default();
            println!("{test}: the consuming sidecar said at startup: {said}");
            assert!(!said.is_empty(), "no power loss simulated");
        }
    }
    while published < total {
        published += 1;
        publish_with(
            &mut app,
            &history,
            topic,
            &format!("pay-{published}"),
            |_| {},
        )
        .await?;
    }
    let c = drain(&history, &expect, Duration::from_secs(60), test).await?;
    // Let any redelivery of the messages acked at the kills arrive (the producer redelivers
    // after ackWait) before counting duplicates: wait until the producer settled them all.
    let admin = mesh.mesh.endpoints("producer")?.admin;
    wait_for(
        Duration::from_secs(30),
        "the producer saw every ack",
        || {
            let samples = futures_lite_block(ferryctl::metrics::scrape(admin));
            samples.is_some_and(|s| ferryctl::metrics::counter(&s, "acked") >= f64::from(total))
        },
    )
    .await?;
    let c2 = history.check(&expect);
    println!("{test}: history after settling {c2}");
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.await;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert_eq!((c2.lost, c2.duplicated, c2.unexpected), (0, 0, 0), "{c2}");
    Ok(())
}

/// Runs a scrape to completion from the synchronous `wait_for` condition.
fn futures_lite_block<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).ok()
}
