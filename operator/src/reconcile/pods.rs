//! Pod records (`/ferry/v1/pods/<namespace>/<pod>`): one per pod that carries the sidecar,
//! with its node's zone, so that each sidecar learns where it runs (see
//! [`crate::desired::pods`] for which pods have one).
//!
//! Not a kube `Controller`: a pod has no finalizer of ours (one would block every pod's
//! deletion while the operator is down), so a deleted pod is never reconciled by name. A
//! single task instead keeps the whole prefix in step with the pod and node caches:
//!
//! - it is poked by every pod event and every node label change (the same watches the
//!   group controller reads), and events that arrive during a pass coalesce into one more;
//! - each pass computes every record from the caches (memory only) and writes only the
//!   difference against what it last wrote, so a pass with nothing new sends nothing;
//! - what etcd holds is read once per leadership, after a failed write, and every
//!   [`RESYNC`] (which also repairs a record changed behind the operator's back); a
//!   record of a pod deleted while no operator ran is removed by that first read;
//! - its scope is the watched namespace's records (`--watch-namespace`) or all of them,
//!   never another operator's.
//!
//! Passes count as reconciles of kind `Pod` in the operator's metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::routing::PODS_PREFIX;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Context, FIRST_BACKOFF, MAX_BACKOFF, RESYNC, caches_ready};
use crate::desired::diff;
use crate::desired::members::node_zone;
use crate::desired::pods::pod_records_kv;
use crate::error::Result;

/// The `kind` label of the pod records' reconcile metrics.
pub const KIND: &str = "Pod";

/// The prefix of the pod records an operator watching `namespace` (`None`: all) owns.
pub fn scope(namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{PODS_PREFIX}{ns}/"),
        None => PODS_PREFIX.to_owned(),
    }
}

/// Keeps the pod records under `prefix` in step with the caches until `stop`.
pub async fn run(ctx: Arc<Context>, prefix: String, poke: Arc<Notify>, stop: CancellationToken) {
    // What etcd holds under the prefix, as far as this task knows; `None`: read it.
    let mut written: Option<BTreeMap<String, String>> = None;
    let mut failures: u32 = 0;
    let mut resync_at = Instant::now() + RESYNC;
    loop {
        match pass(&ctx, &prefix, &mut written).await {
            Ok(changed) => {
                failures = 0;
                if changed > 0 {
                    info!(%prefix, changed, "pod records written to the routing table");
                }
            }
            Err(error) => {
                written = None;
                failures = failures.saturating_add(1);
                ctx.metrics.error(KIND, error.reason());
                let delay = backoff(failures);
                warn!(%error, retry_in = ?delay, "writing pod records failed");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = poke.notified() => {}
            () = tokio::time::sleep_until(resync_at) => {
                written = None;
                resync_at = Instant::now() + RESYNC;
            }
        }
    }
}

/// One pass: every record from the caches, the difference written. Returns the number of
/// keys changed.
async fn pass(
    ctx: &Context,
    prefix: &str,
    written: &mut Option<BTreeMap<String, String>>,
) -> Result<usize> {
    caches_ready(ctx).await?;
    let _timer = ctx.metrics.reconcile_started(KIND);
    let pods = ctx.pods.state();
    let mut desired = pod_records_kv(pods.iter().map(AsRef::as_ref), |node| {
        ctx.nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| node_zone(&n))
    })?;
    desired.retain(|key, _| key.starts_with(prefix));
    let actual = match written.take() {
        Some(actual) => actual,
        None => ctx.writer.store().get_prefix(prefix).await?.kvs,
    };
    let changed = ctx.apply(&diff(&desired, &actual)).await?;
    *written = Some(desired);
    Ok(changed)
}

/// The delay before retry `failures` (1, 2, ...): doubling from [`FIRST_BACKOFF`] to
/// [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let factor = 2_u32.saturating_pow(failures.saturating_sub(1).min(16));
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_is_the_watched_namespace_or_every_record() {
        assert_eq!(scope(Some("shop")), "/ferry/v1/pods/shop/");
        assert_eq!(scope(None), "/ferry/v1/pods/");
    }

    #[test]
    fn retries_back_off_to_the_cap() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
