//! Retry policy: backoff between redeliveries and the dead-letter message.

use std::time::Duration;

use ferry_api::routing::SubscriptionEntry;

use crate::log::StoredMessage;

/// Header naming why a message was dead-lettered.
pub const DLQ_REASON: &str = "ferry-dlq-reason";
/// Header with the attempt history: `attempt@pod:outcome` separated by `;`.
pub const DLQ_ATTEMPTS: &str = "ferry-dlq-attempts";
/// Header with the topic the message came from (`namespace/name`).
pub const DLQ_SOURCE_TOPIC: &str = "ferry-dlq-source-topic";
/// Header with the subscription that gave up (`namespace/name`).
pub const DLQ_SUBSCRIPTION: &str = "ferry-dlq-subscription";
/// Header with the original message id (the dead letter gets its own id).
pub const DLQ_MESSAGE_ID: &str = "ferry-dlq-message-id";

/// Delay before the redelivery that follows the `failures`-th failed delivery (1-based):
/// `initial * multiplier^(failures-1)`, capped at `max`.
pub fn backoff(initial_ms: u64, max_ms: u64, multiplier: f64, failures: u32) -> Duration {
    let exp = i32::try_from(failures.saturating_sub(1))
        .unwrap_or(i32::MAX)
        .min(64);
    let ms = (initial_ms as f64) * multiplier.max(1.0).powi(exp);
    let capped = if ms.is_finite() {
        ms.min(max_ms as f64)
    } else {
        max_ms as f64
    };
    Duration::from_millis(capped.max(0.0) as u64)
}

/// The subscription's backoff after `failures` failed deliveries.
pub fn backoff_for(sub: &SubscriptionEntry, failures: u32) -> Duration {
    backoff(
        sub.backoff_initial_ms,
        sub.backoff_max_ms,
        sub.backoff_multiplier,
        failures,
    )
}

/// The message published to the dead-letter topic. Its id is derived from the original id
/// and the subscription, so a retry after a crash is deduplicated by the dead-letter topic
/// instead of stored twice.
pub fn dead_letter(
    original: &StoredMessage,
    source_topic: &str,
    subscription: &str,
    reason: &str,
    history: &[String],
    now_ms: u64,
) -> StoredMessage {
    let mut headers: Vec<(String, String)> = original
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("ferry-dlq-"))
        .cloned()
        .collect();
    headers.push((DLQ_REASON.into(), reason.into()));
    headers.push((DLQ_ATTEMPTS.into(), history.join(";")));
    headers.push((DLQ_SOURCE_TOPIC.into(), source_topic.into()));
    headers.push((DLQ_SUBSCRIPTION.into(), subscription.into()));
    headers.push((DLQ_MESSAGE_ID.into(), original.id.clone()));
    StoredMessage {
        id: format!("{}@{subscription}", original.id),
        key: original.key.clone(),
        headers,
        payload: original.payload.clone(),
        publish_time_ms: now_ms,
        key_sequence: 0,
        ttl_ms: 0,
        delay_ms: 0,
    }
}

/// Whether `message` passes the subscription's filter (key prefix and exact headers).
pub fn matches_filter(sub: &SubscriptionEntry, message: &StoredMessage) -> bool {
    if let Some(prefix) = &sub.filter_key_prefix
        && !message
            .key
            .as_deref()
            .is_some_and(|k| k.starts_with(prefix.as_str()))
    {
        return false;
    }
    sub.filter_headers
        .iter()
        .all(|(k, v)| message.headers.iter().any(|(hk, hv)| hk == k && hv == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(100, 10_000, 2.0, 1), Duration::from_millis(100));
        assert_eq!(backoff(100, 10_000, 2.0, 2), Duration::from_millis(200));
        assert_eq!(backoff(100, 10_000, 2.0, 4), Duration::from_millis(800));
        assert_eq!(backoff(100, 10_000, 2.0, 20), Duration::from_millis(10_000));
        assert_eq!(
            backoff(100, 10_000, 2.0, u32::MAX),
            Duration::from_millis(10_000)
        );
        assert_eq!(backoff(100, 10_000, 1.0, 7), Duration::from_millis(100));
        assert_eq!(backoff(0, 0, 2.0, 3), Duration::ZERO);
    }

    #[test]
    fn dead_letter_headers() {
        let m = StoredMessage {
            id: "m1".into(),
            key: Some("k".into()),
            headers: vec![("a".into(), "b".into()), (DLQ_REASON.into(), "old".into())],
            payload: bytes::Bytes::from_static(b"x"),
            publish_time_ms: 1,
            key_sequence: 3,
            ttl_ms: 0,
            delay_ms: 0,
        };
        let history = vec!["1@p1:nacked".to_string(), "2@p2:ack timeout".to_string()];
        let d = dead_letter(
            &m,
            "ns/t",
            "ns/s",
            "maxDeliveries (2) reached",
            &history,
            99,
        );
        let h = |k: &str| {
            d.headers
                .iter()
                .find(|(hk, _)| hk == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h(DLQ_REASON), Some("maxDeliveries (2) reached"));
        assert_eq!(h(DLQ_ATTEMPTS), Some("1@p1:nacked;2@p2:ack timeout"));
        assert_eq!(h(DLQ_SOURCE_TOPIC), Some("ns/t"));
        assert_eq!(h(DLQ_SUBSCRIPTION), Some("ns/s"));
        assert_eq!(h(DLQ_MESSAGE_ID), Some("m1"));
        assert_eq!(h("a"), Some("b"));
        assert_eq!(d.headers.iter().filter(|(k, _)| k == DLQ_REASON).count(), 1);
        assert_eq!(d.id, "m1@ns/s");
        assert_eq!(d.payload, m.payload);
    }

    #[test]
    fn filters() {
        let mut sub = crate::routing::tests::subscription("ns", "s", "t", "g");
        let mut m = crate::log::tests::msg(1);
        assert!(matches_filter(&sub, &m));
        sub.filter_key_prefix = Some("eu-".into());
        assert!(!matches_filter(&sub, &m));
        m.key = Some("eu-1".into());
        assert!(matches_filter(&sub, &m));
        sub.filter_headers.insert("h".into(), "v".into());
        assert!(matches_filter(&sub, &m));
        sub.filter_headers.insert("x".into(), "y".into());
        assert!(!matches_filter(&sub, &m));
    }
}
