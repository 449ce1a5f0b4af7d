//! Subscription → `/ferry/v1/subscriptions/<namespace>/<name>`, once what it names exists.
//!
//! The entry is written only while the topic, the group (and the dead-letter topic, if
//! any) exist and are not being deleted, and a topic of another namespace lists this one
//! in `allowedSubscriberNamespaces`; otherwise the key is removed and the Subscription is
//! `Ready=False` with a reason naming the first problem (`TopicNotFound`,
//! `TopicNotAllowed`, `GroupNotFound`, `DeadLetterTopicNotFound`) and a message listing
//! them all. The controller watches Topics and ConsumerGroups, so the Subscription turns
//! Ready as soon as what it names appears.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_api::consts::FINALIZER;
use ferry_api::crd::ResourceStatus;
use ferry_api::routing::SubscriptionEntry;
use ferry_api::{ConsumerGroup, Subscription, Topic};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use tracing::{info, instrument};

use super::status::{Ready, apply_status, ready_condition, unpublished};
use super::{Context, RESYNC, finalizer_error, reconciled};
use crate::desired::entries::{
    namespaced_ref, split_ref, subscription_entry, subscription_entry_key, subscription_kv,
};
use crate::error::{Error, Result};

const KIND: &str = "Subscription";

/// Reconciles one Subscription (see the module documentation).
#[instrument(name = "reconcile", skip_all, fields(kind = KIND, namespace = sub.namespace().unwrap_or_default(), name = sub.name_any()))]
pub async fn reconcile(sub: Arc<Subscription>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let (namespace, _) = namespaced_ref(sub.as_ref())?;
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &namespace);
    let object = sub.clone();
    let action = finalizer(&api, FINALIZER, sub, |event| async {
        match event {
            Event::Apply(sub) => apply(&api, &sub, &ctx).await,
            Event::Cleanup(sub) => cleanup(&sub, &ctx).await,
        }
    })
    .await
    .map_err(finalizer_error)?;
    reconciled(object.as_ref(), &ctx);
    Ok(action)
}

/// A Topic by `namespace/name`, `None` if absent or being deleted.
async fn live_topic(ctx: &Context, reference: &str) -> Result<Option<Topic>> {
    let Some((namespace, name)) = split_ref(reference) else {
        return Ok(None);
    };
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api
        .get_opt(name)
        .await?
        .filter(|t| t.metadata.deletion_timestamp.is_none()))
}

/// What keeps the subscription out of the table, first problem first.
async fn problems(ctx: &Context, namespace: &str, entry: &SubscriptionEntry) -> Result<Vec<Ready>> {
    let mut problems = Vec::new();
    match live_topic(ctx, &entry.topic).await? {
        None => problems.push(Ready::no(
            "TopicNotFound",
            format!("topic {} not found", entry.topic),
        )),
        Some(topic) => {
            let topic_namespace = topic.namespace().unwrap_or_default();
            if topic_namespace != namespace
                && !topic
                    .spec
                    .allowed_subscriber_namespaces
                    .iter()
                    .any(|n| n == namespace)
            {
                problems.push(Ready::no(
                    "TopicNotAllowed",
                    format!(
                        "topic {} does not list namespace {namespace} in allowedSubscriberNamespaces",
                        entry.topic
                    ),
                ));
            }
        }
    }
    let (_, group_name) = split_ref(&entry.group).unwrap_or((namespace, &entry.group));
    let groups: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), namespace);
    let group = groups
        .get_opt(group_name)
        .await?
        .filter(|g| g.metadata.deletion_timestamp.is_none());
    if group.is_none() {
        problems.push(Ready::no(
            "GroupNotFound",
            format!("consumer group {} not found", entry.group),
        ));
    }
    if let Some(dead_letter) = &entry.dead_letter_topic
        && live_topic(ctx, dead_letter).await?.is_none()
    {
        problems.push(Ready::no(
            "DeadLetterTopicNotFound",
            format!("dead-letter topic {dead_letter} not found"),
        ));
    }
    Ok(problems)
}

async fn apply(api: &Api<Subscription>, sub: &Subscription, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(sub)?;
    let key = subscription_entry_key(&namespace, &name);
    let ready = match subscription_entry(sub) {
        Ok(entry) => {
            let problems = problems(ctx, &namespace, &entry).await?;
            let desired = if problems.is_empty() {
                subscription_kv(&entry)?
            } else {
                BTreeMap::new()
            };
            let changed = match ctx
                .sync_keys(&desired, std::slice::from_ref(&key), None)
                .await
            {
                Ok(changed) => changed,
                Err(error) => {
                    let current = sub.status.as_ref();
                    return Err(unpublished(api, sub, current, error, ctx).await);
                }
            };
            match problems.first() {
                None => {
                    if changed > 0 {
                        info!(%key, "subscription written to the routing table");
                    }
                    Ready::yes("Published", format!("in the routing table at {key}"))
                }
                Some(first) => {
                    if changed > 0 {
                        info!(%key, reason = first.reason, "subscription removed from the routing table");
                    }
                    let message = problems
                        .iter()
                        .map(|p| p.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    Ready::no(first.reason, message)
                }
            }
        }
        Err(Error::Entry(error)) => Ready::no("InvalidSpec", error.to_string()),
        Err(error) => return Err(error),
    };
    let previous = sub
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let status = ResourceStatus {
        observed_generation: sub.metadata.generation,
        conditions: vec![ready_condition(&ready, sub.metadata.generation, previous)],
    };
    apply_status(api, &name, sub.status.as_ref(), &status, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(sub: &Subscription, ctx: &Context) -> Result<Action> {
    let (namespace, name) = namespaced_ref(sub)?;
    let key = subscription_entry_key(&namespace, &name);
    ctx.sync_keys(&BTreeMap::new(), std::slice::from_ref(&key), None)
        .await?;
    info!(%key, "subscription removed from the routing table");
    Ok(Action::await_change())
}

/// `namespace/name` of the topics a Subscription names (its topic and dead-letter topic),
/// for mapping Topic events to the Subscriptions that wait for them.
pub fn named_topics(sub: &Subscription) -> Vec<String> {
    let namespace = sub.namespace().unwrap_or_default();
    let resolve = |t: &str| {
        if t.contains('/') {
            t.to_owned()
        } else {
            format!("{namespace}/{t}")
        }
    };
    let mut topics = vec![resolve(&sub.spec.topic)];
    topics.extend(sub.spec.dead_letter_topic.as_deref().map(resolve));
    topics
}
