//! docs/reliability.md row 25: a replica's size is bounded by the topic's retention. A
//! sidecar of the mesh CA that may hold the topic (a member of the consuming group, of the
//! producer's namespace) places copies on a replica under a producer name of its own, as
//! many as it likes. Past the topic's `retention.maxBytes` of copies for that producer the
//! replica answers RESOURCE_EXHAUSTED naming the topic and the limit, stores nothing more,
//! and counts it; the mesh's own traffic flows throughout (lost = 0).

use std::time::Duration;

use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{PeerMessage, ReplicateRequest};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::metrics::{counter, scrape};
use tokio::time::Instant;
use tonic::Code;

use super::common::{RUN_LIMIT, drain, group, subscription, topic};
use super::peer_authz::as_identity;
use super::peer_mtls::publish_batch;

const TOPIC: &str = "default/orders";
/// The topic's `retention.maxBytes`.
const MAX_BYTES: u64 = 64 * 1024;
/// Payload of one forged copy.
const COPY_BYTES: usize = 8 * 1024;

fn copies(call: u32) -> Vec<PeerMessage> {
    (0..2)
        .map(|i| PeerMessage {
            id: format!("forged-{call}-{i}"),
            payload: vec![b'f'; COPY_BYTES].into(),
            ..PeerMessage::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_past_retention_are_refused() -> anyhow::Result<()> {
    let crs = [
        topic(
            "orders",
            "durability: Replicated, replicas: 2, retention: {maxBytes: 64Ki}",
        ),
        group("workers", "worker", ""),
        subscription("workers-orders", "orders", "workers", "ackWait: 5s"),
    ]
    .concat();
    let pods = "- {name: worker-a, zone: zone-a, labels: {app: worker}}\n\
                - {name: producer, zone: zone-b, serviceAccount: producer-sa}\n";
    let mesh = TestMesh::start(&crs, pods).await?;
    let worker = mesh.mesh.endpoints("worker-a")?;
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
    let full_before = counter(&scrape(worker.admin).await?, "replica_full");

    // The workers' identity, as a producer name it invents.
    let channel = as_identity(&mesh, &worker.peer.to_string(), "default", "default")?;
    let mut client = PeerClient::new(channel);
    let request = |copies: Vec<PeerMessage>| ReplicateRequest {
        producer: "default/filler-0".into(),
        producer_address: "127.0.0.1:1".into(),
        topic: TOPIC.into(),
        incarnation: 1,
        copies,
        ..ReplicateRequest::default()
    };
    let (mut forged, mut refused, mut accepted_bytes, mut held) = (0u32, 0u32, 0u64, 0u64);
    for call in 0..24 {
        forged += 1;
        match client.replicate(request(copies(call))).await {
            Ok(r) => {
                accepted_bytes += 2 * COPY_BYTES as u64;
                held = r.into_inner().held;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused += 1;
                if refused == 1 {
                    println!(
                        "peer_replica_limit: call {call} -> {:?}: {}",
                        s.code(),
                        s.message()
                    );
                    assert!(s.message().contains(TOPIC), "{}", s.message());
                    assert!(
                        s.message().contains("retention.maxBytes"),
                        "{}",
                        s.message()
                    );
                }
            }
            Err(s) => anyhow::bail!("call {call}: unexpected {s:?}"),
        }
        n = publish_batch(&mut app, &history, n, 1).await?;
    }
    // What the replica holds for the name after the refusals: a call with no copies.
    let after = client
        .replicate(request(Vec::new()))
        .await?
        .into_inner()
        .held;

    let admin = worker.admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    let full = loop {
        let full = counter(&scrape(admin).await?, "replica_full") - full_before;
        if full >= f64::from(refused) || Instant::now() >= deadline {
            break full;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = [Expect::AnyMember {
        group: "workers".into(),
        topic: TOPIC.into(),
        check_order: false,
    }];
    let counts = drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "peer_replica_limit",
    )
    .await?;
    println!(
        "peer_replica_limit: forged calls {forged}, refused {refused}, refusals counted {full}, \
         payload accepted {accepted_bytes} bytes of {MAX_BYTES}, copies held {held} then {after}, \
         messages lost {}",
        counts.lost
    );
    assert!(refused > 0, "the replica took every copy");
    assert!(
        accepted_bytes <= MAX_BYTES,
        "copies past retention.maxBytes were stored"
    );
    assert_eq!(held, after, "a refused call stored something");
    assert!(full >= f64::from(refused), "refusals not counted");
    assert_eq!((counts.lost, counts.unexpected), (0, 0), "{counts}");
    consumer.abort();
    Ok(())
}
