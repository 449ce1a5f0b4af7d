//! docs/reliability.md row 3, pause part: the sidecar of the consumer holding a delivery is
//! frozen (SIGSTOP) past `ackWait`; the producer's sidecar cannot get an answer from it,
//! redelivers to the other member, whose app acks. When the frozen sidecar resumes, its
//! app's late ack of the superseded delivery gets a precise "expired" error, and the
//! message is settled once only at the producer.

use std::time::Duration;

use ferry_api::proto::v1::AckRequest;
use ferry_sidecar_tests::harness::{TestMesh, publish};
use ferry_sidecar_tests::history::{Delivered, Expect, History};
use ferryctl::client::{Consumer, Event};
use ferryctl::http;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;

use super::common::{drain, group, pod, subscription, topic};

/// The sum of a counter's samples whose labels contain `label` in a Prometheus text page.
pub fn counter(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Resumes a stopped process when dropped, so a failing test leaves nothing frozen.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_after_a_pause_is_refused_and_settles_once() -> anyhow::Result<()> {
    let crs = [
        topic("jobs", "durability: Disk"),
        group("workers", "workers", "zonePolicy: Any"),
        subscription(
            "workers-jobs",
            "jobs",
            "workers",
            "ackWait: 2s, maxDeliveries: 5, backoff: {initial: 100ms, max: 500ms, multiplier: 2}",
        ),
    ]
    .concat();
    let pods = [
        pod("w1", "zone-a", "workers"),
        pod("w2", "zone-a", "workers"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let history = History::default();
    // Both apps take deliveries and hold them: the test decides who acks, and when.
    let mut apps = Vec::new();
    for member in ["w1", "w2"] {
        let mut app = mesh.app(member).await?;
        let consumer = Consumer::subscribe(&mut app, "default/workers-jobs", 4).await?;
        apps.push((member, app, consumer));
    }
    let mut producer = mesh.app("producer").await?;
    publish(
        &mut producer,
        &history,
        "producer",
        "default/jobs",
        "job-1",
        None,
        b"work".to_vec(),
    )
    .await?;

    // The first delivery reaches one of the two apps.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (first, delivery) = 'found: loop {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no first delivery within 30s"
        );
        for (i, (_, _, consumer)) in apps.iter_mut().enumerate() {
            if let Some(Event::Delivery(d)) = consumer.next(Duration::from_millis(50)).await? {
                break 'found (i, d);
            }
        }
    };
    let (holder, other) = (apps[first].0, apps[1 - first].0);
    record(&history, holder, &delivery.message_id, delivery.attempt);
    println!(
        "late_ack: first delivery to {holder} (attempt {}), freezing its sidecar",
        delivery.attempt
    );
    let pid = i32::try_from(mesh.mesh.process(holder)?.pid)?;
    kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
    let frozen = Frozen(pid);

    // The other member gets the redelivery and acks it.
    let redelivery = loop {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(30),
            "no redelivery to {other} while {holder}'s sidecar is frozen"
        );
        let consumer = &mut apps[1 - first].2;
        if let Some(Event::Delivery(d)) = consumer.next(Duration::from_millis(100)).await? {
            break d;
        }
    };
    record(&history, other, &redelivery.message_id, redelivery.attempt);
    anyhow::ensure!(redelivery.message_id == delivery.message_id);
    anyhow::ensure!(
        redelivery.attempt > delivery.attempt,
        "a redelivery carries a higher attempt"
    );
    apps[1 - first].2.ack(&redelivery.delivery_id)?;
    history.consumer_acked("workers", other, &redelivery.message_id);
    let producer_admin = mesh.mesh.endpoints("producer")?.admin;
    let acked = || async {
        let page = http::get(producer_admin, "/metrics").await?;
        anyhow::Ok(counter(
            &page.text(),
            "ferry_sidecar_acked_total",
            "workers-jobs",
        ))
    };
    let started = tokio::time::Instant::now();
    while acked().await? < 1.0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the producer never counted the ack"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The frozen sidecar resumes; its app acks the superseded delivery, late.
    drop(frozen);
    let late = apps[first]
        .1
        .ack(AckRequest {
            delivery_id: delivery.delivery_id.clone(),
        })
        .await
        .expect_err("a late ack of a superseded delivery is refused");
    println!(
        "late_ack: {holder}'s late ack -> {:?}: {}",
        late.code(),
        late.message()
    );
    assert_eq!(late.code(), Code::NotFound, "{}", late.message());
    assert!(
        late.message().contains("ackWait passed"),
        "{}",
        late.message()
    );

    let expect = [Expect::AnyMember {
        group: "workers".into(),
        topic: "default/jobs".into(),
        check_order: false,
    }];
    let counts = drain(&history, &expect, Duration::from_secs(30), "late_ack").await?;
    assert_eq!(counts.lost, 0);
    assert!(
        counts.duplicated <= 1,
        "at most the one explained redelivery"
    );
    // Settled once: the late ack was refused by the resumed sidecar itself, so nothing
    // more reaches the producer; its ack count is 1.
    let settled = acked().await?;
    println!("late_ack: producer counted {settled} ack(s)");
    assert_eq!(settled, 1.0, "the message was settled once only");
    Ok(())
}

fn record(history: &History, member: &str, message_id: &str, attempt: u32) {
    history.delivered(Delivered {
        group: "workers".into(),
        member: member.into(),
        message_id: message_id.into(),
        attempt,
        key_sequence: 0,
        headers: Default::default(),
    });
}
