//! Typed errors of the sidecar and the one place that maps them to gRPC and HTTP statuses,
//! so the same fault gives the same answer on every port (docs/reliability.md row 23).

use axum::http::StatusCode;
use tonic::Code;

use crate::log::LogError;

/// Everything that can go wrong serving a request or running the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown topic {0:?}: it is not in this sidecar's routing table")]
    UnknownTopic(String),
    #[error("unknown subscription {0:?}: it is not in this sidecar's routing table")]
    UnknownSubscription(String),
    #[error("message of {size} bytes exceeds topic {topic:?} maxMessageBytes = {limit}")]
    MessageTooLarge {
        topic: String,
        size: usize,
        limit: u32,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unknown delivery id {0:?}: this sidecar never issued it")]
    UnknownDelivery(String),
    #[error("delivery id {id:?} is no longer valid: {why}")]
    ExpiredDelivery { id: String, why: &'static str },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("backlog full for topic {topic:?}: {limit} (undelivered {current} bytes)")]
    BacklogFull {
        topic: String,
        limit: String,
        current: u64,
    },
    #[error("shutting down: this sidecar no longer accepts {0}")]
    ShuttingDown(&'static str),
    /// A `Replicated` publish whose copies could not all be made durable: the message is
    /// stored here and may still be delivered, but the durability the topic asks for was
    /// not met, so it is not acked (as Kafka's `NOT_ENOUGH_REPLICAS` with acks=all).
    #[error(
        "topic {topic:?} needs {needed} replica(s) besides this sidecar; {reached} answered ({detail})"
    )]
    ReplicasUnavailable {
        topic: String,
        needed: usize,
        reached: usize,
        detail: String,
    },
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout { what: &'static str, ms: u64 },
    /// Ack level `DELIVERED` not met: the message is stored, and `deliveries` says what
    /// each subscription made of it.
    #[error("message {message_id:?} (offset {offset}) {summary}")]
    NotDelivered {
        message_id: String,
        offset: u64,
        kind: NotDelivered,
        summary: String,
        deliveries: Vec<ferry_api::proto::v1::SubscriptionOutcome>,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("log of topic {topic:?} failed: {source}")]
    Log {
        topic: String,
        #[source]
        source: LogError,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("routing source: {0}")]
    Routing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a `DELIVERED` publish was not delivered as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDelivered {
    /// A subscription gave it up (dead-lettered, dropped, expired, handed off): ABORTED.
    GaveUp,
    /// A subscription did not settle it within `delivered_timeout_ms`: DEADLINE_EXCEEDED.
    TimedOut,
    /// No subscription takes it (none at all, or every filter excludes it):
    /// FAILED_PRECONDITION.
    NoReceiver,
}

impl Error {
    /// The per-subscription outcomes an error carries (ack level `DELIVERED`).
    pub fn deliveries(&self) -> &[ferry_api::proto::v1::SubscriptionOutcome] {
        match self {
            Error::NotDelivered { deliveries, .. } => deliveries,
            _ => &[],
        }
    }

    /// The error for a failed log operation on `topic`, keeping "backlog full" distinct.
    pub fn from_log(topic: &str, e: LogError) -> Self {
        match e {
            LogError::BacklogFull { limit, current } => Error::BacklogFull {
                topic: topic.to_owned(),
                limit,
                current,
            },
            source => Error::Log {
                topic: topic.to_owned(),
                source,
            },
        }
    }

    /// The gRPC code for this error: the single source of truth for both APIs.
    pub fn code(&self) -> Code {
        match self {
            Error::UnknownTopic(_)
            | Error::UnknownSubscription(_)
            | Error::UnknownDelivery(_)
            | Error::ExpiredDelivery { .. } => Code::NotFound,
            Error::MessageTooLarge { .. } | Error::InvalidArgument(_) | Error::BadRequest(_) => {
                Code::InvalidArgument
            }
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::BacklogFull { .. } => Code::ResourceExhausted,
            Error::ShuttingDown(_) | Error::ReplicasUnavailable { .. } => Code::Unavailable,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::NotDelivered { kind, .. } => match kind {
                NotDelivered::GaveUp => Code::Aborted,
                NotDelivered::TimedOut => Code::DeadlineExceeded,
                NotDelivered::NoReceiver => Code::FailedPrecondition,
            },
            Error::Log { source, .. } => match source {
                LogError::RecordTooLarge { .. } => Code::InvalidArgument,
                LogError::BacklogFull { .. } => Code::ResourceExhausted,
                // The data dir's disk (or quota) is full: nothing was acked, and the write
                // was cut back; publishing works again once space is freed.
                LogError::Io { source, .. }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                    ) =>
                {
                    Code::ResourceExhausted
                }
                _ => Code::Internal,
            },
            Error::Internal(_) | Error::Config(_) | Error::Routing(_) | Error::Io { .. } => {
                Code::Internal
            }
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BadRequest(_) | Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::BacklogFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::ShuttingDown(_) | Error::ReplicasUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => match self.code() {
                Code::NotFound => StatusCode::NOT_FOUND,
                Code::InvalidArgument => StatusCode::BAD_REQUEST,
                Code::PermissionDenied => StatusCode::FORBIDDEN,
                Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                Code::Aborted => StatusCode::CONFLICT,
                Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// The `Error` message of the app proto for a per-item failure on a stream.
pub fn to_proto(e: &Error) -> ferry_api::proto::v1::Error {
    ferry_api::proto::v1::Error {
        code: e.code() as i32,
        message: e.to_string(),
        deliveries: e.deliveries().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_documented_status() {
        let cases: Vec<(Error, Code, u16)> = vec![
            (Error::UnknownTopic("a/b".into()), Code::NotFound, 404),
            (
                Error::MessageTooLarge {
                    topic: "a/b".into(),
                    size: 10,
                    limit: 5,
                },
                Code::InvalidArgument,
                413,
            ),
            (Error::UnknownDelivery("x".into()), Code::NotFound, 404),
            (
                Error::ExpiredDelivery {
                    id: "x".into(),
                    why: "expired",
                },
                Code::NotFound,
                404,
            ),
            (
                Error::PermissionDenied("no".into()),
                Code::PermissionDenied,
                403,
            ),
            (
                Error::BacklogFull {
                    topic: "a/b".into(),
                    limit: "retention.maxBytes = 1".into(),
                    current: 2,
                },
                Code::ResourceExhausted,
                429,
            ),
            (Error::ShuttingDown("publishes"), Code::Unavailable, 503),
            (
                Error::BadRequest("bad json".into()),
                Code::InvalidArgument,
                400,
            ),
            (
                Error::from_log(
                    "a/b",
                    LogError::BacklogFull {
                        limit: "x".into(),
                        current: 1,
                    },
                ),
                Code::ResourceExhausted,
                429,
            ),
            (
                Error::from_log(
                    "a/b",
                    LogError::Io {
                        op: "write",
                        path: "/data/topics/a/b/00000000000000000000.seg".into(),
                        source: std::io::Error::from_raw_os_error(28),
                    },
                ),
                Code::ResourceExhausted,
                429,
            ),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.http_status().as_u16(), http, "{e}");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), code);
        }
    }

    #[test]
    fn backlog_full_names_the_limit() {
        let e = Error::from_log(
            "ns/t",
            LogError::BacklogFull {
                limit: "retention.maxBytes = 1024 bytes".into(),
                current: 2000,
            },
        );
        assert!(e.to_string().contains("retention.maxBytes"), "{e}");
    }
}
