//! Exact delivery counts: a Unicast group gets each message exactly once in all (spread
//! over its members), a Broadcast group gets each message exactly once per member.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, drain, group, pod, subscription, topic};

const MESSAGES: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unicast_exact_counts_and_broadcast_within_group() -> anyhow::Result<()> {
    let crs = [
        topic("jobs", "durability: Disk"),
        group("workers", "worker", "delivery: Unicast, zonePolicy: Any"),
        group(
            "listeners",
            "listener",
            "delivery: Broadcast, zonePolicy: Any",
        ),
        subscription("workers-jobs", "jobs", "workers", ""),
        subscription("listeners-jobs", "jobs", "listeners", ""),
    ]
    .concat();
    let pods = [
        pod("worker-1", "zone-a", "worker"),
        pod("worker-2", "zone-a", "worker"),
        pod("worker-3", "zone-b", "worker"),
        pod("listener-1", "zone-a", "listener"),
        pod("listener-2", "zone-b", "listener"),
        pod("listener-3", "zone-b", "listener"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let mut consumers = Vec::new();
    for (sub, group, prefix) in [
        ("default/workers-jobs", "workers", "worker"),
        ("default/listeners-jobs", "listeners", "listener"),
    ] {
        for n in 1..=3 {
            let member = format!("{prefix}-{n}");
            consumers.push(
                spawn_consumer(
                    &mesh.app_addr(&member)?,
                    sub,
                    group,
                    &member,
                    &history,
                    Behavior::Ack,
                    stop_at,
                )
                .await?,
            );
        }
    }
    let mut app = mesh.app("producer").await?;
    for i in 0..MESSAGES {
        publish(
            &mut app,
            &history,
            "producer",
            "default/jobs",
            &format!("job-{i}"),
            None,
            b"work".to_vec(),
        )
        .await?;
    }
    let listeners: Vec<String> = (1..=3).map(|n| format!("listener-{n}")).collect();
    let expect = [
        Expect::AnyMember {
            group: "workers".into(),
            topic: "default/jobs".into(),
            check_order: false,
        },
        Expect::EveryMember {
            group: "listeners".into(),
            topic: "default/jobs".into(),
            members: listeners.clone(),
        },
    ];
    let c = drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "unicast_exact_counts_and_broadcast_within_group",
    )
    .await?;
    assert_eq!((c.lost, c.duplicated, c.unexpected), (0, 0, 0), "{c}");

    let per_member = |group: &str| {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for d in history.deliveries_to(group) {
            *counts.entry(d.member).or_default() += 1;
        }
        counts
    };
    let workers = per_member("workers");
    println!("unicast per member: {workers:?}");
    assert_eq!(
        workers.values().sum::<usize>(),
        MESSAGES,
        "each job to exactly one worker"
    );
    let listened = per_member("listeners");
    println!("broadcast per member: {listened:?}");
    for member in &listeners {
        assert_eq!(
            listened.get(member).copied(),
            Some(MESSAGES),
            "{member} got every message once"
        );
    }
    for c in consumers {
        c.abort();
    }
    Ok(())
}
