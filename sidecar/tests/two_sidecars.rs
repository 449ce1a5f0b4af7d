//! Two sidecars in one process, talking over loopback gRPC: publish on A, consume on B.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_api::crd::{Balancing, Delivery as DeliveryMode, Durability, Ordering, Qos, ZonePolicy};
use ferry_api::proto::v1::app_client::AppClient;
use ferry_api::proto::v1::consume_request::Frame as In;
use ferry_api::proto::v1::consume_response::Frame as Out;
use ferry_api::proto::v1::*;
use ferry_api::routing::*;
use ferry_sidecar::routing::StaticSource;
use ferry_sidecar::{Config, Running, Sidecar};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

const NS: &str = "shop";

fn topic(name: &str, durability: Durability) -> TopicEntry {
    TopicEntry {
        schema_version: SCHEMA_VERSION,
        namespace: NS.into(),
        name: name.into(),
        durability,
        replicas: 1,
        ordering: Ordering::None,
        retention_max_age_ms: 3_600_000,
        retention_max_bytes: 64 << 20,
        max_message_bytes: 1 << 20,
        dedup_window_ms: 60_000,
        allowed_publishers: None,
        allowed_subscriber_namespaces: vec![],
    }
}

fn group(name: &str) -> GroupEntry {
    GroupEntry {
        schema_version: SCHEMA_VERSION,
        namespace: NS.into(),
        name: name.into(),
        delivery: DeliveryMode::Unicast,
        zone_policy: ZonePolicy::PreferSameZone,
        balancing: Balancing::RoundRobin,
    }
}

fn subscription(name: &str, topic: &str, group: &str) -> SubscriptionEntry {
    SubscriptionEntry {
        schema_version: SCHEMA_VERSION,
        namespace: NS.into(),
        name: name.into(),
        topic: object_ref(NS, topic),
        group: object_ref(NS, group),
        qos: Qos::AtLeastOnce,
        ack_wait_ms: 10_000,
        max_deliveries: 5,
        backoff_initial_ms: 10,
        backoff_max_ms: 100,
        backoff_multiplier: 2.0,
        dead_letter_topic: None,
        max_in_flight: 100,
        filter_key_prefix: None,
        filter_headers: BTreeMap::new(),
    }
}

fn member(group: &str, pod: &str, address: &str) -> MemberEntry {
    MemberEntry {
        schema_version: SCHEMA_VERSION,
        namespace: NS.into(),
        group: group.into(),
        pod: pod.into(),
        address: address.into(),
        zone: "z1".into(),
        node: format!("node-{pod}"),
        ready: true,
        service_account: String::new(),
    }
}

struct Mesh {
    a: Running,
    b: Running,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Starts sidecars "a" and "b". Topic `orders` (Disk) is consumed by group `workers` = {b};
/// topic `poison` (Memory, maxDeliveries 3) too, with dead-letter topic `poison-dlq`,
/// consumed by group `auditors` = {a} (so A delivers the dead letters to itself in process).
async fn mesh() -> Mesh {
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let a = Sidecar::bind(Config::local("a", NS, "z1", da.path().into()))
        .await
        .unwrap();
    let b = Sidecar::bind(Config::local("b", NS, "z1", db.path().into()))
        .await
        .unwrap();
    let mut t = RoutingTable {
        revision: 1,
        ..Default::default()
    };
    for (name, d) in [
        ("orders", Durability::Disk),
        ("poison", Durability::Memory),
        ("poison-dlq", Durability::Disk),
    ] {
        t.topics.insert(object_ref(NS, name), topic(name, d));
    }
    for g in ["workers", "auditors"] {
        t.groups.insert(object_ref(NS, g), group(g));
    }
    t.subscriptions.insert(
        object_ref(NS, "orders-sub"),
        subscription("orders-sub", "orders", "workers"),
    );
    let mut poison = subscription("poison-sub", "poison", "workers");
    poison.max_deliveries = 3;
    poison.dead_letter_topic = Some(object_ref(NS, "poison-dlq"));
    t.subscriptions.insert(object_ref(NS, "poison-sub"), poison);
    t.subscriptions.insert(
        object_ref(NS, "audit"),
        subscription("audit", "poison-dlq", "auditors"),
    );
    t.members.insert(
        object_ref(NS, "workers"),
        [(
            "b".to_string(),
            member("workers", "b", &b.addrs().advertise.to_string()),
        )]
        .into(),
    );
    t.members.insert(
        object_ref(NS, "auditors"),
        [(
            "a".to_string(),
            member("auditors", "a", &a.addrs().advertise.to_string()),
        )]
        .into(),
    );
    let a = a
        .start(Box::new(StaticSource::new(t.clone())))
        .await
        .unwrap();
    let b = b.start(Box::new(StaticSource::new(t))).await.unwrap();
    Mesh {
        a,
        b,
        _dirs: (da, db),
    }
}

async fn client(r: &Running) -> AppClient<Channel> {
    AppClient::connect(format!("http://{}", r.addrs().app_grpc))
        .await
        .unwrap()
}

/// A consume stream: frames go in through the sender, responses come out of the stream.
async fn consume(
    c: &mut AppClient<Channel>,
    subscription: &str,
    credit: u32,
) -> (
    mpsc::UnboundedSender<ConsumeRequest>,
    tonic::Streaming<ConsumeResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(ConsumeRequest {
        frame: Some(In::Subscribe(Subscribe {
            subscription: subscription.into(),
            initial_credit: credit,
        })),
    })
    .unwrap();
    let mut stream = c
        .consume(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.frame, Some(Out::Subscribed(_))), "{first:?}");
    (tx, stream)
}

async fn next_delivery(s: &mut tonic::Streaming<ConsumeResponse>) -> Delivery {
    next_frame(s, "delivery", |f| match f {
        Out::Delivery(d) => Some(d),
        _ => None,
    })
    .await
}

/// The next frame that `pick` takes, within 10 s; frames it leaves are skipped.
async fn next_frame<T>(
    s: &mut tonic::Streaming<ConsumeResponse>,
    what: &str,
    pick: impl Fn(Out) -> Option<T>,
) -> T {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s"))
            .unwrap()
            .expect("stream ended");
        if let Some(t) = m.frame.and_then(&pick) {
            return t;
        }
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn drained(r: &Running, topic: &str) -> bool {
    r.engine()
        .open_stores()
        .iter()
        .any(|s| s.topic == topic && s.stats.drained())
}

fn publish_req(topic: &str, payload: &'static [u8]) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        payload: payload.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_a_consume_on_b_ack_settles_a() {
    let m = mesh().await;
    let mut pa = client(&m.a).await;
    let mut cb = client(&m.b).await;
    let r = pa
        .publish(publish_req("orders", b"hello"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.message_id.is_empty());
    assert!(!r.duplicate);
    // Same id again: deduplicated at the producer.
    let mut again = publish_req("orders", b"hello");
    again.message_id = r.message_id.clone();
    let dup = pa.publish(again).await.unwrap().into_inner();
    assert!(dup.duplicate);
    assert_eq!(dup.offset, r.offset);

    let (tx, mut stream) = consume(&mut cb, "orders-sub", 10).await;
    let d = next_delivery(&mut stream).await;
    assert_eq!(&d.payload[..], b"hello");
    assert_eq!(d.message_id, r.message_id);
    assert_eq!(d.attempt, 1);
    assert_eq!(d.topic, "shop/orders");
    assert!(!drained(&m.a, "shop/orders"));
    tx.send(ConsumeRequest {
        frame: Some(In::Ack(AckFrame {
            delivery_id: d.delivery_id.clone(),
            ..AckFrame::default()
        })),
    })
    .unwrap();
    wait_for("A's backlog of orders to settle", || {
        drained(&m.a, "shop/orders")
    })
    .await;

    // A second ack of the same id is refused precisely and settles nothing twice.
    let err = cb
        .ack(AckRequest {
            delivery_id: d.delivery_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("already acked"), "{}", err.message());
    let err = cb
        .ack(AckRequest {
            delivery_id: "1.2.3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("unknown delivery id"),
        "{}",
        err.message()
    );

    // Unknown topic and oversized payloads get precise statuses.
    let err = pa.publish(publish_req("nope", b"x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut big = publish_req("orders", b"");
    big.payload = vec![0u8; (1 << 20) + 1].into();
    let err = pa.publish(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("maxMessageBytes"),
        "{}",
        err.message()
    );

    m.a.shutdown();
    m.b.shutdown();
    m.a.wait().await.unwrap();
    m.b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_then_dead_letters_after_max_deliveries() {
    let m = mesh().await;
    let mut pa = client(&m.a).await;
    let mut ca = client(&m.a).await;
    let mut cb = client(&m.b).await;
    let mut req = publish_req("poison", b"bad");
    req.headers.insert("origin".into(), "test".into());
    let r = pa.publish(req).await.unwrap().into_inner();

    let (tx, mut stream) = consume(&mut cb, "poison-sub", 10).await;
    let mut ids = Vec::new();
    for attempt in 1..=3 {
        let d = next_delivery(&mut stream).await;
        assert_eq!(d.attempt, attempt);
        assert_eq!(d.message_id, r.message_id);
        ids.push(d.delivery_id.clone());
        tx.send(ConsumeRequest {
            frame: Some(In::Nack(NackFrame {
                delivery_id: d.delivery_id,
                delay_ms: 0,
            })),
        })
        .unwrap();
    }
    // The dead letter is delivered by A to its own app, in process.
    let (atx, mut audit) = consume(&mut ca, "audit", 10).await;
    let dl = next_delivery(&mut audit).await;
    assert_eq!(&dl.payload[..], b"bad");
    let h = |k: &str| dl.headers.get(k).cloned().unwrap_or_default();
    assert!(
        h("ferry-dlq-reason").contains("maxDeliveries (3)"),
        "{:?}",
        dl.headers
    );
    assert_eq!(
        h("ferry-dlq-attempts").split(';').count(),
        3,
        "{:?}",
        dl.headers
    );
    assert_eq!(h("ferry-dlq-source-topic"), "shop/poison");
    assert_eq!(h("ferry-dlq-subscription"), "shop/poison-sub");
    assert_eq!(h("ferry-dlq-message-id"), r.message_id);
    assert_eq!(h("origin"), "test");
    atx.send(ConsumeRequest {
        frame: Some(In::Ack(AckFrame {
            delivery_id: dl.delivery_id,
            ..AckFrame::default()
        })),
    })
    .unwrap();
    wait_for("the poison message to be settled", || {
        drained(&m.a, "shop/poison")
    })
    .await;
    wait_for("the dead letter to be settled", || {
        drained(&m.a, "shop/poison-dlq")
    })
    .await;
    // Nothing more arrives on B: exactly maxDeliveries deliveries.
    let more = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(
        more.is_err(),
        "unexpected frame after the dead letter: {more:?}"
    );
    // A late ack of a nacked delivery is refused precisely.
    let err = cb
        .ack(AckRequest {
            delivery_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("already nacked"),
        "{}",
        err.message()
    );
    m.a.shutdown();
    m.b.shutdown();
    m.a.wait().await.unwrap();
    m.b.wait().await.unwrap();
}

/// One ack frame acks several deliveries and refills the window; an id in it that fails
/// gets its own `settle_error` and the others are acked all the same; a frame naming no id
/// and granting nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ack_frame_acks_many_and_grants_credit() {
    let m = mesh().await;
    let mut pa = client(&m.a).await;
    let mut cb = client(&m.b).await;
    for p in [b"one" as &'static [u8], b"two", b"three"] {
        pa.publish(publish_req("orders", p)).await.unwrap();
    }
    let (tx, mut stream) = consume(&mut cb, "orders-sub", 3).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(next_delivery(&mut stream).await.delivery_id);
    }
    let last = ids.pop().unwrap();
    ids.push("1.2.3".into());
    tx.send(ConsumeRequest {
        frame: Some(In::Ack(AckFrame {
            delivery_id: last,
            delivery_ids: ids,
            credit: 2,
        })),
    })
    .unwrap();
    let refused = next_frame(&mut stream, "settle error", |f| match f {
        Out::SettleError(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(refused.delivery_id, "1.2.3");
    wait_for("A's backlog of orders to settle", || {
        drained(&m.a, "shop/orders")
    })
    .await;

    // The frame's credit lets two more through, and only two.
    for p in [b"four" as &'static [u8], b"five", b"six"] {
        pa.publish(publish_req("orders", p)).await.unwrap();
    }
    let got = [
        next_delivery(&mut stream).await,
        next_delivery(&mut stream).await,
    ];
    assert_eq!(
        got.iter().map(|d| &d.payload[..]).collect::<Vec<_>>(),
        [b"four" as &[u8], b"five"]
    );
    let more = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(more.is_err(), "a delivery beyond the credit: {more:?}");

    tx.send(ConsumeRequest {
        frame: Some(In::Ack(AckFrame::default())),
    })
    .unwrap();
    let m2 = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no answer to an empty ack frame")
        .unwrap()
        .expect("stream ended");
    match m2.frame {
        Some(Out::SettleError(e)) => {
            let err = e.error.unwrap_or_default();
            assert_eq!(err.code, tonic::Code::InvalidArgument as i32);
            assert!(err.message.contains("no delivery id"), "{}", err.message);
        }
        other => panic!("expected a settle error, got {other:?}"),
    }

    m.a.shutdown();
    m.b.shutdown();
    m.a.wait().await.unwrap();
    m.b.wait().await.unwrap();
}
