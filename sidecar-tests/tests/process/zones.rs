//! Zone policy: a zone-a producer's messages go to the zone-a member of a PreferSameZone
//! group; with no zone-a member they spill over to zone-b; a SameZoneOnly group with no
//! member in the producer's zone gets nothing.

use std::time::Duration;

use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, drain, group, pod, subscription, topic};

const MESSAGES: usize = 40;

fn crs() -> String {
    [
        topic("events", "durability: Disk"),
        group("nearby", "nearby", "zonePolicy: PreferSameZone"),
        group("strict", "strict", "zonePolicy: SameZoneOnly"),
        subscription("nearby-events", "events", "nearby", ""),
        subscription("strict-events", "events", "strict", ""),
    ]
    .concat()
}

/// Starts a mesh, consumes on every `nearby`/`strict` pod listed, publishes from the zone-a
/// producer, drains the `nearby` group and returns the history.
async fn run(test: &str, pods: &str, members: &[(&str, &str)]) -> anyhow::Result<History> {
    let mesh = TestMesh::start(&crs(), pods).await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let mut consumers = Vec::new();
    for (member, group) in members {
        let sub = format!("default/{group}-events");
        consumers.push(
            spawn_consumer(
                &mesh.app_addr(member)?,
                &sub,
                group,
                member,
                &history,
                Behavior::Ack,
                stop_at,
            )
            .await?,
        );
    }
    let mut app = mesh.app("producer-a").await?;
    for i in 0..MESSAGES {
        publish(
            &mut app,
            &history,
            "producer-a",
            "default/events",
            &format!("e-{i}"),
            None,
            b"z".to_vec(),
        )
        .await?;
    }
    let expect = [Expect::AnyMember {
        group: "nearby".into(),
        topic: "default/events".into(),
        check_order: false,
    }];
    let c = drain(&history, &expect, Duration::from_secs(60), test).await?;
    assert_eq!((c.lost, c.duplicated, c.unexpected), (0, 0, 0), "{c}");
    for c in consumers {
        c.abort();
    }
    Ok(history)
}

fn members_of(history: &History, group: &str) -> Vec<String> {
    let mut members: Vec<String> = history
        .deliveries_to(group)
        .into_iter()
        .map(|d| d.member)
        .collect();
    members.sort();
    members.dedup();
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_same_zone_delivers_in_zone() -> anyhow::Result<()> {
    let pods = [
        pod("nearby-a", "zone-a", "nearby"),
        pod("nearby-b", "zone-b", "nearby"),
        pod("strict-b", "zone-b", "strict"),
        pod("producer-a", "zone-a", ""),
    ]
    .concat();
    let history = run(
        "prefer_same_zone_delivers_in_zone",
        &pods,
        &[
            ("nearby-a", "nearby"),
            ("nearby-b", "nearby"),
            ("strict-b", "strict"),
        ],
    )
    .await?;
    assert_eq!(
        members_of(&history, "nearby"),
        ["nearby-a"],
        "every delivery to the zone-a member"
    );
    // By the time the nearby group has all of them, a cross-zone delivery to the strict
    // group would have happened too: it must not.
    assert!(
        history.deliveries_to("strict").is_empty(),
        "SameZoneOnly crossed a zone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_same_zone_spills_over_when_zone_has_no_member() -> anyhow::Result<()> {
    // nearby-a exists but is not Ready: it is in no group.
    let pods = format!(
        "- {{name: nearby-a, zone: zone-a, labels: {{app: nearby}}, ready: false}}\n{}{}{}",
        pod("nearby-b", "zone-b", "nearby"),
        pod("strict-b", "zone-b", "strict"),
        pod("producer-a", "zone-a", "")
    );
    let history = run(
        "prefer_same_zone_spills_over",
        &pods,
        &[("nearby-b", "nearby")],
    )
    .await?;
    assert_eq!(
        members_of(&history, "nearby"),
        ["nearby-b"],
        "every delivery spilled to zone-b"
    );
    Ok(())
}
