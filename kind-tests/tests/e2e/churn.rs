//! docs/reliability.md row 21, `pod_churn_membership`: under a steady publish load, one worker
//! pod flips NotReady and back, another is deleted (its sidecar killed with messages in
//! flight) and recreated under the same name with a new IP. Each member leaves the table
//! within a deadline; messages in flight to the deleted pod are redelivered to another
//! member; nothing published after its removal reaches it; lost = 0.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry_kind_tests::app_events::AppEvent;
use ferry_kind_tests::e2e::{CONVERGE, E2e};
use ferry_kind_tests::netns::Zone;

use crate::support::*;

/// The design says 2 s; the deadline is generous for a loaded machine, the time printed.
const LEAVES_WITHIN: Duration = Duration::from_secs(10);
/// Messages of the load.
const LOAD: u64 = 300;

/// The index of the last message the publisher attempted so far (`load-<i>`).
fn last_attempted(events: &[AppEvent]) -> u64 {
    events
        .iter()
        .filter_map(|e| match e {
            AppEvent::Attempt { id, .. } => id.strip_prefix("load-")?.parse().ok(),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_churn_membership() -> Result<()> {
    let mut w = E2e::new("row21").await?;
    let mut yaml = topic_yaml("jobs", serde_json::json!({"durability": "Disk"}));
    yaml += &group_yaml("workers", "worker", "Any");
    yaml += &subscription_yaml("jobs", "workers");
    w.apply_yaml("row21", &yaml).await?;
    w.wait_all_ready().await?;
    let worker = labels(&[("app", "worker")]);
    for (pod, zone) in [("w1", Zone::A), ("w2", Zone::B), ("w3", Zone::A)] {
        w.add_pod(pod, zone, &worker).await?;
    }
    w.add_pod("producer", Zone::A, &labels(&[("role", "producer")]))
        .await?;
    w.wait_members("workers", &["w1", "w2", "w3"], CONVERGE)
        .await?;
    let old_ip = w.pod("w2")?.net.ip;
    let mut consumers = Vec::new();
    for pod in ["w1", "w3"] {
        consumers.push(w.consumer(pod, "workers-jobs", "workers").await?);
    }
    // w2's app hangs after two acks: what it receives next stays in flight.
    let sub = format!("{}/workers-jobs", w.ns);
    #[rustfmt::skip]
    let args = ["consume", "--subscription", &sub, "--group", "workers", "--stop-acking-after", "2"];
    let w2_consumer = w.app("w2", &args).await?;
    w2_consumer.wait_subscribed().await?;
    let topic = format!("{}/jobs", w.ns);
    let count = LOAD.to_string();
    let publisher = w
        .app(
            "producer",
            &[
                "publish",
                "--topic",
                &topic,
                "--prefix",
                "load",
                "--count",
                &count,
                "--interval-ms",
                "20",
            ],
        )
        .await?;
    w.wait_events("the load is flowing", |e| {
        delivered_to_group(e, "workers").len() >= 20
    })
    .await?;

    // w1 NotReady, then Ready again.
    w.set_ready("w1", false).await?;
    let start = Instant::now();
    w.wait_members("workers", &["w2", "w3"], LEAVES_WITHIN)
        .await?;
    println!("row21: NotReady w1 left the table in {:?}", start.elapsed());
    w.set_ready("w1", true).await?;
    w.wait_members("workers", &["w1", "w2", "w3"], CONVERGE)
        .await?;

    w.wait_events("w2's hung app holds messages", |e| {
        delivered(e, "workers", "w2").len() >= 4
    })
    .await?;
    // w2 deleted: it leaves the table; its sidecar keeps running a while, and nothing
    // published after the removal reaches it.
    let start = Instant::now();
    w.delete_pod_object("w2").await?;
    w.wait_members("workers", &["w1", "w3"], LEAVES_WITHIN)
        .await?;
    println!("row21: deleted w2 left the table in {:?}", start.elapsed());
    let removed_at = last_attempted(&publisher.events()?);
    w.wait_events("50 more messages are published after the removal", |e| {
        last_attempted(e) >= (removed_at + 50).min(LOAD)
    })
    .await?;
    let late: Vec<String> = delivered(&w.events()?, "workers", "w2")
        .into_iter()
        .filter(|id| {
            id.strip_prefix("load-")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > removed_at)
        })
        .collect();
    ensure!(
        late.is_empty(),
        "deliveries to the deleted w2 after its removal: {late:?}"
    );
    // Now the pod is really gone: its sidecar dies with what its hung app held in flight.
    let held = {
        let events = w.events()?;
        let mut held: std::collections::BTreeSet<String> =
            delivered(&events, "workers", "w2").into_iter().collect();
        for e in &events {
            if let AppEvent::ConsumerAcked { member, id, .. } = e
                && member == "w2"
            {
                held.remove(id);
            }
        }
        held
    };
    println!("row21: w2 dies holding {} unacked messages", held.len());
    ensure!(!held.is_empty(), "w2's hung app holds messages in flight");
    w.destroy_pod("w2").await?;
    w2_consumer.kill().await?;

    // Recreated under the same name with a new IP.
    let new_ip = w.add_pod("w2", Zone::B, &worker).await?;
    ensure!(new_ip != old_ip, "w2 gets a new IP");
    w.wait_members("workers", &["w1", "w2", "w3"], CONVERGE)
        .await?;
    let entry = w
        .member("workers", "w2")
        .await?
        .context("w2's member entry")?;
    println!("row21: w2 back as {entry}");
    ensure!(
        entry["address"].as_str() == Some(format!("{new_ip}:7710").as_str()),
        "w2's member entry has its new IP: {entry}"
    );
    consumers.push(w.consumer("w2", "workers-jobs", "workers").await?);

    publisher.wait_done().await?;
    w.wait_events("every message is delivered", |e| {
        delivered_to_group(e, "workers").len() as u64 == LOAD
    })
    .await?;
    // Redelivered: another attempt, to another member or to the new w2 (the same pod
    // name, a new pod).
    w.wait_events("w2's in-flight messages are redelivered", |e| {
        let again: std::collections::BTreeSet<&str> = e
            .iter()
            .filter_map(|e| match e {
                AppEvent::Delivered {
                    member,
                    id,
                    attempt,
                    ..
                } if member != "w2" || *attempt > 1 => Some(id.as_str()),
                _ => None,
            })
            .collect();
        held.iter().all(|id| again.contains(id.as_str()))
    })
    .await?;
    let events = w.events()?;
    let per_pod: Vec<(String, usize)> = ["w1", "w2", "w3"]
        .iter()
        .map(|p| ((*p).to_owned(), delivered(&events, "workers", p).len()))
        .collect();
    println!("row21: deliveries per pod name {per_pod:?}");
    let c = counts(
        "row21 pod_churn_membership",
        &events,
        &[any_member("workers", &topic, false)],
    );
    ensure!(c.acked == LOAD && c.lost == 0 && c.unexpected == 0, "{c}");
    ensure!(
        c.unexplained_duplicates == 0,
        "every duplicate is a redelivery: {c}"
    );
    Ok(())
}
