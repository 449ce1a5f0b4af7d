//! docs/reliability.md row 11, `zone_partition`: zone-a and zone-b cannot reach each other
//! (blackhole routes in every pod's namespace; etcd stays reachable from both), producers
//! publish in both zones. A `PreferSameZone` group keeps receiving in each zone; messages
//! for a group whose only member is across the cut stay with their producer (a backlog,
//! not a loss) and drain after the heal. Lost = 0.

use anyhow::{Result, ensure};
use ferry_kind_tests::e2e::{CONVERGE, E2e};
use ferry_kind_tests::netns::Zone;

use crate::support::*;

const PER_PRODUCER: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_partition() -> Result<()> {
    let mut w = E2e::new("row11").await?;
    let mut yaml = topic_yaml("events", serde_json::json!({"durability": "Disk"}));
    yaml += &group_yaml("near", "near", "PreferSameZone");
    yaml += &subscription_yaml("events", "near");
    yaml += &group_yaml("remote", "remote", "Any");
    yaml += &subscription_yaml("events", "remote");
    w.apply_yaml("row11", &yaml).await?;
    w.wait_all_ready().await?;
    w.add_pod("near-a", Zone::A, &labels(&[("app", "near")]))
        .await?;
    w.add_pod("near-b", Zone::B, &labels(&[("app", "near")]))
        .await?;
    // remote's only member is in zone-b: zone-a's messages reach it only across zones.
    w.add_pod("remote-b", Zone::B, &labels(&[("app", "remote")]))
        .await?;
    let producer = labels(&[("role", "producer")]);
    w.add_pod("prod-a", Zone::A, &producer).await?;
    w.add_pod("prod-b", Zone::B, &producer).await?;
    w.wait_members("near", &["near-a", "near-b"], CONVERGE)
        .await?;
    w.wait_members("remote", &["remote-b"], CONVERGE).await?;
    let _apps = [
        w.consumer("near-a", "near-events", "near").await?,
        w.consumer("near-b", "near-events", "near").await?,
        w.consumer("remote-b", "remote-events", "remote").await?,
    ];
    // One message each way first, so that the peer connections exist when the cut comes.
    w.publish("prod-a", "events", "warm-a", 1, &[]).await?;
    w.publish("prod-b", "events", "warm-b", 1, &[]).await?;
    w.wait_events("the warm-up messages arrive", |e| {
        delivered_to_group(e, "near").len() == 2 && delivered_to_group(e, "remote").len() == 2
    })
    .await?;

    w.fabric.partition_zones()?;
    println!("row11: zones partitioned");
    w.publish("prod-a", "events", "pa", PER_PRODUCER, &[])
        .await?;
    w.publish("prod-b", "events", "pb", PER_PRODUCER, &[])
        .await?;
    let total = 2 + 2 * PER_PRODUCER as usize;
    let in_zone = 2 + PER_PRODUCER as usize;
    w.wait_events("in-zone delivery continues in both zones", |e| {
        delivered_to_group(e, "near").len() == total
            && delivered_to_group(e, "remote").len() == in_zone
    })
    .await?;
    let events = w.events()?;
    let remote_a = delivered(&events, "remote", "remote-b")
        .iter()
        .filter(|id| id.starts_with("pa-"))
        .count();
    println!("row11: during the partition remote-b got {remote_a} of zone-a's messages");
    ensure!(remote_a == 0, "nothing crosses the partition");
    for (member, prefix) in [("near-a", "pb-"), ("near-b", "pa-")] {
        let crossed = delivered(&events, "near", member)
            .iter()
            .filter(|id| id.starts_with(prefix))
            .count();
        ensure!(
            crossed == 0,
            "{member} got {crossed} messages from across the cut"
        );
    }

    w.fabric.heal_zones()?;
    println!("row11: healed");
    w.wait_events("zone-a's backlog drains to remote-b", |e| {
        delivered_to_group(e, "remote").len() == total
    })
    .await?;
    let events = w.events()?;
    let topic = format!("{}/events", w.ns);
    let c = counts(
        "row11 zone_partition",
        &events,
        &[
            any_member("near", &topic, false),
            any_member("remote", &topic, false),
        ],
    );
    ensure!(
        c.acked == total as u64 && c.lost == 0 && c.unexpected == 0,
        "{c}"
    );
    ensure!(c.unexplained_duplicates == 0, "{c}");
    Ok(())
}
