//! docs/reliability.md rows 6 and 5 on local processes, for `durability: Replicated` with
//! `replicas: 2`. The producer's pod is a member of a group (`senders`) so that it has a
//! member record in the routing table, as every pod with a sidecar has in a cluster.
//!
//! - Row 6 (`replicated_node_loss`): the producer's sidecar is killed, its data folder
//!   deleted and its member record removed; the replica takes custody and delivers every
//!   message the producer acked.
//! - Row 5 (`replicated_amnesia_composite`): the preferred replica is paused (SIGSTOP) so
//!   copies go to the next candidate, then the producer is killed and its data folder
//!   wiped (as if none of it had reached the disk); restarted, it re-learns custody from
//!   the replica that answers, then from the paused one once it resumes (SIGCONT). Nothing
//!   is lost, and the producer, which holds nothing settled, makes no replica drop a copy:
//!   every copy comes back to it.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::common::billing_consumer;
use super::common::{RUN_LIMIT, drain, group, pod, subscription, topic};

const TOPIC: &str = "default/orders";

fn crs() -> String {
    crs_with(&group("senders", "senders", ""))
}

/// The topic, the consuming group and its subscription, plus `more`.
fn crs_with(more: &str) -> String {
    [
        topic("orders", "durability: Replicated, replicas: 2"),
        group("billing", "billing", ""),
        more.to_owned(),
        subscription(
            "billing-orders",
            "orders",
            "billing",
            &format!("maxInFlight: {MAX_IN_FLIGHT}"),
        ),
    ]
    .concat()
}

/// Kept small so that the duplicate bound is tight: a consumer sidecar keeps the
/// deliveries it queued for its app from a producer that is gone, and the app gets them
/// besides the replica's (at most `maxInFlight` x members, each a redelivery or a first
/// attempt of the old producer followed by the new holder's attempt >= 2).
const MAX_IN_FLIGHT: u64 = 10;
/// Members of the consuming group.
const MEMBERS: u64 = 2;

/// The producer and `billing-a` share zone-a's node; `billing-b` (zone-b) is the preferred
/// replica, `billing-a` the next one.
fn pods() -> String {
    [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-a", "billing"),
        pod("billing-b", "zone-b", "billing"),
    ]
    .concat()
}

fn expect() -> [Expect; 1] {
    [Expect::AnyMember {
        group: "billing".into(),
        topic: TOPIC.into(),
        check_order: false,
    }]
}

async fn start_consumers(mesh: &TestMesh, history: &History) -> anyhow::Result<()> {
    for member in ["billing-a", "billing-b"] {
        spawn_consumer(
            &mesh.app_addr(member)?,
            "default/billing-orders",
            "billing",
            member,
            history,
            Behavior::Ack,
            Instant::now() + RUN_LIMIT,
        )
        .await?;
    }
    Ok(())
}

/// Publishes `ids` one by one; returns how many were acked.
async fn publish_all(
    mesh: &TestMesh,
    history: &History,
    ids: impl Iterator<Item = String>,
) -> anyhow::Result<u64> {
    let mut app = mesh.app("producer").await?;
    let mut acked = 0;
    for id in ids {
        match publish(
            &mut app,
            history,
            "producer",
            TOPIC,
            &id,
            None,
            vec![b'r'; 256],
        )
        .await
        {
            Ok(()) => acked += 1,
            Err(status) => println!("publish {id}: {:?} {}", status.code(), status.message()),
        }
    }
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_node_loss() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(&crs(), &pods()).await?;
    let history = History::default();

    // A backlog that no app consumes yet: every message lives on the producer and its replica.
    let acked = publish_all(&mesh, &history, (0..200).map(|i| format!("node-loss-{i}"))).await?;
    assert_eq!(
        acked, 200,
        "every publish is acked while both replicas are up"
    );

    // The producer's node is lost: process gone, data gone, pod deleted.
    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    std::fs::remove_dir_all(&data)?;
    mesh.remove_member("producer")?;

    // The replica takes custody; consumers that appear get everything it held.
    wait_for(Duration::from_secs(30), "a replica took custody", || {
        ["billing-a", "billing-b"].iter().any(|p| {
            mesh.log_lines(p, "took custody of")
                .is_ok_and(|l| !l.is_empty())
        })
    })
    .await?;
    start_consumers(&mesh, &history).await?;
    let c = drain(
        &history,
        &expect(),
        Duration::from_secs(60),
        "replicated_node_loss",
    )
    .await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert!(c.duplicated <= MAX_IN_FLIGHT * MEMBERS, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_amnesia_composite() -> anyhow::Result<()> {
    amnesia(Damage::Wipe, "replicated_amnesia_composite").await
}

/// Row 5 with a less total loss: the producer's topic log is cut in half (as if its last
/// writes never reached the disk), so it restarts with part of its messages and re-learns
/// the rest; offsets it numbered before are numbered again for other messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_amnesia_truncated_log() -> anyhow::Result<()> {
    amnesia(Damage::TruncateHalf, "replicated_amnesia_truncated_log").await
}

/// What happens to the producer's data folder while its sidecar is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    Wipe,
    TruncateHalf,
}

fn damage(data: &std::path::Path, how: Damage) -> anyhow::Result<()> {
    match how {
        Damage::Wipe => std::fs::remove_dir_all(data)?,
        Damage::TruncateHalf => {
            let dir = data.join("topics/default/orders");
            for e in std::fs::read_dir(&dir)? {
                let path = e?.path();
                if path.extension().is_some_and(|x| x == "log") {
                    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                    let len = f.metadata()?.len();
                    f.set_len(len / 2)?;
                    println!(
                        "truncated {} from {len} to {} bytes",
                        path.display(),
                        len / 2
                    );
                }
            }
        }
    }
    Ok(())
}

async fn amnesia(how: Damage, test: &str) -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(&crs(), &pods()).await?;
    let history = History::default();

    // Copies of the first part go to the preferred replica, billing-b.
    let first = publish_all(&mesh, &history, (0..100).map(|i| format!("amnesia-a-{i}"))).await?;
    // billing-b pauses: the next copies go to billing-a (the first publish waits for the
    // replica timeout before passing billing-b over; none is acked without a copy).
    mesh.mesh.process("billing-b")?.signal(Signal::SIGSTOP)?;
    let second = publish_all(&mesh, &history, (0..100).map(|i| format!("amnesia-b-{i}"))).await?;
    println!("acked before the crash: {first} + {second}");

    // The producer crashes and comes back with less (or nothing) on disk.
    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    damage(&data, how)?;
    mesh.mesh.restart("producer").await?;
    let relearned = |mesh: &TestMesh| -> u64 {
        mesh.log_lines("producer", "re-learned custody of")
            .unwrap_or_default()
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find("re-learned custody of ")? + "re-learned custody of ".len()..];
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    };
    if how == Damage::Wipe {
        // billing-a answers at once.
        wait_for(Duration::from_secs(30), "re-learned from billing-a", || {
            relearned(&mesh) >= second
        })
        .await?;
    }
    // billing-b resumes and is asked too.
    mesh.mesh.process("billing-b")?.signal(Signal::SIGCONT)?;
    if how == Damage::Wipe {
        wait_for(Duration::from_secs(30), "re-learned from billing-b", || {
            relearned(&mesh) >= first + second
        })
        .await?;
    }

    start_consumers(&mesh, &history).await?;
    let c = drain(&history, &expect(), Duration::from_secs(60), test).await?;
    println!("{test}: re-learned {} messages", relearned(&mesh));
    assert!(
        relearned(&mesh) > 0,
        "the producer lost messages and re-learned none"
    );
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    // Two fault events (the pause and the crash), each bounded by maxInFlight x members.
    assert!(c.duplicated <= 2 * MAX_IN_FLIGHT * MEMBERS, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    // No replica took custody: the producer was back long before the takeover timeout.
    for p in ["billing-a", "billing-b"] {
        assert!(
            mesh.log_lines(p, "took custody of")?.is_empty(),
            "{p} took over"
        );
    }
    Ok(())
}

/// With its only replica paused, a `Replicated` publish is refused with UNAVAILABLE naming
/// how many replicas answered, never acked; once the replica resumes, publishing works.
/// Nothing acked is lost, and the refused message (stored by the producer, so possibly
/// delivered) counts as attempted only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_publish_refused_without_replicas() -> anyhow::Result<()> {
    let pods = [
        pod("producer", "zone-a", "senders"),
        pod("billing-a", "zone-b", "billing"),
    ]
    .concat();
    let mesh = TestMesh::start(&crs(), &pods).await?;
    let history = History::default();
    let mut app = mesh.app("producer").await?;

    mesh.mesh.process("billing-a")?.signal(Signal::SIGSTOP)?;
    let refused = publish(
        &mut app,
        &history,
        "producer",
        TOPIC,
        "alone",
        None,
        vec![1; 8],
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("acked with no replica"))?;
    println!(
        "publish without replicas: {:?} {:?}",
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("0 answered"), "{refused:?}");

    mesh.mesh.process("billing-a")?.signal(Signal::SIGCONT)?;
    let mut acked = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !acked && Instant::now() < deadline {
        acked = publish(
            &mut app,
            &history,
            "producer",
            TOPIC,
            "together",
            None,
            vec![2; 8],
        )
        .await
        .is_ok();
    }
    assert!(
        acked,
        "publishing did not resume after the replica came back"
    );
    billing_consumer(&mesh, &history).await?;
    let c = drain(
        &history,
        &expect(),
        Duration::from_secs(30),
        "replicated_publish_refused",
    )
    .await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    Ok(())
}

/// A producer in no group has no member record, so only the timeout tells its replica that
/// it is gone: `kill -9` of its sidecar (data folder deleted) and nothing else. After
/// `--replica-takeover-after` (3 s here) the replica takes custody and delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_takeover_after_unreachable_timeout() -> anyhow::Result<()> {
    let pods = [
        pod("producer", "zone-a", ""),
        pod("billing-a", "zone-a", "billing"),
        pod("billing-b", "zone-b", "billing"),
    ]
    .concat();
    let env = [("FERRY_REPLICA_TAKEOVER_AFTER", "3s")];
    let mut mesh = TestMesh::start_with_env(&crs_with(""), &pods, &env).await?;
    let history = History::default();
    let acked = publish_all(&mesh, &history, (0..100).map(|i| format!("timeout-{i}"))).await?;
    assert_eq!(acked, 100);

    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    let t0 = Instant::now();
    std::fs::remove_dir_all(&data)?;
    // Consumers are up while the replica waits, so its deliveries need no retry.
    start_consumers(&mesh, &history).await?;
    wait_for(Duration::from_secs(60), "a replica took custody", || {
        ["billing-a", "billing-b"].iter().any(|p| {
            mesh.log_lines(p, "--replica-takeover-after")
                .is_ok_and(|l| !l.is_empty())
        })
    })
    .await?;
    println!("taken over {:?} after the kill", t0.elapsed());
    let c = drain(
        &history,
        &expect(),
        Duration::from_secs(60),
        "replicated_takeover_after_timeout",
    )
    .await?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert!(c.duplicated <= MAX_IN_FLIGHT * MEMBERS, "{c}");
    assert_eq!(c.unexplained_duplicates, 0, "{c}");
    Ok(())
}
