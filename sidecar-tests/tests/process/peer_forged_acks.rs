//! docs/reliability.md row 25: a settlement counts only from the member the delivery went
//! to. A member of the consuming group that is not a real sidecar (a test server with a
//! certificate of the mesh CA for the members' identity) answers every delivery it gets
//! with `REJECTED` and, on the same stream, forges `ACKED` for every other offset (the
//! deliveries the producer sent to the real member, whose app is not consuming yet). The
//! producer must ignore the forgeries and count them (`peer_denied{rpc="Settled"}`); once
//! the real app consumes, every acked message that did not go to the forger is delivered
//! to it (lost = 0). Those that went to the forger it may settle: it is the member they
//! went to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ferry_api::identity::tls::PeerTls;
use ferry_api::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use ferry_api::proto::v1::peer_server::{Peer, PeerServer};
use ferry_api::proto::v1::{
    ForwardRequest, ForwardResponse, HeldRequest, HeldResponse, Outcome, QueryDeliveryRequest,
    QueryDeliveryResponse, ReplicateRequest, ReplicateResponse, Settled, TakeCustodyRequest,
    TakeCustodyResponse,
};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::History;
use ferryctl::metrics::{counter, scrape};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::common::{RUN_LIMIT, group, subscription, topic};
use super::fake_peer::serve;
use super::peer_mtls::{client_with, publish_batch};

const MESSAGES: u64 = 40;

/// The forging member.
#[derive(Debug, Clone, Default)]
struct Forger {
    received: Arc<AtomicU64>,
    forged: Arc<AtomicU64>,
    /// Offsets delivered to it: it never acks those (that would be its right).
    mine: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    /// Message ids delivered to it.
    ids: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

fn settled(
    d_sub: &str,
    offset: u64,
    attempt: u32,
    outcome: Outcome,
    id: String,
    inc: u64,
) -> Settled {
    Settled {
        subscription: d_sub.to_owned(),
        offset,
        attempt,
        outcome: outcome as i32,
        delay_ms: 0,
        reason: "forged".into(),
        message_id: id,
        incarnation: inc,
    }
}

#[tonic::async_trait]
impl Peer for Forger {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let mut out = Vec::new();
                let mine = {
                    let mut mine = me.mine.lock().unwrap();
                    mine.extend(r.deliveries.iter().map(|d| d.offset));
                    mine.clone()
                };
                for d in r.deliveries {
                    me.received.fetch_add(1, Ordering::Relaxed);
                    let id = d.message.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                    me.ids.lock().unwrap().insert(id.clone());
                    out.push(settled(
                        &d.subscription,
                        d.offset,
                        d.attempt,
                        Outcome::Rejected,
                        id,
                        d.incarnation,
                    ));
                    for o in (0..=MESSAGES).filter(|o| !mine.contains(o)) {
                        for n in [o, o.saturating_sub(1)] {
                            out.push(settled(
                                &d.subscription,
                                o,
                                1,
                                Outcome::Acked,
                                format!("real-{n}"),
                                d.incarnation,
                            ));
                            me.forged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if tx.send(Ok(ForwardResponse { settled: out })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn query_delivery(
        &self,
        _: Request<QueryDeliveryRequest>,
    ) -> Result<Response<QueryDeliveryResponse>, Status> {
        Err(Status::unimplemented("forger"))
    }

    async fn replicate(
        &self,
        _: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        Err(Status::unimplemented("forger"))
    }

    async fn held(&self, _: Request<HeldRequest>) -> Result<Response<HeldResponse>, Status> {
        Err(Status::unimplemented("forger"))
    }

    async fn take_custody(
        &self,
        _: Request<TakeCustodyRequest>,
    ) -> Result<Response<TakeCustodyResponse>, Status> {
        Err(Status::unimplemented("forger"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_forged_by_another_member_settle_nothing() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Disk"),
        group("workers", "worker", ""),
        subscription("workers-orders", "orders", "workers", "ackWait: 30s"),
    ]
    .concat();
    let pods = "- {name: worker-a, zone: zone-a, labels: {app: worker}}\n\
                - {name: producer, zone: zone-a, serviceAccount: producer-sa}\n";
    let mut mesh = TestMesh::start(&crs, pods).await?;
    let ca = ferryctl::mesh::identity::ca(mesh.dir.path())?;
    let who = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "default")?;
    let tls: PeerTls = client_with(&ca, ca.cert_pem(), &who, SystemTime::now());
    let forger = Forger::default();
    let addr = serve(&tls, PeerServer::new(forger.clone())).await?;
    let (group_ref, mut record) = mesh
        .member_records("worker-a")
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("worker-a has no member record"))?;
    record.pod = "worker-f".into();
    record.address = addr.to_string();
    record.service_account = "default".into();
    mesh.add_member(&group_ref, record)?;
    let producer_admin = mesh.mesh.endpoints("producer")?.admin;
    let denied_before = counter(&scrape(producer_admin).await?, "peer_denied");

    // Real messages while worker-a's app is away: its deliveries wait in flight.
    let history = History::default();
    let mut app = mesh.app("producer").await?;
    let mut n = 0;
    while forger.received.load(Ordering::Relaxed) < 5 && u64::from(n) < 4 * MESSAGES {
        n = publish_batch(&mut app, &history, n, 1).await?;
    }
    if u64::from(n) < MESSAGES {
        publish_batch(&mut app, &history, n, (MESSAGES as u32) - n).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let c = counter(&scrape(producer_admin).await?, "peer_denied") - denied_before;
        if c >= 1.0 || Instant::now() >= deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
    // A delivery that reached the forger may be settled by it (it is the member it went
    // to, even if it answered before reading it); every other acked message must reach the
    // real app.
    let elsewhere = || -> Vec<String> {
        let to_forger = forger.ids.lock().unwrap().clone();
        let delivered: std::collections::HashSet<String> = history
            .deliveries()
            .into_iter()
            .map(|d| d.message_id)
            .collect();
        history
            .acked_ids()
            .into_iter()
            .filter(|id| !to_forger.contains(id) && !delivered.contains(id))
            .collect()
    };
    let _ = wait_for(
        Duration::from_secs(60),
        "every message not sent to the forger delivered",
        || elsewhere().is_empty(),
    )
    .await;
    let lost = elsewhere().len();
    let forged = forger.forged.load(Ordering::Relaxed);
    println!(
        "peer_forged_acks: acked {}, delivered to the app {}, to the forger {}; forged \
         settlements {forged}, counted {counted}; messages that went elsewhere lost {lost}",
        history.acked_ids().len(),
        history.deliveries().len(),
        forger.ids.lock().unwrap().len(),
    );
    assert!(forged > 0, "the forger got no delivery");
    assert!(counted >= 1.0, "forged settlements not counted");
    assert_eq!(
        lost, 0,
        "a forged settlement settled a delivery that went elsewhere"
    );
    consumer.abort();
    Ok(())
}
