//! `ACK_LEVEL_NONE`: the publisher hears back before the store does, and what it published
//! is stored (and copied to replicas) behind its back. At most `--max-unconfirmed-publishes`
//! such messages are on their way at once; past that, a publish with that level waits for
//! its store like `ACK_LEVEL_STORED` (backpressure, as a Kafka producer with `acks=0` blocks
//! once its buffer is full), so that a publisher faster than the disk cannot queue without
//! bound in the store's command channel.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::Engine;
use super::stored::{Copies, StoreReply};
use crate::metrics::Metrics;
use crate::store::AppendOutcome;

impl Engine {
    /// Permits for `n` unconfirmed messages, or `None` (counted) when that many would pass
    /// the bound: the caller then waits for the store.
    pub(super) fn unconfirmed_permit(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let permit = u32::try_from(n)
            .ok()
            .and_then(|k| self.unconfirmed.clone().try_acquire_many_owned(k).ok());
        if permit.is_some() {
            self.metrics.unconfirmed_publishes.inc_by(n as i64);
        } else {
            self.metrics.unconfirmed_publishes_waited.inc_by(n as u64);
        }
        permit
    }

    /// Waits for the store's answer behind the publisher's back, then makes the copies of
    /// what was stored (a replica never holds an id this log did not store) and releases
    /// the permits.
    pub(super) fn finish_unconfirmed(
        self: &Arc<Self>,
        topic: &str,
        reply: StoreReply,
        replicated: Copies,
        permit: OwnedSemaphorePermit,
    ) {
        let engine = self.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let n = permit.num_permits();
            match engine.stored_and_copied(&topic, reply, &replicated).await {
                Ok(outcomes) => {
                    let stored = outcomes
                        .iter()
                        .filter(|o| matches!(o, AppendOutcome::Stored(_)))
                        .count();
                    engine
                        .metrics
                        .stored
                        .get_or_create(&Metrics::topic(&topic))
                        .inc_by(stored as u64);
                }
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "unacknowledged publishes not stored or not copied");
                    engine
                        .metrics
                        .publish_errors
                        .get_or_create(&Metrics::topic(&topic))
                        .inc_by(n as u64);
                }
            }
            engine.metrics.unconfirmed_publishes.dec_by(n as i64);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_api::proto::v1::{AckLevel, PublishRequest};
    use ferry_api::routing::RoutingTable;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use crate::config::Config;
    use crate::engine::Engine;
    use crate::routing::fixtures::topic;

    fn none(n: usize) -> Vec<PublishRequest> {
        (0..n)
            .map(|_| PublishRequest {
                topic: "t".into(),
                payload: b"x".to_vec().into(),
                ack_level: AckLevel::None.into(),
                ..PublishRequest::default()
            })
            .collect()
    }

    #[tokio::test]
    async fn past_the_bound_a_none_publish_waits_for_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::local("p", "ns", "z", dir.path().to_owned());
        config.max_unconfirmed_publishes = 4;
        let mut table = RoutingTable::default();
        table.topics.insert("ns/t".into(), topic("ns", "t"));
        let (_tx, routing) = watch::channel(std::sync::Arc::new(table));
        let engine = Engine::new(
            config,
            "127.0.0.1:1".into(),
            routing,
            CancellationToken::new(),
            None,
        );

        // Within the bound: answered at once, stored behind the publisher's back.
        let r = engine.publish(none(3)).await;
        assert!(r.iter().all(|r| r.as_ref().is_ok_and(|p| p.offset == 0)));
        // Five more would pass it: these wait and answer with their offsets.
        let r = engine.publish(none(5)).await;
        let offsets: Vec<u64> = r.into_iter().map(|r| r.unwrap().offset).collect();
        assert_eq!(offsets, [3, 4, 5, 6, 7]);
        assert_eq!(engine.metrics.unconfirmed_publishes_waited.get(), 5);
        // The first three were stored meanwhile: their permits come back.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.metrics.unconfirmed_publishes.get() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "permits never released"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(engine.unconfirmed.available_permits(), 4);
    }
}
