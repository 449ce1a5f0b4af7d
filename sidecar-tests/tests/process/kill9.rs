//! docs/reliability.md row 2 (kill part), small variant: `kill -9` of the producer's sidecar
//! under load, restart on the same data dir: no acked message is lost, on a `Disk` topic
//! and on a `DiskAsync` one (a `kill -9` is not a power loss: what the sidecar wrote is in
//! the kernel's page cache, fsynced or not, and the restarted sidecar reads it back).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_sidecar_tests::harness::{logged_redeliveries, publish, seeded_rng, wait_for};
use ferry_sidecar_tests::history::History;
use rand::Rng;

use super::common::orders_mesh_with_env;
use super::common::{billing_consumer, drain_orders};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_sidecar_kill9_loses_no_acked_message() -> anyhow::Result<()> {
    kill9_under_load("durability: Disk", "", &[], "producer_sidecar_kill9").await
}

/// `DiskAsync` with a long fsync interval (10 s, more than the whole run): the acks of the
/// kills' last interval are in no fsync, only in the page cache, and still none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_sidecar_kill9_disk_async_loses_no_acked_message() -> anyhow::Result<()> {
    kill9_under_load(
        "durability: DiskAsync",
        "",
        &[("FERRY_ASYNC_SYNC_INTERVAL", "10s")],
        "producer_sidecar_kill9_disk_async",
    )
    .await
}

/// The README's `ExactlyOnce` promise across a `kill -9` of the producer's sidecar: the
/// messages it sends again after the restart are answered by the consuming sidecar, which
/// remembers the acked ids: the app sees none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_sidecar_kill9_exactly_once_no_duplicate() -> anyhow::Result<()> {
    kill9_under_load(
        "durability: Disk, dedupWindow: 5m",
        ", qos: ExactlyOnce",
        &[],
        "producer_sidecar_kill9_exactly_once",
    )
    .await
}

/// `kill -9` of the producer's sidecar twice while four publishers keep going, a restart
/// each time; `sub_extra` adds to the subscription's spec, `env` goes to every sidecar.
async fn kill9_under_load(
    topic_spec: &str,
    sub_extra: &str,
    env: &[(&str, &str)],
    test: &str,
) -> anyhow::Result<()> {
    let mut rng = seeded_rng(test);
    let exactly_once = sub_extra.contains("ExactlyOnce");
    let mut mesh = orders_mesh_with_env(
        topic_spec,
        &format!("ackWait: 5s, backoff: {{initial: 100ms, max: 1s, multiplier: 2}}{sub_extra}"),
        env,
    )
    .await?;
    let history = History::default();
    let consumer = billing_consumer(&mesh, &history).await?;

    // Four publishers that keep going (reconnecting) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = mesh.app_addr("producer")?;
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (history, stop, addr) = (history.clone(), stop.clone(), addr.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut app) = ferryctl::client::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let id = format!("p{p}-{i}");
                        if publish(
                            &mut app,
                            &history,
                            "producer",
                            "default/orders",
                            &id,
                            None,
                            vec![b'o'; 200],
                        )
                        .await
                        .is_err()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();

    let kills = 2;
    let mut outputs = Vec::new();
    let mut attempted_before_kill = Default::default();
    for round in 1..=kills {
        let target = history.acked_ids().len() + rng.random_range(50..150);
        wait_for(
            Duration::from_secs(30),
            "publishes acked before the kill",
            || history.acked_ids().len() >= target,
        )
        .await?;
        let acked_before = history.acked_ids().len();
        mesh.mesh.kill9("producer").await?;
        attempted_before_kill = history.attempted_ids();
        println!("kill9 round {round}: SIGKILL after {acked_before} acked publishes");
        outputs.push(mesh.mesh.restart("producer").await?.output.clone());
        println!("kill9 round {round}: restarted on the same data dir");
    }
    let target = history.acked_ids().len() + 50;
    wait_for(
        Duration::from_secs(30),
        "publishes acked after the last restart",
        || history.acked_ids().len() >= target,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        let _ = p.await;
    }
    let c = drain_orders(&history, Duration::from_secs(60), test).await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    // Duplicates are allowed (a kill between the consumer's ack and the producer's record
    // of it) but bounded by the in-flight window per kill: maxInFlight 100 x 1 member.
    assert!(c.duplicated <= 100 * kills, "{c}");
    if exactly_once {
        assert_eq!(c.duplicated, 0, "ExactlyOnce: {c}");
    }
    // Each duplicate is explained: it is a redelivery (attempt >= 2, never a second first
    // attempt), of a message published before a kill (in flight when the producer died),
    // and the restarted producer logged how many it would send again.
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    let repeats = history.repeats_to("billing");
    for d in &repeats {
        assert!(d.attempt >= 2, "duplicate without a redelivery: {d:?}");
        assert!(
            attempted_before_kill.contains(&d.message_id),
            "duplicate of a message published after the last kill: {d:?}"
        );
    }
    let logged: u64 = outputs
        .iter()
        .map(|o| logged_redeliveries(&o.lines(), "default/orders/default/billing-orders"))
        .sum();
    println!(
        "{test}: {} duplicates, {logged} redeliveries logged at restarts",
        repeats.len()
    );
    assert!(repeats.len() as u64 <= logged, "{c}; logged {logged}");
    consumer.abort();
    Ok(())
}
