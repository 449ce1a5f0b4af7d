//! ConsumerGroup → `/ferry/v1/groups/<namespace>/<name>` and its members under
//! `/ferry/v1/members/<namespace>/<name>/<pod>`.
//!
//! Members come from the pod and node caches (reflectors that the group controller also
//! uses as triggers), so a pod that turns not Ready or is deleted leaves the table as
//! soon as its watch event arrives, without a list call; see [`crate::desired::members`]
//! for who counts as a member. The status has `members`, `readyMembers` and `zones`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_api::ConsumerGroup;
use ferry_api::consts::FINALIZER;
use ferry_api::crd::ConsumerGroupStatus;
use ferry_api::routing::object_ref;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::ObjectRef;
use tracing::{info, instrument, warn};

use super::status::{Ready, apply_status, ready_condition, routing_unavailable};
use super::{Context, RESYNC, caches_ready, finalizer_error, reconciled};
use crate::desired::entries::{group_entry_key, group_kv, members_prefix, namespaced_ref};
use crate::desired::members::{membership, node_zone};
use crate::error::Result;

const KIND: &str = "ConsumerGroup";

/// Reconciles one ConsumerGroup (see the module documentation).
#[instrument(name = "reconcile", skip_all, fields(kind = KIND, namespace = group.namespace().unwrap_or_default(), name = group.name_any()))]
pub async fn reconcile(group: Arc<ConsumerGroup>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let (namespace, _) = namespaced_ref(group.as_ref())?;
    let api: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let object = group.clone();
    let action = finalizer(&api, FINALIZER, group, |event| async {
        match event {
            Event::Apply(group) => apply(&api, &group, &ctx).await,
            Event::Cleanup(group) => cleanup(&group, &ctx).await,
        }
    })
    .await
    .map_err(finalizer_error)?;
    reconciled(object.as_ref(), &ctx);
    Ok(action)
}

async fn apply(api: &Api<ConsumerGroup>, group: &ConsumerGroup, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(group)?;
    let key = group_entry_key(&namespace, &name);
    let prefix = members_prefix(&namespace, &name);
    let previous = group
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = group.metadata.generation;
    let observed = group.status.as_ref().and_then(|s| s.observed_generation);

    let status = if let Err(error) = ferry_api::local::selector::validate(&group.spec.selector) {
        // Left as it was in the table; the API server should have refused this already.
        let ready = Ready::no("InvalidSpec", format!("spec.selector: {error}"));
        ConsumerGroupStatus {
            observed_generation: generation,
            conditions: vec![ready_condition(&ready, generation, previous)],
            ..group.status.clone().unwrap_or_default()
        }
    } else {
        caches_ready(ctx).await?;
        let pods = ctx.pods.state();
        let members = membership(
            &namespace,
            &name,
            &group.spec.selector,
            pods.iter().map(AsRef::as_ref),
            |node| {
                ctx.nodes
                    .get(&ObjectRef::new(node))
                    .and_then(|n| node_zone(&n))
            },
            ctx.peer_port,
        );
        let mut desired = group_kv(group)?;
        desired.extend(members.kv()?);
        let changed = match ctx
            .sync_keys(&desired, std::slice::from_ref(&key), Some(&prefix))
            .await
        {
            Ok(changed) => changed,
            Err(error) => {
                if let Some(ready) = routing_unavailable(&error, generation, observed) {
                    // Best effort: the counts stay those last published.
                    let status = ConsumerGroupStatus {
                        observed_generation: generation,
                        conditions: vec![ready_condition(&ready, generation, previous)],
                        ..group.status.clone().unwrap_or_default()
                    };
                    if let Err(status_error) =
                        apply_status(api, &name, group.status.as_ref(), &status, ctx).await
                    {
                        warn!(%status_error, "could not record RoutingTableUnavailable");
                    }
                }
                return Err(error);
            }
        };
        if changed > 0 {
            info!(
                group = %object_ref(&namespace, &name),
                ready_members = members.ready_members(),
                changed,
                "group and members written to the routing table"
            );
        }
        let ready = Ready::yes(
            "Published",
            format!(
                "in the routing table; {} of {} members ready",
                members.ready_members(),
                members.members
            ),
        );
        ConsumerGroupStatus {
            observed_generation: generation,
            members: members.members,
            ready_members: members.ready_members(),
            zones: members.zones,
            conditions: vec![ready_condition(&ready, generation, previous)],
        }
    };
    apply_status(api, &name, group.status.as_ref(), &status, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(group: &ConsumerGroup, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(group)?;
    let key = group_entry_key(&namespace, &name);
    let prefix = members_prefix(&namespace, &name);
    ctx.sync_keys(&BTreeMap::new(), std::slice::from_ref(&key), Some(&prefix))
        .await?;
    info!(%key, "group and its members removed from the routing table");
    Ok(Action::await_change())
}
