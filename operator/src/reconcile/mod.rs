//! The reconcilers, one file per kind, and what they share: the [`Context`], the error
//! policy with per-object backoff, and writing a resource's keys.
//!
//! Every reconciler goes through `kube::runtime::finalizer` with the `ferry.dev/routing-table`
//! finalizer: on apply it makes etcd hold exactly the resource's keys and then its status;
//! on delete it removes the keys, and only once etcd confirmed that does the finalizer go.
//! Both steps compare before they write, so a converged resource costs reads only.

pub mod group;
pub mod pods;
pub mod status;
pub mod subscription;
pub mod topic;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::desired::{Changes, diff};
use crate::error::{Error, Result};
use crate::etcd::FencedWriter;
use crate::metrics::Metrics;

/// How often a converged resource is checked again, to repair a routing table that was
/// changed behind the operator's back (etcd is not watched for that).
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; it doubles per failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay after failed reconciles.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a reconcile waits for the pod and node caches' first list.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for the first list of the pod and node caches: before it, an empty cache would
/// look like "no pods" and empty the table of members and pod records.
pub(crate) async fn caches_ready(ctx: &Context) -> Result<()> {
    let pods = tokio::time::timeout(CACHE_TIMEOUT, ctx.pods.wait_until_ready()).await;
    if !matches!(pods, Ok(Ok(()))) {
        return Err(Error::CacheNotReady {
            what: "pod",
            timeout: CACHE_TIMEOUT,
        });
    }
    let nodes = tokio::time::timeout(CACHE_TIMEOUT, ctx.nodes.wait_until_ready()).await;
    if !matches!(nodes, Ok(Ok(()))) {
        return Err(Error::CacheNotReady {
            what: "node",
            timeout: CACHE_TIMEOUT,
        });
    }
    Ok(())
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    /// The only way to write etcd: fenced by this leader's claim.
    pub writer: FencedWriter,
    pub metrics: Arc<Metrics>,
    /// Sidecar peer port for member addresses.
    pub peer_port: u16,
    /// Every pod the operator watches (filled by the group controller's reflector).
    pub pods: Store<Pod>,
    /// Every node (for zones).
    pub nodes: Store<Node>,
    /// Consecutive failures per object, for the error policy's backoff.
    failures: Failures,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("writer", &self.writer)
            .field("peer_port", &self.peer_port)
            .finish_non_exhaustive()
    }
}

/// Consecutive failures per object, for an exponential backoff per object.
#[derive(Debug, Default)]
struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a failure of `key` and returns how long to wait before the retry.
    fn failed(&self, key: &str) -> Duration {
        let mut failures = self.lock();
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        let factor = 2_u32.saturating_pow(count.saturating_sub(1).min(16));
        FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
    }

    /// Forgets the failures of `key`.
    fn succeeded(&self, key: &str) {
        self.lock().remove(key);
    }
}

impl Context {
    pub fn new(
        client: Client,
        writer: FencedWriter,
        metrics: Arc<Metrics>,
        peer_port: u16,
        pods: Store<Pod>,
        nodes: Store<Node>,
    ) -> Self {
        Self {
            client,
            writer,
            metrics,
            peer_port,
            pods,
            nodes,
            failures: Failures::default(),
        }
    }

    /// Makes etcd hold exactly `desired` among `keys` and the keys under `prefix`: writes
    /// what differs, deletes what is not desired, and sends nothing when all is equal.
    /// Returns the number of keys changed.
    pub async fn sync_keys(
        &self,
        desired: &BTreeMap<String, String>,
        keys: &[String],
        prefix: Option<&str>,
    ) -> Result<usize> {
        let store = self.writer.store();
        let mut actual = store.get_keys(keys).await?;
        if let Some(prefix) = prefix {
            actual.extend(store.get_prefix(prefix).await?.kvs);
        }
        self.apply(&diff(desired, &actual)).await
    }

    /// Writes `changes` (nothing at all when there are none), counting them in the metrics.
    /// Returns the number of keys changed.
    pub async fn apply(&self, changes: &Changes) -> Result<usize> {
        if changes.is_empty() {
            return Ok(0);
        }
        match self.writer.apply(changes).await {
            Ok(n) => {
                self.metrics
                    .etcd_changes
                    .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
                Ok(n)
            }
            Err(error) => {
                if matches!(error, Error::Fenced { .. }) {
                    self.metrics.fenced_writes.inc();
                }
                Err(error)
            }
        }
    }
}

/// Spreads a retry delay over ±20 %: the objects an etcd outage failed together would
/// otherwise all retry in the same instant when it ends.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.8..1.2))
}

/// `Kind/namespace/name`, the key of the backoff table.
fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Counts the error in the metrics, logs it, and retries the object after an exponential
/// backoff (per object, from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], ±20 % jitter), so that an etcd or API
/// server outage costs a bounded number of retries per second instead of a hot loop.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&());
    ctx.metrics.error(&kind, error.reason());
    let delay = jittered(ctx.failures.failed(&object_key(obj.as_ref())));
    warn!(
        %kind,
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Forgets an object's failures; each reconciler calls it when it succeeds.
pub(crate) fn reconciled<K: Resource<DynamicType = ()>>(obj: &K, ctx: &Context) {
    ctx.failures.succeeded(&object_key(obj));
}

/// Turns the finalizer helper's error into ours.
pub(crate) fn finalizer_error(error: kube::runtime::finalizer::Error<Error>) -> Error {
    Error::Finalizer(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth_of_the_delay() {
        let base = Duration::from_secs(10);
        let delays: Vec<_> = (0..200).map(|_| jittered(base)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_secs(8) && *d <= Duration::from_secs(12))
        );
        assert!(delays.iter().any(|d| *d != delays[0]), "the delays vary");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let failures = Failures::default();
        let delays: Vec<_> = (0..9).map(|_| failures.failed("a")).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[2], Duration::from_secs(2));
        assert_eq!(delays[8], MAX_BACKOFF);
        assert_eq!(failures.failed("b"), FIRST_BACKOFF, "per object");
        failures.succeeded("a");
        assert_eq!(failures.failed("a"), FIRST_BACKOFF);
    }
}
