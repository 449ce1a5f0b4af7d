//! docs/reliability.md row 25: a caller with a valid certificate gets only what its identity
//! allows. On a topic whose `allowedPublishers` names only the producer's service account,
//! a sidecar of the same mesh CA proving another identity cannot forward into it (the
//! delivery is refused and never reaches the app), cannot place copies or custody on a
//! consumer's sidecar, cannot read the copies it holds, and a sidecar of another namespace
//! cannot ask about deliveries; every refusal names what was refused and is counted, and the
//! mesh's own traffic flows throughout (lost = 0).

use std::time::{Duration, SystemTime};

use ferry_api::identity::tls::Expect;
use ferry_api::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{
    HeldRequest, Outcome, PeerMessage, QueryDeliveryRequest, ReplicateRequest, TakeCustodyRequest,
};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::History;
use ferryctl::metrics::{counter, scrape};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use super::common::{group, subscription, topic};
use super::peer_mtls::{
    client_with, delivered_without_forgeries, forged, publish_batch, tls_channel,
};

pub(super) fn as_identity(
    mesh: &TestMesh,
    peer: &str,
    ns: &str,
    sa: &str,
) -> anyhow::Result<Channel> {
    let ca = ferryctl::mesh::identity::ca(mesh.dir.path())?;
    let who = SpiffeId::new(DEFAULT_TRUST_DOMAIN, ns, sa)?;
    let tls = client_with(&ca, ca.cert_pem(), &who, SystemTime::now());
    let config = tls.client_config(Expect::TrustDomain(DEFAULT_TRUST_DOMAIN.into()))?;
    Ok(tls_channel(peer, config))
}

fn copy(id: &str) -> PeerMessage {
    PeerMessage {
        id: id.into(),
        payload: b"forged".to_vec().into(),
        ..PeerMessage::default()
    }
}

/// A unary call's refusal: it must be PERMISSION_DENIED; prints and returns the message.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> anyhow::Result<()> {
    match r {
        Err(s) if s.code() == Code::PermissionDenied => {
            println!("peer_authz: {what} -> {:?}: {}", s.code(), s.message());
            Ok(())
        }
        other => anyhow::bail!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_grants_only_what_its_identity_may() -> anyhow::Result<()> {
    let crs = [
        topic(
            "orders",
            "durability: Disk, allowedPublishers: [producer-sa]",
        ),
        group("workers", "worker", ""),
        subscription("workers-orders", "orders", "workers", "ackWait: 5s"),
    ]
    .concat();
    let pods = "- {name: worker-a, zone: zone-a, labels: {app: worker}}\n\
                - {name: producer, zone: zone-a, serviceAccount: producer-sa}\n";
    let mesh = TestMesh::start(&crs, pods).await?;
    let worker = mesh.mesh.endpoints("worker-a")?;
    let peer = worker.peer.to_string();
    let history = History::default();
    let consumer = spawn_consumer(
        &mesh.app_addr("worker-a")?,
        "default/workers-orders",
        "workers",
        "worker-a",
        &history,
        Behavior::Ack,
        Instant::now() + Duration::from_secs(90),
    )
    .await?;
    let mut app = mesh.app("producer").await?;
    let mut n = publish_batch(&mut app, &history, 0, 20).await?;
    let denied_before = counter(&scrape(worker.admin).await?, "peer_denied");

    // Same namespace, an identity not on the allow-list and in no group.
    let intruder = as_identity(&mesh, &peer, "default", "intruder")?;
    let mut client = PeerClient::new(intruder.clone());
    let mut answers = client
        .forward(tokio_stream::iter(vec![forged(0)]))
        .await?
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the forward stream ended without an answer"))?;
    let settled = answer.settled.first().cloned().unwrap_or_default();
    println!(
        "peer_authz: forward as default/intruder -> {:?}: {}",
        Outcome::try_from(settled.outcome),
        settled.reason
    );
    assert_eq!(settled.outcome, Outcome::Rejected as i32);
    assert!(
        settled.reason.contains("permission denied"),
        "{}",
        settled.reason
    );
    n = publish_batch(&mut app, &history, n, 10).await?;

    let custody = client
        .take_custody(TakeCustodyRequest {
            from: "default/intruder-0".into(),
            topic: "default/orders".into(),
            messages: vec![copy("forged-custody")],
        })
        .await;
    refused("take custody as default/intruder", custody)?;
    let held = client
        .held(HeldRequest {
            producer: "default/producer".into(),
            topic: "default/orders".into(),
            ..HeldRequest::default()
        })
        .await;
    refused("read held copies as default/intruder", held)?;

    // Another namespace.
    let mut foreign = PeerClient::new(as_identity(&mesh, &peer, "evil", "default")?);
    let query = foreign
        .query_delivery(QueryDeliveryRequest {
            producer: "default/producer".into(),
            subscription: "default/workers-orders".into(),
            offset: 0,
            attempt: 1,
            ..QueryDeliveryRequest::default()
        })
        .await;
    refused("query a delivery as evil/default", query)?;
    let replicate = foreign
        .replicate(ReplicateRequest {
            producer: "evil/x".into(),
            producer_address: "127.0.0.1:1".into(),
            topic: "default/orders".into(),
            incarnation: 1,
            copies: vec![copy("forged-copy")],
            ..ReplicateRequest::default()
        })
        .await;
    refused("replicate as evil/default", replicate)?;
    publish_batch(&mut app, &history, n, 10).await?;

    let admin = worker.admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = loop {
        let denied = counter(&scrape(admin).await?, "peer_denied") - denied_before;
        if denied >= 5.0 {
            break denied;
        }
        anyhow::ensure!(Instant::now() < deadline, "refusals not counted: {denied}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (counts, forged_seen) = delivered_without_forgeries(&history).await?;
    println!(
        "peer_authz: {counts}; refusals counted {denied}; forged deliveries seen {forged_seen}"
    );
    assert_eq!(forged_seen, 0, "a forged message reached the app");
    assert_eq!((counts.lost, counts.unexpected), (0, 0));
    consumer.abort();
    Ok(())
}
