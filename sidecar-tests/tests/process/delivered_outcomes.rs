//! `ACK_LEVEL_DELIVERED` tells the truth: a publish that waits for delivery hears, per
//! subscription, what became of its message (acked, dead-lettered, dropped, expired,
//! filtered, timed out), and succeeds only when every subscription it was for acked it.
//!
//! One mesh, each topic set up for one answer:
//! - `orders`: four subscriptions: `acker` acks, `poison` always nacks (dead-lettered after
//!   `maxDeliveries: 2`), `lossy` is `AtMostOnce` and nacks (dropped), `picky` filters the
//!   message out. Not every one acked: refused (ABORTED), each outcome named.
//! - `happy`: `acker` acks, `picky` filters it out: delivered to every subscription it
//!   was for, so OK, with both outcomes.
//! - `fleeting`: the only group's member runs no consuming app (its sidecar hands each
//!   delivery back after `ackWait: 1s`) and the message has a 300 ms TTL: EXPIRED.
//! - `slow`: the same group, no TTL: TIMED_OUT after `delivered_timeout_ms`.
//! - `lonely`: no subscription at all: refused (FAILED_PRECONDITION), saying so.
//!
//! Each is published over gRPC (the status code and message) and over HTTP (the JSON's
//! per-subscription outcomes).

use std::collections::{BTreeMap, HashMap};

use ferry_api::proto::v1::{AckLevel, PublishRequest};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, spawn_consumer};
use ferry_sidecar_tests::history::{Expect, History};
use tokio::time::Instant;

use super::common::{RUN_LIMIT, group, pod, subscription, topic};

async fn mesh() -> anyhow::Result<TestMesh> {
    let crs = [
        topic("orders", "durability: Disk"),
        topic("orders-dlq", "durability: Disk"),
        topic("happy", "durability: Disk"),
        topic("fleeting", "durability: Disk"),
        topic("slow", "durability: Disk"),
        topic("lonely", "durability: Disk"),
        group("acker", "acker", ""),
        group("poison", "poison", ""),
        group("lossy", "lossy", ""),
        group("picky", "picky", ""),
        group("nobody", "nobody", ""),
        subscription("acker-orders", "orders", "acker", ""),
        subscription(
            "poison-orders",
            "orders",
            "poison",
            "maxDeliveries: 2, deadLetterTopic: orders-dlq, backoff: {initial: 10ms, max: 10ms}",
        ),
        subscription("lossy-orders", "orders", "lossy", "qos: AtMostOnce"),
        subscription(
            "picky-orders",
            "orders",
            "picky",
            "filter: {headers: {wanted: \"yes\"}}",
        ),
        subscription("acker-happy", "happy", "acker", ""),
        subscription(
            "picky-happy",
            "happy",
            "picky",
            "filter: {headers: {wanted: \"yes\"}}",
        ),
        subscription("nobody-fleeting", "fleeting", "nobody", "ackWait: 1s"),
        subscription("nobody-slow", "slow", "nobody", "ackWait: 1s"),
    ]
    .concat();
    let pods = [
        pod("acker-a", "zone-a", "acker"),
        pod("poison-a", "zone-a", "poison"),
        pod("lossy-a", "zone-a", "lossy"),
        pod("picky-a", "zone-a", "picky"),
        pod("idle-a", "zone-a", "nobody"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    TestMesh::start(&crs, &pods).await
}

/// Publishes `id` to `default/<topic>` over HTTP with ack level delivered; returns the
/// status and the JSON answer.
async fn publish_http(
    mesh: &TestMesh,
    history: &History,
    topic: &str,
    id: &str,
    extra: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let body = format!(
        "{{\"payload\": \"p\", \"message_id\": \"{id}\", \"ack_level\": \"delivered\"{extra}}}"
    );
    history.publish_attempt("producer", &format!("default/{topic}"), id, None);
    let r = ferryctl::http::post_json(
        mesh.mesh.endpoints("producer")?.app_http,
        &format!("/v1/topics/default/{topic}/publish"),
        body,
    )
    .await?;
    let json: serde_json::Value = serde_json::from_slice(&r.body)?;
    if r.status == 200 {
        history.publish_acked(id);
    }
    Ok((r.status, json))
}

/// Each subscription's outcome in an HTTP answer (on success or in its error).
fn outcomes(json: &serde_json::Value) -> BTreeMap<String, String> {
    let list = json
        .get("deliveries")
        .or_else(|| json.get("error").and_then(|e| e.get("deliveries")))
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    list.iter()
        .filter_map(|d| {
            Some((
                d.get("subscription")?.as_str()?.to_owned(),
                d.get("outcome")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(s, o)| (format!("default/{s}"), (*o).to_owned()))
        .collect()
}

/// Publishes `id` over gRPC with ack level delivered; the status code and message.
async fn publish_grpc(
    mesh: &TestMesh,
    history: &History,
    topic: &str,
    id: &str,
    ttl_ms: u64,
    timeout_ms: u64,
) -> anyhow::Result<(tonic::Code, String)> {
    let mut app = mesh.app("producer").await?;
    history.publish_attempt("producer", &format!("default/{topic}"), id, None);
    let r = app
        .publish(PublishRequest {
            topic: format!("default/{topic}"),
            message_id: id.into(),
            payload: b"p".to_vec().into(),
            ack_level: AckLevel::Delivered.into(),
            ttl_ms,
            delivered_timeout_ms: timeout_ms,
            headers: HashMap::new(),
            ..PublishRequest::default()
        })
        .await;
    Ok(match r {
        Ok(_) => {
            history.publish_acked(id);
            (tonic::Code::Ok, String::new())
        }
        Err(s) => (s.code(), s.message().to_owned()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivered_answers_what_happened_per_subscription() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let mut consumers = Vec::new();
    for (pod, member_group, sub, behavior) in [
        ("acker-a", "acker", "acker-orders", Behavior::Ack),
        ("acker-a", "acker", "acker-happy", Behavior::Ack),
        ("poison-a", "poison", "poison-orders", Behavior::Nack(0)),
        ("lossy-a", "lossy", "lossy-orders", Behavior::Nack(0)),
        ("picky-a", "picky", "picky-orders", Behavior::Ack),
        ("picky-a", "picky", "picky-happy", Behavior::Ack),
    ] {
        consumers.push(
            spawn_consumer(
                &mesh.app_addr(pod)?,
                &format!("default/{sub}"),
                member_group,
                pod,
                &history,
                behavior,
                stop_at,
            )
            .await?,
        );
    }

    let mut broken = Vec::new();
    let mut check = |what: &str, ok: bool, got: String| {
        println!("delivered_outcomes: {what}: {got}");
        if !ok {
            broken.push(format!("{what}: {got}"));
        }
    };

    // Mixed outcomes: not every subscription acked.
    let (code, msg) = publish_grpc(&mesh, &history, "orders", "grpc-orders", 0, 20_000).await?;
    check(
        "orders over gRPC is ABORTED naming each outcome",
        code == tonic::Code::Aborted
            && ["acked", "dead-lettered", "dropped", "filtered"]
                .iter()
                .all(|w| msg.to_lowercase().contains(w)),
        format!("{code:?} {msg:?}"),
    );
    let (status, json) = publish_http(&mesh, &history, "orders", "http-orders", "").await?;
    let want = expect(&[
        ("acker-orders", "ACKED"),
        ("poison-orders", "DEAD_LETTERED"),
        ("lossy-orders", "DROPPED"),
        ("picky-orders", "FILTERED"),
    ]);
    check(
        "orders over HTTP is 409 with each subscription's outcome",
        status == 409 && outcomes(&json) == want,
        format!("{status} {json}"),
    );

    // Delivered to every subscription it was for (the other filters it out): success.
    let (code, msg) = publish_grpc(&mesh, &history, "happy", "grpc-happy", 0, 20_000).await?;
    check(
        "happy over gRPC is OK",
        code == tonic::Code::Ok,
        format!("{code:?} {msg:?}"),
    );
    let (status, json) = publish_http(&mesh, &history, "happy", "http-happy", "").await?;
    check(
        "happy over HTTP is 200, ACKED and FILTERED",
        status == 200
            && outcomes(&json) == expect(&[("acker-happy", "ACKED"), ("picky-happy", "FILTERED")]),
        format!("{status} {json}"),
    );

    // No member before the TTL passed: expired.
    let (code, msg) =
        publish_grpc(&mesh, &history, "fleeting", "grpc-fleeting", 300, 20_000).await?;
    check(
        "fleeting over gRPC is ABORTED, expired",
        code == tonic::Code::Aborted && msg.to_lowercase().contains("expired"),
        format!("{code:?} {msg:?}"),
    );
    let (status, json) = publish_http(
        &mesh,
        &history,
        "fleeting",
        "http-fleeting",
        ", \"ttl_ms\": 300",
    )
    .await?;
    check(
        "fleeting over HTTP is 409, EXPIRED",
        status == 409 && outcomes(&json) == expect(&[("nobody-fleeting", "EXPIRED")]),
        format!("{status} {json}"),
    );

    // No member and no TTL: the wait times out.
    let (code, msg) = publish_grpc(&mesh, &history, "slow", "grpc-slow", 0, 500).await?;
    check(
        "slow over gRPC is DEADLINE_EXCEEDED naming the subscription",
        code == tonic::Code::DeadlineExceeded && msg.contains("default/nobody-slow"),
        format!("{code:?} {msg:?}"),
    );
    let (status, json) = publish_http(
        &mesh,
        &history,
        "slow",
        "http-slow",
        ", \"delivered_timeout_ms\": 500",
    )
    .await?;
    check(
        "slow over HTTP is 504, TIMED_OUT",
        status == 504 && outcomes(&json) == expect(&[("nobody-slow", "TIMED_OUT")]),
        format!("{status} {json}"),
    );

    // No subscription at all: nothing can be delivered.
    let (code, msg) = publish_grpc(&mesh, &history, "lonely", "grpc-lonely", 0, 20_000).await?;
    check(
        "lonely over gRPC is FAILED_PRECONDITION, no subscription",
        code == tonic::Code::FailedPrecondition && msg.contains("no subscription"),
        format!("{code:?} {msg:?}"),
    );
    let (status, json) = publish_http(&mesh, &history, "lonely", "http-lonely", "").await?;
    check(
        "lonely over HTTP is 412 with no outcome",
        status == 412 && outcomes(&json).is_empty(),
        format!("{status} {json}"),
    );

    let counts = history.check(&[Expect::AnyMember {
        group: "acker".into(),
        topic: "default/happy".into(),
        check_order: false,
    }]);
    println!("delivered_outcomes: history {counts}");
    drop(consumers);
    anyhow::ensure!(broken.is_empty(), "{}", broken.join("\n"));
    Ok(())
}
