//! Prometheus metrics of the operator (prometheus-client), served on `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Topic`, `ConsumerGroup`, `Subscription`, or `Pod` (a pass of the pod records).
    pub kind: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    /// [`crate::Error::reason`].
    pub reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the operator exports, under the `ferry_operator` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles started, per kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles that failed, per kind and reason.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, per kind.
    pub duration: HistogramFamily<KindLabels>,
    /// Status patches sent (a converged resource sends none).
    pub status_patches: Family<KindLabels, Counter>,
    /// Routing-table keys written or deleted.
    pub etcd_changes: Counter,
    /// Writes refused by the fencing key (a newer leader took over).
    pub fenced_writes: Counter,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// The term of the current (or last) leadership.
    pub term: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry_operator");
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            status_patches: Family::default(),
            etcd_changes: Counter::default(),
            fenced_writes: Counter::default(),
            leader: Gauge::default(),
            term: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles started", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            m.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.duration.clone(),
        );
        registry.register(
            "status_patches",
            "Status patches sent",
            m.status_patches.clone(),
        );
        registry.register(
            "etcd_changes",
            "Routing-table keys written or deleted",
            m.etcd_changes.clone(),
        );
        registry.register(
            "fenced_writes",
            "etcd writes refused because a newer leader claimed the fencing key",
            m.fenced_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            m.leader.clone(),
        );
        registry.register(
            "leader_term",
            "Term of the current or last leadership",
            m.term.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a reconcile of `kind` and returns a timer that records its duration on drop.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer<'_> {
        let labels = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, kind: &str, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encoding the metrics failed");
        }
        out
    }
}

/// Records a reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: KindLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_exposition() {
        let m = Metrics::new();
        drop(m.reconcile_started("Topic"));
        m.error("Topic", "etcd");
        let text = m.encode();
        assert!(
            text.contains("ferry_operator_reconciles_total{kind=\"Topic\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "ferry_operator_reconcile_errors_total{kind=\"Topic\",reason=\"etcd\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("ferry_operator_reconcile_duration_seconds_count{kind=\"Topic\"} 1"),
            "{text}"
        );
    }
}
