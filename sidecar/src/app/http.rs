//! The HTTP/JSON app API (axum), for curl and languages without gRPC:
//!
//! - `POST /v1/topics/{ns}/{topic}/publish`: body `{"payload": "text"}` or
//!   `{"payload_base64": "..."}`, optional `key`, `headers`, `message_id`, `ttl_ms`,
//!   `delay_ms`, `deliver_at_ms`, `ack_level` (`none`, `stored`, `delivered`), `delivered_timeout_ms`;
//!   answers `{"message_id", "offset", "duplicate"}`, and with `ack_level: delivered` each
//!   subscription's outcome, `"deliveries": [{"subscription", "outcome"}]` (`ACKED`,
//!   `FILTERED`, `DEAD_LETTERED`, `DROPPED`, `EXPIRED`, `TIMED_OUT`, `HANDED_OFF`), also in
//!   the error when not every subscription acked (409, 504, or 412 with no subscription).
//! - `POST /v1/subscriptions/{ns}/{sub}/fetch?max=N&wait_ms=M`: up to `N` (default 10, at
//!   most 1000) deliveries, waiting up to `M` ms (default 1000, at most 30000) for the
//!   first; unacked ones are redelivered after the subscription's ackWait.
//! - `POST /v1/deliveries/{id}/ack`, `POST /v1/deliveries/{id}/nack` (body optional:
//!   `{"delay_ms": N}`).
//!
//! Errors are `{"error": {"code": "NOT_FOUND", "message": "..."}}` with the status that
//! `error.rs` assigns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use ferry_api::proto::v1::{
    AckLevel, Delivery, DeliveryOutcome, PublishRequest, SubscriptionOutcome,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::Engine;
use crate::error::Error;

/// Largest HTTP body: a maximal payload in base64 plus the JSON around it.
pub const HTTP_MAX_BODY: usize = (4 << 20) * 4 / 3 + (64 << 10);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut error = json!({"code": code_name(self.code()), "message": self.to_string()});
        if let Error::NotDelivered { deliveries, .. } = &self {
            error["deliveries"] = deliveries_json(deliveries);
        }
        (self.http_status(), Json(json!({ "error": error }))).into_response()
    }
}

/// Each subscription's outcome as `[{"subscription": "ns/name", "outcome": "ACKED"}]`.
fn deliveries_json(list: &[SubscriptionOutcome]) -> serde_json::Value {
    list.iter()
        .map(|d| {
            let name = DeliveryOutcome::try_from(d.outcome)
                .unwrap_or(DeliveryOutcome::Unspecified)
                .as_str_name();
            let name = name.strip_prefix("DELIVERY_OUTCOME_").unwrap_or(name);
            json!({"subscription": d.subscription, "outcome": name})
        })
        .collect()
}

/// The gRPC name of a code (`NOT_FOUND`), so both APIs spell errors alike.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    payload: Option<String>,
    payload_base64: Option<String>,
    key: Option<String>,
    #[serde(default)]
    headers: HashMap<String, String>,
    message_id: Option<String>,
    #[serde(default)]
    ttl_ms: u64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    deliver_at_ms: u64,
    ack_level: Option<String>,
    #[serde(default)]
    delivered_timeout_ms: u64,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct NackBody {
    #[serde(default)]
    delay_ms: u64,
}

#[derive(Deserialize, Debug)]
struct FetchQuery {
    max: Option<u32>,
    wait_ms: Option<u64>,
}

#[derive(Serialize, Debug)]
struct HttpDelivery {
    delivery_id: String,
    message_id: String,
    topic: String,
    subscription: String,
    key: Option<String>,
    headers: HashMap<String, String>,
    /// The payload as text when it is valid UTF-8.
    payload: Option<String>,
    payload_base64: String,
    publish_time_ms: u64,
    attempt: u32,
    key_sequence: u64,
    producer: String,
}

impl From<Delivery> for HttpDelivery {
    fn from(d: Delivery) -> Self {
        Self {
            payload: std::str::from_utf8(&d.payload).ok().map(str::to_owned),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&d.payload),
            delivery_id: d.delivery_id,
            message_id: d.message_id,
            topic: d.topic,
            subscription: d.subscription,
            key: d.key,
            headers: d.headers,
            publish_time_ms: d.publish_time_ms,
            attempt: d.attempt,
            key_sequence: d.key_sequence,
            producer: d.producer,
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Error::BadRequest(format!(
            "request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

/// The HTTP app API router.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/topics/{ns}/{topic}/publish", post(publish))
        .route("/v1/subscriptions/{ns}/{sub}/fetch", post(fetch))
        .route("/v1/deliveries/{id}/ack", post(ack))
        .route("/v1/deliveries/{id}/nack", post(nack))
        .with_state(engine)
}

async fn publish(
    State(engine): State<Arc<Engine>>,
    Path((ns, topic)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Error> {
    let b: PublishBody = parse_json(&body)?;
    let payload = match (b.payload, b.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(Error::BadRequest(
                "give either payload or payload_base64, not both".into(),
            ));
        }
        (Some(p), None) => Bytes::from(p),
        (None, Some(p)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(p.as_bytes())
                .map_err(|e| Error::BadRequest(format!("payload_base64: {e}")))?,
        ),
        (None, None) => Bytes::new(),
    };
    let ack_level = match b
        .ack_level
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("stored") => AckLevel::Stored,
        Some("none") => AckLevel::None,
        Some("delivered") => AckLevel::Delivered,
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "ack_level {other:?}: expected none, stored or delivered"
            )));
        }
    };
    let req = PublishRequest {
        topic: format!("{ns}/{topic}"),
        message_id: b.message_id.unwrap_or_default(),
        key: b.key,
        headers: b.headers,
        payload,
        ttl_ms: b.ttl_ms,
        delay_ms: b.delay_ms,
        deliver_at_ms: b.deliver_at_ms,
        ack_level: ack_level as i32,
        delivered_timeout_ms: b.delivered_timeout_ms,
    };
    let r = engine
        .publish(vec![req])
        .await
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("no publish result".into())))?;
    let mut answer =
        json!({"message_id": r.message_id, "offset": r.offset, "duplicate": r.duplicate});
    if ack_level == AckLevel::Delivered && !r.duplicate {
        answer["deliveries"] = deliveries_json(&r.deliveries);
    }
    Ok(Json(answer).into_response())
}

async fn fetch(
    State(engine): State<Arc<Engine>>,
    Path((ns, sub)): Path<(String, String)>,
    Query(q): Query<FetchQuery>,
) -> Result<Response, Error> {
    let max = u64::from(q.max.unwrap_or(10).clamp(1, 1000));
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(1000).min(30_000));
    let (session, mut rx) = engine
        .consumer
        .open_session(&format!("{ns}/{sub}"), max, false)?;
    let mut out = Vec::new();
    if let Ok(Some(d)) = tokio::time::timeout(wait, rx.recv()).await {
        out.push(d);
    }
    drop(session);
    // Whatever was handed before the session closed belongs to this answer.
    while let Ok(d) = rx.try_recv() {
        out.push(d);
    }
    let deliveries: Vec<HttpDelivery> = out.into_iter().map(HttpDelivery::from).collect();
    Ok(Json(json!({ "deliveries": deliveries })).into_response())
}

async fn ack(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Result<Response, Error> {
    engine.consumer.settle(&id, None)?;
    Ok((StatusCode::OK, Json(json!({})).into_response()).into_response())
}

async fn nack(
    State(engine): State<Arc<Engine>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    let b: NackBody = parse_json(&body)?;
    engine.consumer.settle(&id, Some(b.delay_ms))?;
    Ok(Json(json!({})).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_names_match_grpc() {
        assert_eq!(super::code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            super::code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(super::code_name(tonic::Code::Internal), "INTERNAL");
    }
}
