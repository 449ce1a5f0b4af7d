//! A producer sidecar against a scripted consumer peer: a settlement that names another
//! message, or another incarnation of the producer, than the delivery held at its offset
//! does not settle it (the consumer answers for a message that held the offset before, a
//! `Memory` topic's producer having restarted); the producer counts it, asks after
//! `ackWait` and redelivers, and the settlement that names the delivery settles it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_api::crd::{Balancing, Delivery as DeliveryMode, Durability, Ordering, Qos, ZonePolicy};
use ferry_api::proto::v1::app_client::AppClient;
use ferry_api::proto::v1::peer_server::{Peer, PeerServer};
use ferry_api::proto::v1::*;
use ferry_api::routing::*;
use ferry_sidecar::metrics::Metrics;
use ferry_sidecar::routing::StaticSource;
use ferry_sidecar::{Config, Sidecar};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const NS: &str = "shop";

/// A consumer sidecar that answers each delivery at once with an ACKED settlement: for
/// attempt 1 naming another message, for attempt 2 another incarnation, then rightly.
/// Every delivery it gets goes to `seen`; `QueryDelivery` answers UNKNOWN.
struct Scripted {
    seen: mpsc::UnboundedSender<Deliver>,
}

fn answer(d: &Deliver) -> Settled {
    let id = d.message.as_ref().map(|m| m.id.clone()).unwrap_or_default();
    let (message_id, incarnation) = match d.attempt {
        1 => ("the message held here before".to_owned(), d.incarnation),
        // Incarnations are odd: this one is another, and not the 0 of an older version.
        2 => (id, d.incarnation ^ 2),
        _ => (id, d.incarnation),
    };
    Settled {
        subscription: d.subscription.clone(),
        offset: d.offset,
        attempt: d.attempt,
        outcome: Outcome::Acked as i32,
        message_id,
        incarnation,
        ..Settled::default()
    }
}

#[tonic::async_trait]
impl Peer for Scripted {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let settled = req.deliveries.iter().map(answer).collect();
                for d in req.deliveries {
                    let _ = seen.send(d);
                }
                if tx.send(Ok(ForwardResponse { settled })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn query_delivery(
        &self,
        _: Request<QueryDeliveryRequest>,
    ) -> Result<Response<QueryDeliveryResponse>, Status> {
        Ok(Response::new(QueryDeliveryResponse {
            state: DeliveryState::Unknown as i32,
        }))
    }

    async fn replicate(
        &self,
        _: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        Err(Status::unimplemented("not a replica"))
    }

    async fn held(&self, _: Request<HeldRequest>) -> Result<Response<HeldResponse>, Status> {
        Ok(Response::new(HeldResponse::default()))
    }

    async fn take_custody(
        &self,
        _: Request<TakeCustodyRequest>,
    ) -> Result<Response<TakeCustodyResponse>, Status> {
        Err(Status::unimplemented("takes no custody"))
    }
}

/// Routing: Memory topic `orders`, consumed by group `workers` = {the scripted peer at
/// `peer`}, `ackWait` 300 ms.
fn table(peer: &str) -> RoutingTable {
    let mut t = RoutingTable {
        revision: 1,
        ..Default::default()
    };
    t.topics.insert(
        object_ref(NS, "orders"),
        TopicEntry {
            schema_version: SCHEMA_VERSION,
            namespace: NS.into(),
            name: "orders".into(),
            durability: Durability::Memory,
            replicas: 1,
            ordering: Ordering::None,
            retention_max_age_ms: 3_600_000,
            retention_max_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
            dedup_window_ms: 60_000,
            allowed_publishers: None,
            allowed_subscriber_namespaces: vec![],
        },
    );
    t.groups.insert(
        object_ref(NS, "workers"),
        GroupEntry {
            schema_version: SCHEMA_VERSION,
            namespace: NS.into(),
            name: "workers".into(),
            delivery: DeliveryMode::Unicast,
            zone_policy: ZonePolicy::PreferSameZone,
            balancing: Balancing::RoundRobin,
        },
    );
    t.subscriptions.insert(
        object_ref(NS, "orders-sub"),
        SubscriptionEntry {
            schema_version: SCHEMA_VERSION,
            namespace: NS.into(),
            name: "orders-sub".into(),
            topic: object_ref(NS, "orders"),
            group: object_ref(NS, "workers"),
            qos: Qos::AtLeastOnce,
            ack_wait_ms: 300,
            max_deliveries: 5,
            backoff_initial_ms: 10,
            backoff_max_ms: 100,
            backoff_multiplier: 2.0,
            dead_letter_topic: None,
            max_in_flight: 100,
            filter_key_prefix: None,
            filter_headers: BTreeMap::new(),
        },
    );
    let member = MemberEntry {
        schema_version: SCHEMA_VERSION,
        namespace: NS.into(),
        group: "workers".into(),
        pod: "scripted".into(),
        address: peer.into(),
        zone: "z1".into(),
        node: "node-scripted".into(),
        ready: true,
        service_account: String::new(),
    };
    t.members.insert(
        object_ref(NS, "workers"),
        [("scripted".to_string(), member)].into(),
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_naming_another_message_or_incarnation_settles_nothing() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = listener.local_addr().unwrap().to_string();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(Scripted { seen: seen_tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let producer = Sidecar::bind(Config::local("a", NS, "z1", dir.path().into()))
        .await
        .unwrap()
        .start(Box::new(StaticSource::new(table(&peer))))
        .await
        .unwrap();
    let mut app = AppClient::connect(format!("http://{}", producer.addrs().app_grpc))
        .await
        .unwrap();
    app.publish(PublishRequest {
        topic: object_ref(NS, "orders"),
        message_id: "order-1".into(),
        payload: b"one"[..].into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Attempts 1 and 2 are answered with settlements that do not name them: each is
    // redelivered after its ack timeout. Attempt 3's names it and settles the message.
    let labels = Metrics::sub(&object_ref(NS, "orders"), &object_ref(NS, "orders-sub"));
    let m = &producer.engine().metrics;
    let acked = || m.acked.get_or_create(&labels).get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The scripted peer records each delivery before answering it.
    let mut attempts = Vec::new();
    while let Ok(d) = seen.try_recv() {
        let id = d.message.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        assert_eq!(id, "order-1");
        assert_ne!(
            d.incarnation, 0,
            "a delivery names the producer's incarnation"
        );
        attempts.push(d.attempt);
    }
    assert_eq!(
        attempts,
        [1, 2, 3],
        "redelivered until a settlement named it"
    );
    assert_eq!(m.settlements_mismatched.get_or_create(&labels).get(), 2);
    assert_eq!(acked(), 1);
    // Settled: nothing more is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), seen.recv())
            .await
            .is_err(),
        "no delivery after the settlement"
    );
}
