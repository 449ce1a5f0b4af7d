//! Topic → `/ferry/v1/topics/<namespace>/<name>`.
//!
//! A Topic whose fields cannot be resolved (which the CRD's validation should already
//! prevent) is `Ready=False` with reason `InvalidSpec`, and its last good entry is left in
//! the table: traffic keeps the settings it had rather than losing the topic.

use std::sync::Arc;

use ferry_api::Topic;
use ferry_api::consts::FINALIZER;
use ferry_api::crd::ResourceStatus;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use std::collections::BTreeMap;
use tracing::{info, instrument};

use super::status::{Ready, apply_status, ready_condition, unpublished};
use super::{Context, RESYNC, finalizer_error, reconciled};
use crate::desired::entries::{namespaced_ref, topic_entry_key, topic_kv};
use crate::error::{Error, Result};

const KIND: &str = "Topic";

/// Reconciles one Topic (see the module documentation).
#[instrument(name = "reconcile", skip_all, fields(kind = KIND, namespace = topic.namespace().unwrap_or_default(), name = topic.name_any()))]
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let (namespace, _) = namespaced_ref(topic.as_ref())?;
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), &namespace);
    let object = topic.clone();
    let action = finalizer(&api, FINALIZER, topic, |event| async {
        match event {
            Event::Apply(topic) => apply(&api, &topic, &ctx).await,
            Event::Cleanup(topic) => cleanup(&topic, &ctx).await,
        }
    })
    .await
    .map_err(finalizer_error)?;
    reconciled(object.as_ref(), &ctx);
    Ok(action)
}

async fn apply(api: &Api<Topic>, topic: &Topic, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(topic)?;
    let key = topic_entry_key(&namespace, &name);
    let ready = match topic_kv(topic) {
        Ok(desired) => {
            let changed = match ctx
                .sync_keys(&desired, std::slice::from_ref(&key), None)
                .await
            {
                Ok(changed) => changed,
                Err(error) => {
                    let current = topic.status.as_ref();
                    return Err(unpublished(api, topic, current, error, ctx).await);
                }
            };
            if changed > 0 {
                info!(%key, "topic written to the routing table");
            }
            Ready::yes("Published", format!("in the routing table at {key}"))
        }
        Err(Error::Entry(error)) => Ready::no("InvalidSpec", error.to_string()),
        Err(error) => return Err(error),
    };
    let previous = topic
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let status = ResourceStatus {
        observed_generation: topic.metadata.generation,
        conditions: vec![ready_condition(&ready, topic.metadata.generation, previous)],
    };
    apply_status(api, &name, topic.status.as_ref(), &status, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(topic: &Topic, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(topic)?;
    let key = topic_entry_key(&namespace, &name);
    ctx.sync_keys(&BTreeMap::new(), std::slice::from_ref(&key), None)
        .await?;
    info!(%key, "topic removed from the routing table");
    Ok(Action::await_change())
}
