//! Nothing grows without bound on a long-lived sidecar, with pods coming and going: for
//! 40 s a producer publishes to an ordered topic (four times more keys than
//! `--ordered-max-keys`, half of it `ACK_LEVEL_NONE`) and to a `Replicated` one, read by an
//! `ExactlyOnce` group of two real readers. Meanwhile a member with no sidecar behind it
//! joins the group and leaves it again every 1.5 s, each time on a fresh address (a pod
//! scheduled and deleted before its sidecar came up), and one real reader leaves the table
//! (SIGTERM) and comes back.
//!
//! Every second the producer's and a reader's metrics and RSS are sampled: the key map,
//! the acked-id set and the unconfirmed publishes stay within their bounds (and were
//! pressed against them: their eviction counters move). Once the churn stops, the links
//! to departed pods are closed and no trim waits for a departed replica. Nothing acked is
//! lost. RSS is printed, not asserted (a shared machine).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_api::proto::v1::{AckLevel, PublishRequest};
use ferry_sidecar_tests::harness::TestMesh;
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::client;
use ferryctl::metrics::{Sample, scrape, sum};
use ferryctl::proc_stat::rss_bytes;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::reconnecting_consumer;

const ORDERED_MAX_KEYS: f64 = 200.0;
const DEDUP_MAX_IDS: f64 = 300.0;
const MAX_UNCONFIRMED: f64 = 64.0;
const CHURN: Duration = Duration::from_secs(40);
const GROUP: &str = "default/readers";
const EVENTS: &str = "default/events";
const COPIES: &str = "default/copies";

async fn soak_mesh() -> anyhow::Result<TestMesh> {
    let crs = [
        topic("events", "durability: Disk, ordering: Key"),
        topic("copies", "durability: Replicated, replicas: 2"),
        group("readers", "reader", "zonePolicy: Any"),
        subscription(
            "readers-events",
            "events",
            "readers",
            "qos: ExactlyOnce, ackWait: 5s",
        ),
        subscription("readers-copies", "copies", "readers", "ackWait: 5s"),
    ]
    .concat();
    let pods = [
        pod("reader-a", "zone-a", "reader"),
        pod("reader-b", "zone-b", "reader"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let env = [
        ("FERRY_ORDERED_MAX_KEYS", "200"),
        ("FERRY_DEDUP_MAX_IDS", "300"),
        ("FERRY_MAX_UNCONFIRMED_PUBLISHES", "64"),
    ];
    TestMesh::start_with_env(&crs, &pods, &env).await
}

/// Sum of the samples named exactly `name`.
fn value(samples: &[Sample], name: &str) -> f64 {
    sum(samples, |n| n == name)
}

/// Publishes until `stop`: keys `k<task>-<0..250>` of the ordered topic in turn, every other
/// one with `ACK_LEVEL_NONE`, and every fifth message also one to the `Replicated` topic.
fn publisher(
    addr: String,
    task: usize,
    history: History,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut app = client::connect(&addr).await?;
        let mut j = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let key = format!("k{task}-{}", j % 250);
            let level = if j % 2 == 1 {
                AckLevel::None
            } else {
                AckLevel::Stored
            };
            let mut sends = vec![(EVENTS, format!("e-{task}-{j}"), Some(key), level)];
            if j.is_multiple_of(5) {
                sends.push((COPIES, format!("c-{task}-{j}"), None, AckLevel::Stored));
            }
            for (topic, id, key, level) in sends {
                history.publish_attempt("producer", topic, &id, key.as_deref());
                let request = PublishRequest {
                    topic: topic.into(),
                    message_id: id.clone(),
                    key,
                    payload: vec![b'x'; 64].into(),
                    ack_level: level.into(),
                    headers: HashMap::new(),
                    ..PublishRequest::default()
                };
                // A refusal (UNAVAILABLE while a replica is being found) stays attempted.
                if app.publish(request).await.is_ok() {
                    history.publish_acked(&id);
                }
            }
            j += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounded_structures_stay_bounded_with_pods_coming_and_going() -> anyhow::Result<()> {
    let mut mesh = soak_mesh().await?;
    let history = History::default();
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for (member, sub) in [
        ("reader-a", "default/readers-events"),
        ("reader-a", "default/readers-copies"),
        ("reader-b", "default/readers-events"),
        ("reader-b", "default/readers-copies"),
    ] {
        consumers.push(reconnecting_consumer(
            mesh.app_addr(member)?,
            sub,
            "readers",
            member,
            history.clone(),
            stop_consumers.clone(),
        ));
    }
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..4)
        .map(|t| {
            publisher(
                mesh.app_addr("producer").unwrap_or_default(),
                t,
                history.clone(),
                stop_publishing.clone(),
            )
        })
        .collect();

    let producer_admin = mesh.mesh.endpoints("producer")?.admin;
    let reader_admin = mesh.mesh.endpoints("reader-a")?.admin;
    let reader_b_admin = mesh.mesh.endpoints("reader-b")?.admin;
    let ghost_ip = mesh.mesh.spec("reader-a")?.ip;
    let template = mesh
        .member_records("reader-a")
        .into_iter()
        .find(|(g, _)| g == GROUP)
        .map(|(_, m)| m)
        .ok_or_else(|| anyhow::anyhow!("reader-a is not a member of {GROUP}"))?;
    let reader_b_records = mesh.member_records("reader-b");

    let start = Instant::now();
    let mut ghosts = 0u32;
    let mut next_ghost = start;
    let mut next_sample = start;
    let (mut b_left, mut b_back) = (false, false);
    let mut max_seen: HashMap<&str, f64> = HashMap::new();
    while start.elapsed() < CHURN {
        let now = Instant::now();
        if now >= next_ghost {
            // The previous ghost leaves, a new one joins on a fresh address.
            if ghosts > 0 {
                mesh.remove_member(&format!("ghost-{}", ghosts - 1))?;
            }
            let mut ghost = template.clone();
            ghost.pod = format!("ghost-{ghosts}");
            ghost.address = format!("{ghost_ip}:{}", 20000 + ghosts);
            mesh.add_member(GROUP, ghost)?;
            ghosts += 1;
            next_ghost = now + Duration::from_millis(1500);
        }
        if !b_left && start.elapsed() >= Duration::from_secs(10) {
            mesh.remove_member("reader-b")?;
            mesh.mesh
                .terminate("reader-b", Duration::from_secs(10))
                .await?;
            println!("soak: reader-b left the table and stopped");
            b_left = true;
        }
        if b_left && !b_back && start.elapsed() >= Duration::from_secs(25) {
            mesh.mesh.restart("reader-b").await?;
            for (g, m) in &reader_b_records {
                mesh.add_member(g, m.clone())?;
            }
            println!("soak: reader-b restarted and back in the table");
            b_back = true;
        }
        if now >= next_sample {
            next_sample = now + Duration::from_secs(1);
            let p = scrape(producer_admin).await?;
            let r = scrape(reader_admin).await?;
            let rb = if b_left && !b_back {
                Vec::new()
            } else {
                scrape(reader_b_admin).await.unwrap_or_default()
            };
            let keys = value(&p, "ferry_sidecar_ordered_keys");
            let links = value(&p, "ferry_sidecar_peer_links");
            let trims = value(&p, "ferry_sidecar_pending_trims");
            let unconfirmed = value(&p, "ferry_sidecar_unconfirmed_publishes");
            let ids_a = value(&r, "ferry_sidecar_exactly_once_ids");
            let ids_b = value(&rb, "ferry_sidecar_exactly_once_ids");
            let mib = |pid| rss_bytes(pid).map_or(0.0, |b| b as f64 / (1 << 20) as f64);
            println!(
                "soak t={:>2}s ghosts={ghosts} producer rss={:.1}MiB keys={keys} links={links} pending_trims={trims} unconfirmed={unconfirmed} | reader-a rss={:.1}MiB exactly_once_ids={ids_a} | reader-b exactly_once_ids={ids_b}",
                start.elapsed().as_secs(),
                mib(mesh.mesh.process("producer")?.pid),
                mib(mesh.mesh.process("reader-a")?.pid),
            );
            for (what, v) in [
                ("keys", keys),
                ("unconfirmed", unconfirmed),
                ("ids", ids_a.max(ids_b)),
            ] {
                let m = max_seen.entry(what).or_default();
                *m = m.max(v);
            }
            assert!(keys <= ORDERED_MAX_KEYS, "ordered keys {keys}");
            assert!(unconfirmed <= MAX_UNCONFIRMED, "unconfirmed {unconfirmed}");
            assert!(ids_a <= DEDUP_MAX_IDS, "reader-a exactly-once ids {ids_a}");
            assert!(ids_b <= DEDUP_MAX_IDS, "reader-b exactly-once ids {ids_b}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_publishing.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await??;
    }
    mesh.remove_member(&format!("ghost-{}", ghosts - 1))?;
    println!("soak: churn over after {ghosts} ghosts; maxima {max_seen:?}");

    let expect = [
        Expect::AnyMember {
            group: "readers".into(),
            topic: EVENTS.into(),
            check_order: false,
        },
        Expect::AnyMember {
            group: "readers".into(),
            topic: COPIES.into(),
            check_order: false,
        },
    ];
    let counts = drain(&history, &expect, Duration::from_secs(90), "soak").await?;
    println!(
        "soak: history acked={} delivered={} lost={} duplicated={} refused={}",
        counts.acked,
        counts.deliveries,
        counts.lost,
        counts.duplicated,
        counts.attempted - counts.acked
    );

    // Links to every departed pod close: only reader-a's and reader-b's stay.
    let links = || async {
        let p = scrape(producer_admin).await.unwrap_or_default();
        (
            value(&p, "ferry_sidecar_peer_links"),
            value(&p, "ferry_sidecar_peer_links_closed_total"),
            value(&p, "ferry_sidecar_pending_trims"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut open, mut closed, mut trims) = links().await;
    while (open > 2.0 || trims > 0.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (open, closed, trims) = links().await;
    }
    println!("soak: producer links open={open} closed={closed}, pending trims={trims}");
    assert!(open <= 2.0, "links to departed pods still open: {open}");
    assert!(closed >= 1.0, "no link was closed");
    assert_eq!(trims, 0.0, "trims still wait for departed replicas");

    let p = scrape(producer_admin).await?;
    let r = scrape(reader_admin).await?;
    let evicted_keys = value(&p, "ferry_sidecar_ordered_keys_evicted_total");
    let evicted_ids = value(&r, "ferry_sidecar_exactly_once_evicted_total");
    let waited = value(&p, "ferry_sidecar_unconfirmed_publishes_waited_total");
    let dropped = value(&p, "ferry_sidecar_trims_dropped_total");
    println!(
        "soak: ordered keys evicted={evicted_keys}, reader-a exactly-once ids evicted={evicted_ids}, unconfirmed publishes that waited={waited}, trims dropped={dropped}"
    );
    assert!(evicted_keys > 0.0, "the key map never reached its bound");
    assert!(
        evicted_ids > 0.0,
        "the acked-id set never reached its bound"
    );
    assert_eq!((counts.lost, counts.unexpected), (0, 0), "{counts}");

    stop_consumers.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    Ok(())
}
