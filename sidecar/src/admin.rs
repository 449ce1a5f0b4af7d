//! The admin port: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (listeners bound, routing table loaded, not draining, no topic log poisoned
//! by a failed fsync).
//!
//! With the etcd routing source, `/readyz` adds a line about etcd and stays ready during
//! an etcd outage once a table was loaded (see [`SourceStatus::readiness`] for why).

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
use crate::routing::etcd::SourceStatus;

#[derive(Debug, Clone)]
struct AdminState {
    engine: Arc<Engine>,
    ready: Arc<AtomicBool>,
    routing: Option<Arc<SourceStatus>>,
    /// Serialises the copy of source counters into metrics between concurrent scrapes.
    refresh: Arc<std::sync::Mutex<()>>,
}

/// The admin router; `ready` turns true once the sidecar serves.
pub fn router(engine: Arc<Engine>, ready: Arc<AtomicBool>) -> Router {
    router_with_routing(engine, ready, None)
}

/// [`router`] that also reports the etcd routing source's `status`.
pub fn router_with_routing(
    engine: Arc<Engine>,
    ready: Arc<AtomicBool>,
    routing: Option<Arc<SourceStatus>>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            engine,
            ready,
            routing,
            refresh: Arc::default(),
        })
}

/// Copies the routing source's state into metrics (called before each scrape). Without
/// an etcd source (file or static table) the source counts as connected.
pub fn refresh_routing(engine: &Engine, status: Option<&SourceStatus>) {
    let m = &engine.metrics;
    m.routing_revision.set(engine.table().revision);
    let Some(status) = status else {
        m.routing_source_connected.set(1);
        return;
    };
    m.routing_source_connected
        .set(i64::from(status.connected()));
    for (counter, value) in [
        (&m.routing_relists, status.relists()),
        (&m.routing_bad_values, status.bad_values()),
    ] {
        let seen = counter.get();
        if value > seen {
            counter.inc_by(value - seen);
        }
    }
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
        engine
            .metrics
            .log_poisoned
            .get_or_create(&labels)
            .set(i64::from(store.stats.poisoned()));
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
    {
        let _one = s
            .refresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refresh_routing(&s.engine, s.routing.as_deref());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.engine.metrics.encode(),
    )
}

/// Why the sidecar is not ready when a topic's log is poisoned: it takes no publish and
/// cannot read that topic's backlog, so the pod should leave the groups' members and its
/// operator should look at the disk and restart it.
fn poisoned_logs(engine: &Engine) -> Option<String> {
    let topics: Vec<String> = engine
        .open_stores()
        .into_iter()
        .filter(|s| s.stats.poisoned())
        .map(|s| s.topic.clone())
        .collect();
    (!topics.is_empty()).then(|| {
        format!(
            "log poisoned by a failed fsync: {}\ncheck the disk (dmesg, free space), then restart the sidecar to recover its backlog\n",
            topics.join(", ")
        )
    })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned())
    } else if s.engine.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned())
    } else if let Some(why) = poisoned_logs(&s.engine) {
        (StatusCode::SERVICE_UNAVAILABLE, why)
    } else {
        let (routing_ok, routing) = match &s.routing {
            Some(routing) => {
                let (ok, why) = routing.readiness();
                (ok, format!("{why}\n"))
            }
            None => (true, String::new()),
        };
        let (zone_ok, zone) = s.engine.placement.readiness();
        if routing_ok && zone_ok {
            (StatusCode::OK, format!("ready\n{routing}{zone}\n"))
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{routing}{zone}\n"),
            )
        }
    }
}
