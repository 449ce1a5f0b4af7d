//! docs/reliability.md row 12, `same_zone_members_gone`: every same-zone member of a group turns
//! NotReady through the API server, as a kubelet would report it. `PreferSameZone` fails
//! over to the other zone; `SameZoneOnly` delivers nothing cross-zone and its messages wait
//! until a same-zone member is Ready again; `Any` is unaffected. Lost = 0 for all three.

use anyhow::{Result, ensure};
use ferry_kind_tests::e2e::{CONVERGE, E2e};
use ferry_kind_tests::netns::Zone;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_zone_members_gone() -> Result<()> {
    let mut w = E2e::new("row12").await?;
    let mut yaml = topic_yaml("events", serde_json::json!({"durability": "Disk"}));
    for (group, policy) in [
        ("prefer", "PreferSameZone"),
        ("only", "SameZoneOnly"),
        ("any", "Any"),
    ] {
        yaml += &group_yaml(group, group, policy);
        yaml += &subscription_yaml("events", group);
    }
    w.apply_yaml("row12", &yaml).await?;
    w.wait_all_ready().await?;
    let mut apps = Vec::new();
    for group in ["prefer", "only", "any"] {
        for zone in [Zone::A, Zone::B] {
            let pod = format!("{group}-{}", zone.label());
            w.add_pod(&pod, zone, &labels(&[("app", group)])).await?;
        }
    }
    w.add_pod("producer", Zone::A, &labels(&[("role", "producer")]))
        .await?;
    for group in ["prefer", "only", "any"] {
        let (a, b) = (format!("{group}-zone-a"), format!("{group}-zone-b"));
        w.wait_members(group, &[&a, &b], CONVERGE).await?;
        let subscription = format!("{group}-events");
        apps.push(w.consumer(&a, &subscription, group).await?);
        apps.push(w.consumer(&b, &subscription, group).await?);
    }

    // Before: the producer's zone (zone-a) gets everything of prefer and only.
    w.publish("producer", "events", "before", 10, &[]).await?;
    w.wait_events("the first ten reach every group", |e| {
        ["prefer", "only", "any"]
            .iter()
            .all(|g| delivered_to_group(e, g).len() == 10)
    })
    .await?;

    // Every zone-a member of prefer and only turns NotReady.
    for pod in ["prefer-zone-a", "only-zone-a"] {
        w.set_ready(pod, false).await?;
    }
    w.wait_members("prefer", &["prefer-zone-b"], CONVERGE)
        .await?;
    w.wait_members("only", &["only-zone-b"], CONVERGE).await?;
    w.publish("producer", "events", "gone", 10, &[]).await?;
    w.wait_events("prefer fails over to zone-b, any is unaffected", |e| {
        delivered_to_group(e, "prefer").len() == 20 && delivered_to_group(e, "any").len() == 20
    })
    .await?;
    let events = w.events()?;
    let gone = |ids: Vec<String>| ids.iter().filter(|id| id.starts_with("gone-")).count();
    let failed_over = gone(delivered(&events, "prefer", "prefer-zone-b"));
    let crossed = gone(delivered(&events, "only", "only-zone-b"));
    println!(
        "row12: while zone-a was gone: prefer-zone-b got {failed_over}, only-zone-b got {crossed}"
    );
    ensure!(failed_over == 10, "PreferSameZone fails over cross-zone");
    ensure!(crossed == 0, "SameZoneOnly never crosses a zone");

    // A same-zone member returns: the waiting messages are delivered to it.
    w.set_ready("only-zone-a", true).await?;
    w.wait_events("only's waiting messages reach only-zone-a", |e| {
        delivered_to_group(e, "only").len() == 20
    })
    .await?;
    let events = w.events()?;
    ensure!(gone(delivered(&events, "only", "only-zone-a")) == 10);
    ensure!(gone(delivered(&events, "only", "only-zone-b")) == 0);
    let topic = format!("{}/events", w.ns);
    let c = counts(
        "row12 same_zone_members_gone",
        &events,
        &[
            any_member("prefer", &topic, false),
            any_member("only", &topic, false),
            any_member("any", &topic, false),
        ],
    );
    ensure!(c.acked == 20 && c.lost == 0 && c.unexpected == 0, "{c}");
    Ok(())
}
