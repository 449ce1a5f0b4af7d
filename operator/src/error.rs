//! The operator's one error type.
//!
//! Every failure a reconcile, the leader election or the etcd store can hit is a variant
//! here, so that [`Error::reason`] gives the metric label and the log line names the cause.
//! `anyhow` is only used by `main.rs`.

use std::time::Duration;

use ferry_api::routing::EntryError;

/// Anything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Reading the kubeconfig or building the Kubernetes client failed.
    #[error("kubernetes client configuration: {0}")]
    KubeConfig(String),

    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// An etcd call failed (unreachable, timed out, refused).
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),

    /// A fenced write was refused because the fencing key no longer holds this leader's
    /// claim: another operator instance took over. The writer steps down.
    #[error("fenced out: {key} no longer holds this leader's claim (term {term})")]
    Fenced { key: String, term: u64 },

    /// This instance tried to claim the fencing key with a term that is not newer than the
    /// one already there.
    #[error("stale term {term}: {key} already holds {held:?}")]
    StaleTerm {
        key: String,
        term: u64,
        held: String,
    },

    /// A write was attempted while this instance does not hold the lease (lost, expired or
    /// never acquired).
    #[error("not the leader: the lease is lost or expired")]
    NotLeader,

    /// A resource's spec cannot be turned into a routing entry.
    #[error("{0}")]
    Entry(#[from] EntryError),

    /// A value could not be encoded as JSON.
    #[error("encoding {what} as JSON: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// A Kubernetes object came without the namespace or name a reconcile needs.
    #[error("{kind} object has no {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },

    /// A watch cache did not finish its first list in time.
    #[error("the {what} cache did not sync within {timeout:?}")]
    CacheNotReady {
        what: &'static str,
        timeout: Duration,
    },

    /// The metrics and health listener failed.
    #[error("metrics server on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    /// A task of the operator panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),

    /// The finalizer helper failed (adding or removing the finalizer, or the apply or
    /// cleanup step it ran).
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A short, bounded label for the `reason` of the error metric.
    pub fn reason(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Config(_) => "config",
            Error::KubeConfig(_) => "kubeconfig",
            Error::Kube(_) => "kube_api",
            Error::Etcd(_) => "etcd",
            Error::Fenced { .. } => "fenced",
            Error::StaleTerm { .. } => "stale_term",
            Error::NotLeader => "not_leader",
            Error::Entry(_) => "invalid_spec",
            Error::Json { .. } => "json",
            Error::MissingField { .. } => "missing_field",
            Error::CacheNotReady { .. } => "cache_not_ready",
            Error::Listen { .. } => "listen",
            Error::Internal(_) => "internal",
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.reason(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "finalizer_patch",
                F::UnnamedObject | F::InvalidFinalizer => "finalizer",
            },
        }
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
