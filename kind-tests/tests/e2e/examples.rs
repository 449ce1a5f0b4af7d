//! Every example under `examples/` on the local control plane: its YAML applied with
//! `kubectl`, every object Ready, its pods (`pods.yaml`, or the defaults `ferryctl dev`
//! makes) created as Pods with sidecars in network namespaces, and its messages flowing as
//! its README says. One test per example, each with its own namespace and operator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use ferry_api::local::{LocalPod, default_pods, parse_pods};
use ferry_api::manifest::Manifests;
use ferry_kind_tests::e2e::E2e;
use ferry_kind_tests::netns::Zone;
use ferry_sidecar_tests::history::Expect;

use crate::support::*;

const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// Applies an example's Kubernetes YAML (files with top-level `apiVersion` and `kind`;
/// `pods.yaml` is skipped), waits until every object is Ready, and creates its pods.
async fn start_example(example: &str) -> Result<(E2e, Vec<LocalPod>)> {
    let folder = Path::new(EXAMPLES_DIR).join(example);
    let mut world = E2e::new(&format!("ex-{example}")).await?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")));
    files.sort();
    let mut manifests = Manifests::default();
    let mut pods = None;
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let has = |key: &str| text.lines().any(|l| l.starts_with(key));
        if has("apiVersion:") && has("kind:") {
            manifests.add_str(file, &text)?;
            let label = file.file_stem().map(|s| s.to_string_lossy().into_owned());
            world.apply_yaml(&label.unwrap_or_default(), &text).await?;
        } else {
            println!(
                "{example}: {} is not Kubernetes objects: its pods",
                file.display()
            );
            pods = Some(parse_pods(file, &text)?);
        }
    }
    world.wait_all_ready().await?;
    let pods = pods.unwrap_or_else(|| default_pods(&manifests));
    for pod in &pods {
        let zone = Zone::from_label(&pod.zone)?;
        let ip = world.add_pod(&pod.name, zone, &pod.labels).await?;
        println!("{example}: pod {} zone={} ip={ip}", pod.name, pod.zone);
        if !pod.ready {
            world.set_ready(&pod.name, false).await?;
        }
    }
    Ok((world, pods))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_quickstart() -> Result<()> {
    let (mut w, _) = start_example("quickstart").await?;
    w.wait_members(
        "billing",
        &["billing-a", "billing-b"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    let _a = w.consumer("billing-a", "billing-orders", "billing").await?;
    let _b = w.consumer("billing-b", "billing-orders", "billing").await?;
    w.publish("producer", "orders", "order", 5, &[]).await?;
    w.wait_events("billing gets all five", |e| {
        delivered_to_group(e, "billing").len() == 5
    })
    .await?;
    let events = w.events()?;
    let topic = format!("{}/orders", w.ns);
    let c = counts(
        "quickstart",
        &events,
        &[any_member("billing", &topic, false)],
    );
    ensure!(c.acked == 5 && c.lost == 0, "{c}");
    // The producer is in zone-a and billing prefers its zone: all five go to billing-a.
    ensure!(delivered(&events, "billing", "billing-a").len() == 5);
    ensure!(delivered(&events, "billing", "billing-b").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_work_queue() -> Result<()> {
    let (mut w, _) = start_example("work-queue").await?;
    w.wait_members(
        "workers",
        &["worker-1", "worker-2", "worker-3"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    // Publishing succeeds with no consumer running: the jobs wait.
    w.publish("producer", "jobs", "job", 30, &[]).await?;
    let workers = ["worker-1", "worker-2", "worker-3"];
    let mut apps = Vec::new();
    for worker in workers {
        apps.push(w.consumer(worker, "workers-jobs", "workers").await?);
    }
    w.wait_events("the 30 waiting jobs are delivered", |e| {
        delivered_to_group(e, "workers").len() == 30
    })
    .await?;
    // With every worker consuming, new jobs spread over them at once (each holds at most
    // one: `maxInFlight: 1`).
    w.publish("producer", "jobs", "more", 30, &[]).await?;
    w.wait_events("the 30 new jobs are delivered", |e| {
        delivered_to_group(e, "workers").len() == 60
    })
    .await?;
    let events = w.events()?;
    let topic = format!("{}/jobs", w.ns);
    let c = counts(
        "work-queue",
        &events,
        &[any_member("workers", &topic, false)],
    );
    ensure!(c.acked == 60 && c.lost == 0 && c.duplicated == 0, "{c}");
    let spread = |prefix: &str| -> Vec<usize> {
        workers
            .iter()
            .map(|m| {
                delivered(&events, "workers", m)
                    .iter()
                    .filter(|id| id.starts_with(prefix))
                    .count()
            })
            .collect()
    };
    let (waiting, new) = (spread("job-"), spread("more-"));
    println!("work-queue: jobs per worker: waiting {waiting:?}, new {new:?}");
    ensure!(
        new.iter().filter(|n| **n > 0).count() >= 2,
        "the new jobs spread over the workers: {new:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_fan_out() -> Result<()> {
    let (mut w, _) = start_example("fan-out").await?;
    let mut apps = Vec::new();
    for (group, subscription) in [
        ("billing", "billing-orders"),
        ("shipping", "shipping-orders"),
        ("analytics", "analytics-orders"),
    ] {
        let (a, b) = (format!("{group}-a"), format!("{group}-b"));
        w.wait_members(group, &[&a, &b], ferry_kind_tests::e2e::CONVERGE)
            .await?;
        apps.push(w.consumer(&a, subscription, group).await?);
        apps.push(w.consumer(&b, subscription, group).await?);
    }
    w.publish(
        "producer",
        "orders",
        "order",
        3,
        &["--header", "shippable=true"],
    )
    .await?;
    w.publish("producer", "orders", "digital", 2, &[]).await?;
    w.wait_events("billing and analytics get five, shipping three", |e| {
        delivered_to_group(e, "billing").len() == 5
            && delivered_to_group(e, "analytics").len() == 5
            && delivered_to_group(e, "shipping").len() == 3
    })
    .await?;
    let events = w.events()?;
    let topic = format!("{}/orders", w.ns);
    let c = counts(
        "fan-out",
        &events,
        &[
            any_member("billing", &topic, false),
            any_member("analytics", &topic, false),
        ],
    );
    ensure!(c.acked == 5 && c.lost == 0, "{c}");
    let shipped = delivered_to_group(&events, "shipping");
    ensure!(
        shipped.iter().all(|id| id.starts_with("order-")),
        "shipping got only the shippable orders: {shipped:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_broadcast() -> Result<()> {
    let (mut w, _) = start_example("broadcast").await?;
    let members = ["api-1", "api-2", "api-3"];
    w.wait_members("api-cache", &members, ferry_kind_tests::e2e::CONVERGE)
        .await?;
    let mut apps = Vec::new();
    for m in members {
        apps.push(w.consumer(m, "api-cache-invalidation", "api-cache").await?);
    }
    w.publish("catalog", "cache-invalidation", "product", 2, &[])
        .await?;
    w.wait_events("every API pod gets both invalidations", |e| {
        members.iter().all(|m| {
            delivered(e, "api-cache", m)
                .iter()
                .collect::<BTreeSet<_>>()
                .len()
                == 2
        })
    })
    .await?;
    let events = w.events()?;
    let c = counts(
        "broadcast",
        &events,
        &[Expect::EveryMember {
            group: "api-cache".into(),
            topic: format!("{}/cache-invalidation", w.ns),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }],
    );
    ensure!(c.acked == 2 && c.lost == 0, "{c}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_ordered() -> Result<()> {
    let (mut w, _) = start_example("ordered").await?;
    w.wait_members(
        "ledger",
        &["ledger-a", "ledger-b"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    let _a = w
        .consumer("ledger-a", "ledger-account-events", "ledger")
        .await?;
    let _b = w
        .consumer("ledger-b", "ledger-account-events", "ledger")
        .await?;
    w.publish(
        "producer",
        "account-events",
        "acct-42",
        5,
        &["--key", "acct-42"],
    )
    .await?;
    w.publish(
        "producer",
        "account-events",
        "acct-7",
        5,
        &["--key", "acct-7"],
    )
    .await?;
    w.wait_events("all ten events are delivered", |e| {
        delivered_to_group(e, "ledger").len() == 10
    })
    .await?;
    let events = w.events()?;
    let topic = format!("{}/account-events", w.ns);
    let c = counts("ordered", &events, &[any_member("ledger", &topic, true)]);
    ensure!(c.acked == 10 && c.lost == 0 && c.reordered == 0, "{c}");
    // Each key's sequence numbers arrive as 1..5 in order.
    for key in ["acct-42", "acct-7"] {
        let seqs: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                ferry_kind_tests::app_events::AppEvent::Delivered {
                    id,
                    key_sequence,
                    attempt: 1,
                    ..
                } if id.starts_with(&format!("{key}-")) => Some(*key_sequence),
                _ => None,
            })
            .collect();
        println!("ordered: {key} seq {seqs:?}");
        ensure!(seqs == [1, 2, 3, 4, 5], "{key}: {seqs:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_dead_letter() -> Result<()> {
    let (mut w, _) = start_example("dead-letter").await?;
    w.wait_members(
        "payments",
        &["payments-a", "payments-b"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    let sub = format!("{}/payments", w.ns);
    let mut apps = Vec::new();
    for pod in ["payments-a", "payments-b"] {
        let app = w
            .app(
                pod,
                &[
                    "consume",
                    "--subscription",
                    &sub,
                    "--group",
                    "payments",
                    "--nack",
                ],
            )
            .await?;
        app.wait_subscribed().await?;
        apps.push(app);
    }
    for pod in ["payments-ops-a", "payments-ops-b"] {
        apps.push(w.consumer(pod, "payments-dlq", "payments-ops").await?);
    }
    w.publish("producer", "payments", "pay", 1, &[]).await?;
    w.wait_events("pay-1 reaches the dead-letter topic", |e| {
        // The dead letter's id names where it died: `pay-1@<namespace>/payments`.
        delivered_to_group(e, "payments-ops")
            .iter()
            .any(|id| id.starts_with("pay-1@"))
    })
    .await?;
    let events = w.events()?;
    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            ferry_kind_tests::app_events::AppEvent::Delivered { group, attempt, .. }
                if group == "payments" =>
            {
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    println!("dead-letter: attempts {attempts:?}");
    ensure!(
        attempts == [1, 2, 3],
        "three deliveries before the DLQ: {attempts:?}"
    );
    let dead: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ferry_kind_tests::app_events::AppEvent::Delivered { group, headers, .. }
                if group == "payments-ops" =>
            {
                Some(headers.clone())
            }
            _ => None,
        })
        .collect();
    println!("dead-letter: DLQ headers {dead:?}");
    ensure!(dead.len() == 1, "the DLQ consumer gets it once: {dead:?}");
    ensure!(
        dead[0]
            .get("ferry-dlq-reason")
            .is_some_and(|r| r.contains("maxDeliveries")),
        "a reason header: {:?}",
        dead[0]
    );
    let topic = format!("{}/payments", w.ns);
    let c = counts(
        "dead-letter",
        &events,
        &[any_member("payments", &topic, false)],
    );
    ensure!(c.acked == 1 && c.lost == 0, "{c}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_zones() -> Result<()> {
    let (mut w, _) = start_example("zones").await?;
    w.wait_members(
        "nearby",
        &["nearby-a", "nearby-b"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    w.wait_members(
        "local-only",
        &["local-only-b"],
        ferry_kind_tests::e2e::CONVERGE,
    )
    .await?;
    let mut apps = vec![
        w.consumer("nearby-a", "nearby-events", "nearby").await?,
        w.consumer("nearby-b", "nearby-events", "nearby").await?,
        w.consumer("local-only-b", "local-only-events", "local-only")
            .await?,
    ];
    w.publish("producer-a", "events", "from-a", 3, &[]).await?;
    w.publish("producer-b", "events", "from-b", 3, &[]).await?;
    w.wait_events("nearby gets all six, local-only the three from b", |e| {
        delivered_to_group(e, "nearby").len() == 6 && delivered_to_group(e, "local-only").len() == 3
    })
    .await?;
    let events = w.events()?;
    let from = |ids: Vec<String>, prefix: &str| ids.iter().all(|id| id.starts_with(prefix));
    ensure!(from(delivered(&events, "nearby", "nearby-a"), "from-a-"));
    ensure!(from(delivered(&events, "nearby", "nearby-b"), "from-b-"));
    ensure!(from(
        delivered(&events, "local-only", "local-only-b"),
        "from-b-"
    ));
    // The `from a` messages wait in producer-a's sidecar until local-only has a member in
    // zone-a; then they are delivered there.
    let zone_a = labels(&[("app", "local-only")]);
    w.add_pod("local-only-a", Zone::A, &zone_a).await?;
    apps.push(
        w.consumer("local-only-a", "local-only-events", "local-only")
            .await?,
    );
    w.wait_events("the waiting messages reach local-only-a", |e| {
        delivered_to_group(e, "local-only").len() == 6
    })
    .await?;
    let events = w.events()?;
    ensure!(from(
        delivered(&events, "local-only", "local-only-a"),
        "from-a-"
    ));
    let topic = format!("{}/events", w.ns);
    let c = counts(
        "zones",
        &events,
        &[
            any_member("nearby", &topic, false),
            any_member("local-only", &topic, false),
        ],
    );
    ensure!(c.acked == 6 && c.lost == 0, "{c}");
    Ok(())
}
