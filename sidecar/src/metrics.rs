//! Prometheus metrics of one sidecar (served by `admin.rs`).
//!
//! Hot paths increment by whole batches and keep cloned metric handles (an `Arc` of an
//! atomic) instead of looking a label set up per message.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-topic metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

/// Labels of refused peer calls: which RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: String,
}

/// Labels of per-subscription metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubLabels {
    pub topic: String,
    pub subscription: String,
}

/// Labels of `ferry_sidecar_zone`: where this sidecar runs (`crate::placement`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZoneLabels {
    pub zone: String,
    pub node: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages accepted by the app API (before storage).
    pub published: Family<TopicLabels, Counter>,
    /// Messages stored with the topic's durability met.
    pub stored: Family<TopicLabels, Counter>,
    /// Publishes refused (unknown topic, too large, backlog full, ...).
    pub publish_errors: Family<TopicLabels, Counter>,
    /// Deliveries sent by this producer to a member (first attempts and redeliveries).
    pub forwarded: Family<SubLabels, Counter>,
    /// Deliveries handed to this sidecar's app.
    pub delivered: Family<SubLabels, Counter>,
    /// Messages settled as acked by the consuming app (producer side).
    pub acked: Family<SubLabels, Counter>,
    /// Redeliveries (after nack, ack timeout or a lost peer).
    pub redelivered: Family<SubLabels, Counter>,
    /// Settlements ignored by this producer because they named another message or another
    /// incarnation than the delivery it holds in flight at that offset and attempt (a
    /// consumer answering for a message that held the offset before a restart).
    pub settlements_mismatched: Family<SubLabels, Counter>,
    pub dead_lettered: Family<SubLabels, Counter>,
    /// Messages given up without a dead-letter topic, expired by TTL, or dropped by a
    /// `Memory` topic's retention.
    pub dropped: Family<SubLabels, Counter>,
    /// Messages whose TTL or `retention.maxAge` passed before they were delivered; each is
    /// also counted as dead-lettered or dropped, whichever the subscription's
    /// `deadLetterTopic` made of it.
    pub expired: Family<SubLabels, Counter>,
    /// Bytes not yet settled by every subscription, per topic.
    pub backlog_bytes: Family<TopicLabels, Gauge>,
    /// 1 while the topic's log is poisoned by a failed fsync (until the sidecar restarts).
    pub log_poisoned: Family<TopicLabels, Gauge>,
    /// Age of the oldest unsettled message per subscription.
    pub oldest_age_seconds: Family<SubLabels, Gauge<f64, AtomicU64>>,
    /// Messages a dispatcher parked outside its window (delayed, backing off, waiting for
    /// a member that is down, or behind the held messages of their key).
    pub parked: Family<SubLabels, Gauge>,
    /// From publish to the consuming app's ack, as the producer sees it.
    pub publish_to_ack_seconds: HistogramFamily<SubLabels>,
    /// fsyncs of each topic's log (group commit makes this far lower than messages).
    pub fsyncs: Family<TopicLabels, Counter>,
    /// Publish dedup ids forgotten before their `dedupWindow` ended (`--dedup-max-ids`).
    pub dedup_evicted: Family<TopicLabels, Counter>,
    /// Messages whose copies `replicas - 1` replicas fsynced (producer side).
    pub replicated: Family<TopicLabels, Counter>,
    /// Messages handed to a peer on SIGTERM.
    pub handed_off: Family<TopicLabels, Counter>,
    /// Replicated copies this sidecar took custody of from a producer that was gone.
    pub taken_over: Family<TopicLabels, Counter>,
    /// Copies held here as a replica that one subscription settled (per-subscription
    /// trims applied): a takeover does not deliver them to that subscription.
    pub replica_settled: Family<TopicLabels, Counter>,
    /// `Replicate` calls refused because the copies would pass the topic's retention.
    pub replica_full: Family<TopicLabels, Counter>,
    /// Messages a restarted producer took back from its replicas.
    pub relearned: Family<TopicLabels, Counter>,
    /// 1 while the routing source can be read (a live etcd watch; always 1 for a file or
    /// static source), 0 while the sidecar routes with its last table.
    pub routing_source_connected: Gauge,
    /// Revision of the routing table in force.
    pub routing_revision: Gauge,
    /// Times the etcd source listed the table again (after a compaction or a cancel).
    pub routing_relists: Counter,
    /// Routing-table keys or values skipped because they did not decode.
    pub routing_bad_values: Counter,
    /// Ordered topics: keys whose last `key_sequence` is remembered (`--ordered-max-keys`).
    pub ordered_keys: Family<TopicLabels, Gauge>,
    /// Ordered topics: keys forgotten beyond `--ordered-max-keys`.
    pub ordered_keys_evicted: Family<TopicLabels, Counter>,
    /// Open links (streams with their reconnect loop) to other sidecars.
    pub peer_links: Gauge,
    /// Links closed because their sidecar left the routing table.
    pub peer_links_closed: Counter,
    /// Peer connections refused: failed TLS handshake (no, expired, foreign or unusable
    /// certificate) or none within the deadline.
    pub peer_refused: Counter,
    /// Reloads or renewals of the workload certificate that failed (the previous pair
    /// stays in use).
    pub tls_reload_failed: Counter,
    /// Workload certificates renewed by the operator's identity service.
    pub certificate_renewals: Counter,
    /// Peer calls (or single deliveries of a `Forward`) refused by authorization.
    pub peer_denied: Family<RpcLabels, Counter>,
    /// Trims (settled ids) queued for replicas that did not take them yet.
    pub pending_trims: Gauge,
    /// Trims dropped: their replica left the routing table, or too many were queued.
    pub trims_dropped: Counter,
    /// `ExactlyOnce`: acked message ids remembered per subscription.
    pub exactly_once_ids: Family<SubLabels, Gauge>,
    /// `ExactlyOnce`: acked ids forgotten before their window ended (`--dedup-max-ids`).
    pub exactly_once_evicted: Family<SubLabels, Counter>,
    /// `ACK_LEVEL_NONE` publishes answered and not yet stored.
    pub unconfirmed_publishes: Gauge,
    /// `ACK_LEVEL_NONE` publishes that waited for the store (`--max-unconfirmed-publishes`).
    pub unconfirmed_publishes_waited: Counter,
    /// 1 for the zone and node this sidecar routes by (one series, the current one).
    pub zone: Family<ZoneLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `ferry_sidecar` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry_sidecar");
        let m = Self {
            published: Family::default(),
            stored: Family::default(),
            publish_errors: Family::default(),
            forwarded: Family::default(),
            delivered: Family::default(),
            acked: Family::default(),
            redelivered: Family::default(),
            settlements_mismatched: Family::default(),
            dead_lettered: Family::default(),
            dropped: Family::default(),
            expired: Family::default(),
            backlog_bytes: Family::default(),
            log_poisoned: Family::default(),
            oldest_age_seconds: Family::default(),
            parked: Family::default(),
            publish_to_ack_seconds: Family::new_with_constructor(latency_histogram),
            fsyncs: Family::default(),
            dedup_evicted: Family::default(),
            replicated: Family::default(),
            handed_off: Family::default(),
            taken_over: Family::default(),
            replica_settled: Family::default(),
            replica_full: Family::default(),
            relearned: Family::default(),
            routing_source_connected: Gauge::default(),
            routing_revision: Gauge::default(),
            routing_relists: Counter::default(),
            routing_bad_values: Counter::default(),
            ordered_keys: Family::default(),
            ordered_keys_evicted: Family::default(),
            peer_links: Gauge::default(),
            peer_links_closed: Counter::default(),
            peer_refused: Counter::default(),
            tls_reload_failed: Counter::default(),
            certificate_renewals: Counter::default(),
            peer_denied: Family::default(),
            pending_trims: Gauge::default(),
            trims_dropped: Counter::default(),
            exactly_once_ids: Family::default(),
            exactly_once_evicted: Family::default(),
            unconfirmed_publishes: Gauge::default(),
            unconfirmed_publishes_waited: Counter::default(),
            zone: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "zone",
            "1 for the zone and node this sidecar routes by: its pod record's in a cluster, --zone in local mode; an empty zone prefers none",
            m.zone.clone(),
        );
        registry.register(
            "published",
            "Messages accepted for publishing",
            m.published.clone(),
        );
        registry.register(
            "stored",
            "Messages stored with the topic's durability met",
            m.stored.clone(),
        );
        registry.register(
            "publish_errors",
            "Publishes refused",
            m.publish_errors.clone(),
        );
        registry.register(
            "forwarded",
            "Deliveries sent to a member",
            m.forwarded.clone(),
        );
        registry.register(
            "delivered",
            "Deliveries handed to this sidecar's app",
            m.delivered.clone(),
        );
        registry.register(
            "acked",
            "Messages acked by the consuming app",
            m.acked.clone(),
        );
        registry.register("redelivered", "Redeliveries", m.redelivered.clone());
        registry.register(
            "settlements_mismatched",
            "Settlements ignored because they named another message or producer incarnation",
            m.settlements_mismatched.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to a dead-letter topic",
            m.dead_lettered.clone(),
        );
        registry.register(
            "dropped",
            "Messages given up without a dead-letter topic",
            m.dropped.clone(),
        );
        registry.register(
            "expired",
            "Messages whose TTL or retention.maxAge passed before delivery",
            m.expired.clone(),
        );
        registry.register(
            "backlog_bytes",
            "Bytes of the records some subscription has not settled (record by record)",
            m.backlog_bytes.clone(),
        );
        registry.register(
            "log_poisoned",
            "1 while the topic's log refuses everything after a failed fsync; restart the sidecar",
            m.log_poisoned.clone(),
        );
        registry.register(
            "oldest_age_seconds",
            "Age of the oldest unsettled message",
            m.oldest_age_seconds.clone(),
        );
        registry.register(
            "parked_messages",
            "Messages held outside the delivery window: delayed, backing off, waiting for a member that is down, or queued behind their key",
            m.parked.clone(),
        );
        registry.register(
            "publish_to_ack_seconds",
            "Time from publish to the consuming app's ack",
            m.publish_to_ack_seconds.clone(),
        );
        registry.register("fsyncs", "fsyncs of the topic's log", m.fsyncs.clone());
        registry.register(
            "dedup_evicted",
            "publish dedup ids forgotten before their window ended (--dedup-max-ids)",
            m.dedup_evicted.clone(),
        );
        registry.register(
            "replicated",
            "Messages fsynced by replicas - 1 replicas before the ack",
            m.replicated.clone(),
        );
        registry.register(
            "handed_off",
            "Undelivered messages handed to a peer on SIGTERM",
            m.handed_off.clone(),
        );
        registry.register(
            "taken_over",
            "Replicated copies taken into custody from a producer that was gone",
            m.taken_over.clone(),
        );
        registry.register(
            "replica_settled",
            "Copies held as a replica that one subscription settled (a takeover does not deliver them to it)",
            m.replica_settled.clone(),
        );
        registry.register(
            "replica_full",
            "Replicate calls refused: the producer's copies here would pass the topic's retention.maxBytes",
            m.replica_full.clone(),
        );
        registry.register(
            "relearned",
            "Messages a restarted producer took back from its replicas",
            m.relearned.clone(),
        );
        registry.register(
            "routing_source_connected",
            "1 while the routing source is reachable, 0 while routing with the last table",
            m.routing_source_connected.clone(),
        );
        registry.register(
            "routing_revision",
            "Revision of the routing table in force",
            m.routing_revision.clone(),
        );
        registry.register(
            "routing_relists",
            "Times the routing table was listed again from etcd",
            m.routing_relists.clone(),
        );
        registry.register(
            "routing_bad_values",
            "Routing-table entries skipped because they did not decode",
            m.routing_bad_values.clone(),
        );
        m.register_bounds(&mut registry);
        Self { registry, ..m }
    }

    /// The sizes of what is bounded on a long-lived sidecar, and what the bounds evicted.
    fn register_bounds(&self, registry: &mut Registry) {
        registry.register(
            "ordered_keys",
            "Keys of an ordered topic whose last key_sequence is remembered",
            self.ordered_keys.clone(),
        );
        registry.register(
            "ordered_keys_evicted",
            "Keys of an ordered topic forgotten beyond --ordered-max-keys",
            self.ordered_keys_evicted.clone(),
        );
        registry.register(
            "peer_links",
            "Open links to other sidecars",
            self.peer_links.clone(),
        );
        registry.register(
            "peer_links_closed",
            "Links closed because their sidecar left the routing table",
            self.peer_links_closed.clone(),
        );
        registry.register(
            "peer_refused",
            "Peer connections refused at the TLS handshake",
            self.peer_refused.clone(),
        );
        registry.register(
            "peer_denied",
            "Peer calls, or deliveries of a Forward, refused by authorization",
            self.peer_denied.clone(),
        );
        registry.register(
            "tls_reload_failed",
            "Reloads or renewals of the workload certificate that failed; the previous pair stays in use",
            self.tls_reload_failed.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Workload certificates renewed by the operator's identity service",
            self.certificate_renewals.clone(),
        );
        registry.register(
            "pending_trims",
            "Settled ids queued for replicas that did not take them yet",
            self.pending_trims.clone(),
        );
        registry.register(
            "trims_dropped",
            "Settled ids no longer sent: their replica left, or too many were queued",
            self.trims_dropped.clone(),
        );
        registry.register(
            "exactly_once_ids",
            "ExactlyOnce acked message ids remembered",
            self.exactly_once_ids.clone(),
        );
        registry.register(
            "exactly_once_evicted",
            "ExactlyOnce acked ids forgotten before their window ended (--dedup-max-ids)",
            self.exactly_once_evicted.clone(),
        );
        registry.register(
            "unconfirmed_publishes",
            "ACK_LEVEL_NONE publishes answered and not yet stored",
            self.unconfirmed_publishes.clone(),
        );
        registry.register(
            "unconfirmed_publishes_waited",
            "ACK_LEVEL_NONE publishes that waited for the store (--max-unconfirmed-publishes)",
            self.unconfirmed_publishes_waited.clone(),
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Counts one peer call (or delivery) of `rpc` refused by authorization.
    pub fn denied(&self, rpc: &str) {
        self.peer_denied
            .get_or_create(&RpcLabels { rpc: rpc.into() })
            .inc();
    }

    /// Per-topic labels.
    pub fn topic(topic: &str) -> TopicLabels {
        TopicLabels {
            topic: topic.to_owned(),
        }
    }

    /// Per-subscription labels.
    pub fn sub(topic: &str, subscription: &str) -> SubLabels {
        SubLabels {
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
        }
    }
}
