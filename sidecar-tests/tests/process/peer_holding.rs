//! docs/reliability.md row 25: copies and custody go only where the routing table says a
//! topic may be held. The replica chooser (`replica/choose.rs`) picks members of groups in
//! the producer's namespace; a sidecar that is no member (here the producer's own pod, in
//! no group) must take no copies and no custody, even from a caller of the mesh CA that may
//! hold the topic (the workers' identity), and a replica must show the copies it holds for
//! a producer to no identity but that producer's. Each refusal is PERMISSION_DENIED and
//! counted; no forged message reaches an app, and the mesh's own traffic flows (lost = 0).

use std::time::Duration;

use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{HeldRequest, PeerMessage, ReplicateRequest, TakeCustodyRequest};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::History;
use ferryctl::metrics::{counter, scrape};
use tokio::time::Instant;
use tonic::Code;

use super::common::{RUN_LIMIT, group, subscription, topic};
use super::peer_authz::as_identity;
use super::peer_mtls::{delivered_without_forgeries, publish_batch};

const TOPIC: &str = "default/orders";

fn copy(id: &str) -> PeerMessage {
    PeerMessage {
        id: id.into(),
        payload: b"forged".to_vec().into(),
        ..PeerMessage::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_hold_and_only_the_producer_reads_back() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Replicated, replicas: 2"),
        group("workers", "worker", ""),
        subscription("workers-orders", "orders", "workers", "ackWait: 5s"),
    ]
    .concat();
    let pods = "- {name: worker-a, zone: zone-a, labels: {app: worker}}\n\
                - {name: producer, zone: zone-b, serviceAccount: producer-sa}\n";
    let mesh = TestMesh::start(&crs, pods).await?;
    let worker = mesh.mesh.endpoints("worker-a")?;
    let producer = mesh.mesh.endpoints("producer")?;
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("worker-a")?,
        "default/workers-orders",
        "workers",
        "worker-a",
        &history,
        Behavior::Ack,
        Instant::now() + RUN_LIMIT,
    )
    .await?;
    let mut app = mesh.app("producer").await?;
    let mut n = publish_batch(&mut app, &history, 0, 20).await?;
    let admins = [worker.admin, producer.admin];
    let mut denied_before = 0.0;
    for admin in admins {
        denied_before += counter(&scrape(admin).await?, "peer_denied");
    }

    // The workers' identity may hold the topic: it is a member of a group of the namespace.
    let as_worker = |peer: &str| as_identity(&mesh, peer, "default", "default");
    let mut on_producer = PeerClient::new(as_worker(&producer.peer.to_string())?);
    let mut on_worker = PeerClient::new(as_worker(&worker.peer.to_string())?);
    let mut results = Vec::new();
    let custody = on_producer
        .take_custody(TakeCustodyRequest {
            from: "default/worker-a".into(),
            topic: TOPIC.into(),
            messages: vec![copy("forged-custody")],
        })
        .await;
    results.push(("custody on a sidecar in no group", custody.map(|_| ())));
    let replicate = on_producer
        .replicate(ReplicateRequest {
            producer: "default/worker-a".into(),
            producer_address: worker.peer.to_string(),
            topic: TOPIC.into(),
            incarnation: 1,
            copies: vec![copy("forged-copy")],
            ..ReplicateRequest::default()
        })
        .await;
    results.push(("copies on a sidecar in no group", replicate.map(|_| ())));
    n = publish_batch(&mut app, &history, n, 10).await?;
    // worker-a holds the producer's copies; they are the producer's alone.
    let held = on_worker
        .held(HeldRequest {
            producer: "default/producer".into(),
            topic: TOPIC.into(),
            ..HeldRequest::default()
        })
        .await;
    let copies_shown = held.as_ref().map_or(0, |r| r.get_ref().copies.len());
    results.push(("the producer's held copies", held.map(|_| ())));
    publish_batch(&mut app, &history, n, 10).await?;

    let forged = results.len() as u32;
    let mut refused = 0u32;
    for (what, r) in &results {
        match r {
            Err(s) if s.code() == Code::PermissionDenied => {
                refused += 1;
                println!("peer_holding: {what} -> {:?}: {}", s.code(), s.message());
            }
            other => println!("peer_holding: {what} -> not refused: {other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = loop {
        let mut denied = -denied_before;
        for admin in admins {
            denied += counter(&scrape(admin).await?, "peer_denied");
        }
        if denied >= f64::from(refused) || Instant::now() >= deadline {
            break denied;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (counts, forged_seen) = delivered_without_forgeries(&history).await?;
    println!(
        "peer_holding: {counts}; forged calls {forged}, refused {refused}, refusals counted \
         {denied}, held copies shown {copies_shown}, forged deliveries seen {forged_seen}, \
         messages lost {}",
        counts.lost
    );
    assert_eq!(refused, forged, "a forged holding call was accepted");
    assert!(denied >= f64::from(refused), "refusals not counted");
    assert_eq!((copies_shown, forged_seen), (0, 0));
    assert_eq!((counts.lost, counts.unexpected), (0, 0), "{counts}");
    consumer.abort();
    Ok(())
}
