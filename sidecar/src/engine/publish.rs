//! Publishing: validation (topic, size, allow-list, drain), message ids, the append to the
//! topic's store, and waiting for the ack level the publisher asked for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::crd::Durability;
use ferry_api::proto::v1::{AckLevel, PublishRequest, PublishResponse};
use ferry_api::routing::RoutingTable;
use tokio::sync::watch;

use super::Engine;
use crate::error::Error;
use crate::log::StoredMessage;
use crate::metrics::Metrics;
use crate::routing::{may_publish, qualify};
use crate::store::{AppendItem, AppendOutcome, DeliveryReport};

/// Default wait of ack level `DELIVERED`.
const DELIVERED_TIMEOUT: Duration = Duration::from_secs(30);

/// A valid publish request on its way to its topic's store.
struct Pending {
    index: usize,
    item: AppendItem,
    level: AckLevel,
    timeout: Duration,
    delivered: Option<watch::Receiver<DeliveryReport>>,
}

/// A UUIDv7 message id (time-ordered) whose random part comes from the thread-local
/// user-space generator: `Uuid::now_v7` asks the kernel (`getrandom`) for every id, which
/// was 9 % of the producer's CPU when publishing streamed batches.
fn new_message_id(now_ms: u64) -> String {
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(now_ms, &random)
        .into_uuid()
        .to_string()
}

/// The delay of a publish: `delay_ms`, or until the app's absolute `deliver_at_ms` if that
/// is later. The absolute time is the app's, on the host's wall clock, so it is compared
/// with that clock, once, here; from then on it is a relative delay on the sidecar's
/// monotonic clock (`crate::clock`).
fn publish_delay_ms(r: &PublishRequest) -> u64 {
    match r.deliver_at_ms {
        0 => r.delay_ms,
        at => r
            .delay_ms
            .max(at.saturating_sub(crate::clock::system_wall_ms())),
    }
}

impl Engine {
    /// Publishes a batch from the app; one result per request, in order.
    pub async fn publish(
        self: &Arc<Self>,
        requests: Vec<PublishRequest>,
    ) -> Vec<Result<PublishResponse, Error>> {
        let table = self.table();
        let mut results: Vec<Option<Result<PublishResponse, Error>>> =
            (0..requests.len()).map(|_| None).collect();
        // Valid requests grouped by topic.
        let mut by_topic: HashMap<String, Vec<Pending>> = HashMap::new();
        let now = crate::clock::now_ms();
        // Batches almost always name one topic: qualify it once, not per message.
        let mut last: Option<(String, String)> = None;
        for (i, r) in requests.into_iter().enumerate() {
            if last.as_ref().is_none_or(|(raw, _)| *raw != r.topic) {
                last = Some((r.topic.clone(), qualify(&self.identity.namespace, &r.topic)));
            }
            let Some((_, topic)) = &last else {
                continue;
            };
            let topic = topic.as_str();
            match self.validate(&table, topic, &r) {
                Ok(()) => {}
                Err(e) => {
                    self.metrics
                        .publish_errors
                        .get_or_create(&Metrics::topic(topic))
                        .inc();
                    results[i] = Some(Err(e));
                    continue;
                }
            }
            let level = r.ack_level();
            let (delivered_tx, delivered_rx) = match level {
                AckLevel::Delivered => {
                    let (tx, rx) = watch::channel(DeliveryReport::default());
                    (Some(tx), Some(rx))
                }
                _ => (None, None),
            };
            let timeout = match r.delivered_timeout_ms {
                0 => DELIVERED_TIMEOUT,
                ms => Duration::from_millis(ms),
            };
            let delay_ms = publish_delay_ms(&r);
            let id = if r.message_id.is_empty() {
                new_message_id(now)
            } else {
                r.message_id
            };
            let mut headers: Vec<(String, String)> = r.headers.into_iter().collect();
            headers.sort();
            let message = StoredMessage {
                id,
                key: r.key,
                headers,
                // A copy: the decoded payload is a slice of the request's whole receive
                // buffer (8 KiB or more), which the log's tail and the dispatchers would
                // otherwise keep alive for every small message they hold.
                payload: bytes::Bytes::copy_from_slice(&r.payload),
                publish_time_ms: now,
                key_sequence: 0,
                ttl_ms: r.ttl_ms,
                delay_ms,
            };
            let pending = Pending {
                index: i,
                item: AppendItem {
                    message,
                    delivered: delivered_tx,
                    bypass_dedup: false,
                    settled_by: Vec::new(),
                },
                level,
                timeout,
                delivered: delivered_rx,
            };
            match by_topic.get_mut(topic) {
                Some(items) => items.push(pending),
                None => {
                    by_topic.insert(topic.to_owned(), vec![pending]);
                }
            }
        }
        let mut waits = Vec::new();
        for (topic, items) in by_topic {
            let labels = Metrics::topic(&topic);
            self.metrics
                .published
                .get_or_create(&labels)
                .inc_by(items.len() as u64);
            let store = match self.store(&topic).await {
                Ok(s) => s,
                Err(e) => {
                    let msg = e.to_string();
                    let code = e.code();
                    for p in items {
                        results[p.index] = Some(Err(if code == tonic::Code::NotFound {
                            Error::UnknownTopic(topic.clone())
                        } else {
                            Error::Internal(msg.clone())
                        }));
                    }
                    continue;
                }
            };
            let mut meta = Vec::with_capacity(items.len());
            let mut append = Vec::with_capacity(items.len());
            let replicated = table
                .topics
                .get(&topic)
                .filter(|t| t.durability == Durability::Replicated && t.replicas > 1)
                .map(|t| {
                    (
                        t.clone(),
                        items.iter().map(|p| p.item.message.clone()).collect(),
                    )
                });
            for p in items {
                meta.push((
                    p.index,
                    p.item.message.id.clone(),
                    p.level,
                    p.timeout,
                    p.delivered,
                ));
                append.push(p.item);
            }
            match super::stored::append(&store, append, &replicated) {
                Ok(reply) => waits.push((topic, reply, meta, replicated)),
                Err(e) => {
                    let msg = e.to_string();
                    for (i, ..) in meta {
                        results[i] = Some(Err(Error::Internal(msg.clone())));
                    }
                }
            }
        }
        for (topic, reply, meta, replicated) in waits {
            let all_none = meta.iter().all(|m| m.2 == AckLevel::None);
            let permit = if all_none {
                self.unconfirmed_permit(meta.len())
            } else {
                None
            };
            let (reply, replicated) = match permit {
                None => (reply, replicated),
                Some(permit) => {
                    self.finish_unconfirmed(&topic, reply, replicated, permit);
                    for (i, id, ..) in meta {
                        results[i] = Some(Ok(PublishResponse {
                            message_id: id,
                            offset: 0,
                            duplicate: false,
                            deliveries: Vec::new(),
                        }));
                    }
                    continue;
                }
            };
            let outcome = self.stored_and_copied(&topic, reply, &replicated).await;
            match outcome {
                Ok(outcomes) => {
                    let stored = outcomes
                        .iter()
                        .filter(|o| matches!(o, AppendOutcome::Stored(_)))
                        .count();
                    self.metrics
                        .stored
                        .get_or_create(&Metrics::topic(&topic))
                        .inc_by(stored as u64);
                    for ((i, id, level, timeout, rx), o) in meta.into_iter().zip(outcomes) {
                        let (offset, duplicate) = match o {
                            AppendOutcome::Stored(o) => (o, false),
                            AppendOutcome::Duplicate(o) => (o, true),
                        };
                        let response = PublishResponse {
                            message_id: id,
                            offset,
                            duplicate,
                            deliveries: Vec::new(),
                        };
                        let r = match rx {
                            Some(rx) if level == AckLevel::Delivered && !duplicate => {
                                super::delivered::wait(response, rx, timeout).await
                            }
                            _ => Ok(response),
                        };
                        results[i] = Some(r);
                    }
                }
                Err(e) => {
                    self.metrics
                        .publish_errors
                        .get_or_create(&Metrics::topic(&topic))
                        .inc_by(meta.len() as u64);
                    let msg = e.to_string();
                    let mut first = Some(e);
                    for (i, ..) in meta {
                        results[i] = Some(Err(first
                            .take()
                            .unwrap_or_else(|| Error::Internal(msg.clone()))));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Internal("publish result missing".into()))))
            .collect()
    }

    fn validate(&self, table: &RoutingTable, topic: &str, r: &PublishRequest) -> Result<(), Error> {
        if self.draining() {
            return Err(Error::ShuttingDown("publishes"));
        }
        if r.topic.is_empty() {
            return Err(Error::InvalidArgument("topic must not be empty".into()));
        }
        let entry = table
            .topics
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        if r.payload.len() > entry.max_message_bytes as usize {
            return Err(Error::MessageTooLarge {
                topic: topic.to_owned(),
                size: r.payload.len(),
                limit: entry.max_message_bytes,
            });
        }
        if !may_publish(
            entry,
            &self.identity.namespace,
            &self.identity.service_account,
        ) {
            return Err(Error::PermissionDenied(format!(
                "service account {}/{} may not publish to topic {topic}: not in its allowedPublishers",
                self.identity.namespace, self.identity.service_account
            )));
        }
        if AckLevel::try_from(r.ack_level).is_err() {
            return Err(Error::InvalidArgument(format!(
                "unknown ack_level {}",
                r.ack_level
            )));
        }
        Ok(())
    }

    /// Publishes a message this sidecar produces itself (dead letters), bypassing the
    /// allow-list and the drain, and waits until it is stored.
    pub async fn publish_internal(
        self: &Arc<Self>,
        topic: &str,
        message: StoredMessage,
    ) -> Result<(), Error> {
        let store = self.store(topic).await?;
        let reply = store.append(vec![AppendItem {
            message,
            delivered: None,
            bypass_dedup: false,
            settled_by: Vec::new(),
        }])?;
        reply
            .await
            .map_err(|_| Error::Internal(format!("store of {topic} stopped")))??;
        Ok(())
    }
}
