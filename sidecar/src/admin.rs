//! The admin port: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (listeners bound, routing table loaded, not draining).

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::engine::Engine;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct AdminState {
    engine: Arc<Engine>,
    ready: Arc<AtomicBool>,
}

/// The admin router; `ready` turns true once the sidecar serves.
pub fn router(engine: Arc<Engine>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { engine, ready })
}

/// Copies store counters into gauges (called before each scrape).
pub fn refresh_gauges(engine: &Engine) {
    for store in engine.open_stores() {
        let labels = Metrics::topic(&store.topic);
        let backlog = i64::try_from(store.stats.backlog()).unwrap_or(i64::MAX);
        engine
            .metrics
            .backlog_bytes
            .get_or_create(&labels)
            .set(backlog);
        let dropped = store.stats.dropped.load(AtomicOrdering::Relaxed);
        let sub = Metrics::sub(&store.topic, "");
        let counter = engine.metrics.dropped.get_or_create(&sub).clone();
        let seen = counter.get();
        if dropped > seen {
            counter.inc_by(dropped - seen);
        }
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    refresh_gauges(&s.engine);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.engine.metrics.encode(),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else if s.engine.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
