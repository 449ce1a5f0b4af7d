//! The `Ready` condition and status writes by server-side apply.
//!
//! A status is computed in full, compared with the one the object already has, and only
//! sent when they differ: a second reconcile of a converged resource sends no patch and
//! its `resourceVersion` stays put. `lastTransitionTime` is carried over while the
//! condition's status does not change, so that it does not make every status "new".

use std::fmt::Debug;

use ferry_api::consts::FIELD_MANAGER;
use ferry_api::crd::{Condition, ResourceStatus, condition_types};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use super::Context;
use crate::error::{Error, Result};
use crate::metrics::KindLabels;

/// The `Ready` condition's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
    /// A CamelCase reason (`Published`, `TopicNotFound`, ...).
    pub reason: &'static str,
    pub message: String,
}

impl Ready {
    pub fn yes(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason,
            message: message.into(),
        }
    }

    pub fn no(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// The `Ready` a resource gets when etcd could not take its entries: `False` with reason
/// `RoutingTableUnavailable`, but only for a generation the status has not observed yet.
/// A generation that is already published stays `Ready=True` through an etcd outage: its
/// entries are still in the table and sidecars keep routing with them, so that is the
/// truth. Other errors leave the status alone (the error policy retries them).
pub fn routing_unavailable(
    error: &Error,
    generation: Option<i64>,
    observed: Option<i64>,
) -> Option<Ready> {
    match error {
        Error::Etcd(source) if generation != observed => Some(Ready::no(
            "RoutingTableUnavailable",
            format!(
                "generation {} is not in the routing table yet: etcd is unavailable ({source}); retrying",
                generation.unwrap_or_default()
            ),
        )),
        _ => None,
    }
}

/// Records [`routing_unavailable`] on a Topic's or Subscription's status (best effort: the
/// API server may be what failed), then hands the error back for the error policy.
pub async fn unpublished<K>(
    api: &Api<K>,
    obj: &K,
    current: Option<&ResourceStatus>,
    error: Error,
    ctx: &Context,
) -> Error
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let generation = obj.meta().generation;
    let observed = current.and_then(|s| s.observed_generation);
    if let Some(ready) = routing_unavailable(&error, generation, observed) {
        let previous = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let status = ResourceStatus {
            observed_generation: generation,
            conditions: vec![ready_condition(&ready, generation, previous)],
        };
        let name = obj.meta().name.clone().unwrap_or_default();
        if let Err(status_error) = apply_status(api, &name, current, &status, ctx).await {
            warn!(%status_error, "could not record RoutingTableUnavailable");
        }
    }
    error
}

/// The `Ready` condition for `generation`, keeping the previous `lastTransitionTime` when
/// the status (`True`/`False`) is unchanged.
pub fn ready_condition(
    ready: &Ready,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if ready.ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == condition_types::READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: condition_types::READY.into(),
        status: status.into(),
        reason: ready.reason.into(),
        message: ready.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Now, to the second: the API server stores conditions' times to the second, so a finer
/// time would never compare equal to what comes back.
fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Sends `desired` as the object's status by server-side apply (field manager
/// `ferry-operator`, forced), unless `current` already equals it. Returns whether a patch
/// was sent.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    current: Option<&S>,
    desired: &S,
    ctx: &Context,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: PartialEq + Serialize,
{
    if current == Some(desired) {
        return Ok(false);
    }
    // A replica that lost the Lease must not fight the new leader over statuses either.
    ctx.writer.guard().check()?;
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": desired,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    ctx.metrics
        .status_patches
        .get_or_create(&KindLabels {
            kind: K::kind(&()).into_owned(),
        })
        .inc();
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unpublished_generation_turns_unavailable() {
        let etcd = Error::Etcd(etcd_client::Error::InvalidArgs("down".into()));
        let ready = routing_unavailable(&etcd, Some(3), Some(2)).map(|r| (r.ready, r.reason));
        assert_eq!(ready, Some((false, "RoutingTableUnavailable")));
        assert_eq!(routing_unavailable(&etcd, Some(3), Some(3)), None);
        assert_eq!(
            routing_unavailable(&Error::NotLeader, Some(3), Some(2)),
            None
        );
    }

    #[test]
    fn the_transition_time_is_kept_while_the_status_holds() {
        let first = ready_condition(
            &Ready::no("TopicNotFound", "topic a/b not found"),
            Some(1),
            &[],
        );
        let mut old = first.clone();
        old.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let same = ready_condition(
            &Ready::no("GroupNotFound", "group"),
            Some(2),
            &[old.clone()],
        );
        assert_eq!(same.last_transition_time, old.last_transition_time);
        assert_eq!(
            (same.reason.as_str(), same.observed_generation),
            ("GroupNotFound", Some(2))
        );
        let flipped = ready_condition(&Ready::yes("Published", "ok"), Some(2), &[old.clone()]);
        assert_ne!(flipped.last_transition_time, old.last_transition_time);
        assert_eq!(flipped.status, "True");
        assert_eq!(first.last_transition_time.0.subsec_nanosecond(), 0);
    }
}
