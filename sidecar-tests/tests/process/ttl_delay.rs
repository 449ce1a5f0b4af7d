//! Issue #6 item 4: per-message TTL and delayed delivery on a real mesh.
//!
//! - Messages whose TTL ends before their delay are never delivered: they go to the
//!   subscription's dead-letter topic with the reason, and the producer counts them in
//!   `ferry_sidecar_expired_total`; also for a subscription whose only member has no room.
//! - `delay_ms` and the absolute `deliver_at_ms` hold a message back at least that long.
//! - Messages with a TTL that does not run out are delivered normally.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_sidecar_tests::harness::{TestMesh, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::{first_delivery, publish_with, reconnecting_consumer};

fn scrape_counter(admin: std::net::SocketAddr, word: &str) -> f64 {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(ferryctl::metrics::scrape(admin))
    })
    .map_or(0.0, |s| ferryctl::metrics::counter(&s, word))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_expiry_dead_letters_and_delays_hold_back() -> anyhow::Result<()> {
    let crs = [
        topic("jobs", "durability: Disk"),
        topic("jobs-dlq", "durability: Disk"),
        group("workers", "worker", ""),
        group("ops", "ops", ""),
        subscription(
            "jobs-workers",
            "jobs",
            "workers",
            "deadLetterTopic: jobs-dlq, ackWait: 5s",
        ),
        subscription("jobs-dlq-ops", "jobs-dlq", "ops", ""),
        // A member that holds one delivery and never acks it: with maxInFlight 1 nothing
        // else can be sent to it, yet its expired messages are dead-lettered all the same.
        group("slow", "slow", ""),
        subscription(
            "jobs-slow",
            "jobs",
            "slow",
            "deadLetterTopic: jobs-dlq, maxInFlight: 1, ackWait: 60s",
        ),
    ]
    .concat();
    let pods = [
        pod("worker-a", "zone-a", "worker"),
        pod("ops-a", "zone-a", "ops"),
        pod("slow-a", "zone-a", "slow"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let dlq_history = History::default();
    let expiring_history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = reconnecting_consumer(
        mesh.app_addr("worker-a")?,
        "default/jobs-workers",
        "workers",
        "worker-a",
        history.clone(),
        stop.clone(),
    );
    let ops = reconnecting_consumer(
        mesh.app_addr("ops-a")?,
        "default/jobs-dlq-ops",
        "ops",
        "ops-a",
        dlq_history.clone(),
        stop.clone(),
    );
    let mut slow_app = ferryctl::client::connect(&mesh.app_addr("slow-a")?).await?;
    let mut slow =
        ferryctl::client::Consumer::subscribe(&mut slow_app, "default/jobs-slow", 1).await?;
    let jobs = "default/jobs";
    let mut app = mesh.app("producer").await?;
    let hold = Duration::from_secs(3);
    let hold_ms = u64::try_from(hold.as_millis())?;
    let start = Instant::now();
    let delayed = first_delivery(&history, "delay-", Duration::from_secs(60));
    let scheduled = first_delivery(&history, "later-", Duration::from_secs(60));
    for i in 0..10 {
        publish_with(
            &mut app,
            &expiring_history,
            jobs,
            &format!("expiring-{i}"),
            |r| {
                r.delay_ms = 2_000;
                r.ttl_ms = 1_000;
            },
        )
        .await?;
    }
    for i in 0..5 {
        publish_with(&mut app, &history, jobs, &format!("delay-{i}"), |r| {
            r.delay_ms = hold_ms;
        })
        .await?;
        let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        publish_with(&mut app, &history, jobs, &format!("later-{i}"), |r| {
            r.deliver_at_ms = u64::try_from(at).unwrap_or(0) + hold_ms;
        })
        .await?;
        publish_with(&mut app, &history, jobs, &format!("plain-{i}"), |r| {
            r.ttl_ms = 120_000;
        })
        .await?;
    }
    let expect = [Expect::AnyMember {
        group: "workers".into(),
        topic: jobs.into(),
        check_order: false,
    }];
    let c = drain(&history, &expect, Duration::from_secs(60), "ttl_delay").await?;
    for (what, seen) in [("delay_ms", delayed), ("deliver_at_ms", scheduled)] {
        let at = seen
            .await?
            .ok_or_else(|| anyhow::anyhow!("no {what} message delivered"))?;
        assert!(
            at.duration_since(start) >= hold,
            "a {what} message came {:?} after the first publish, before {hold:?}",
            at.duration_since(start)
        );
    }
    wait_for(
        Duration::from_secs(60),
        "20 expired messages dead-lettered",
        || dlq_history.deliveries().len() >= 20,
    )
    .await?;
    let held = slow.next(Duration::from_secs(1)).await?;
    assert!(held.is_some(), "the slow member holds one delivery");
    let admin = mesh.mesh.endpoints("producer")?.admin;
    let expired = scrape_counter(admin, "expired");
    println!("ttl_delay: producer expired={expired}");
    stop.store(true, Ordering::Relaxed);
    let _ = workers.await;
    let _ = ops.await;
    assert_eq!((c.lost, c.duplicated, c.unexpected), (0, 0, 0), "{c}");
    assert!(
        !history
            .deliveries()
            .iter()
            .any(|d| d.message_id.starts_with("expiring-")),
        "an expired message was delivered"
    );
    let dead = dlq_history.deliveries();
    for d in &dead {
        let reason = d
            .headers
            .iter()
            .find(|(k, _)| k.contains("reason"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(reason.contains("ttl expired"), "{d:?}");
    }
    let ids: std::collections::BTreeSet<&str> =
        dead.iter().map(|d| d.message_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        20,
        "each expired message dead-lettered once per subscription: {ids:?}"
    );
    assert_eq!(expired, 20.0, "expiries counted");
    Ok(())
}
