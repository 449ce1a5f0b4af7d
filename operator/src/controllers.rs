//! Wiring of the three controllers (Topic, ConsumerGroup, Subscription) and their watches,
//! run by the leader until it stops leading or shuts down.
//!
//! - Topic: its own objects.
//! - Subscription: its own objects, plus Topics and ConsumerGroups mapped to the
//!   Subscriptions that name them, so that a Subscription waiting for a missing topic or
//!   group turns Ready when it appears (and not Ready when it goes).
//! - ConsumerGroup: its own objects, plus every Pod event mapped to the groups of the pod's
//!   namespace (a pod whose labels changed must also leave the group it no longer matches,
//!   so "the groups that match it now" is not enough), and Node label changes mapped to
//!   every group (zones). The pod and node watches are reflectors whose caches the group
//!   reconciler reads.
//!
//! Beside them runs the pod records' task ([`reconcile::pods`]), poked by the same pod
//! events and node label changes.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{ConsumerGroup, Subscription, Topic};
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::Error;
use crate::etcd::FencedWriter;
use crate::metrics::Metrics;
use crate::reconcile::{self, Context, error_policy};

/// How long the reconciles in flight may take to finish once the controllers stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the controllers need besides the writer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sidecar peer port for member addresses.
    pub peer_port: u16,
    /// Watch one namespace only (`None`: all).
    pub namespace: Option<String>,
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Logs what a controller's stream yields; reconcile errors were already logged (and
/// counted) by the error policy, so only the controller's own errors are warned about.
async fn log_result<K: Resource, QE: std::error::Error>(
    result: Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<Error, QE>>,
) {
    use kube::runtime::controller::Error as E;
    match result {
        Ok((object, action)) => debug!(%object, ?action, "reconciled"),
        Err(E::ReconcilerFailed(_, object)) => debug!(%object, "reconcile failed"),
        Err(error) => warn!(%error, "controller error"),
    }
}

/// Runs the three controllers and the pod records' task until `stop` is cancelled, then lets the reconciles in
/// flight finish (their writes are still fenced) and returns.
pub async fn run(
    client: Client,
    writer: FencedWriter,
    metrics: Arc<Metrics>,
    settings: Settings,
    stop: CancellationToken,
) {
    let ns = settings.namespace.as_deref();
    let wc = watcher::Config::default();
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let (node_reader, node_writer) = reflector::store::<Node>();
    let ctx = Arc::new(Context::new(
        client.clone(),
        writer,
        metrics,
        settings.peer_port,
        pod_reader,
        node_reader,
    ));

    let topics = Controller::new(scoped::<Topic>(&client, ns), wc.clone())
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            reconcile::topic::reconcile,
            error_policy::<Topic>,
            ctx.clone(),
        )
        .for_each(log_result);

    let subscriptions = Controller::new(scoped::<Subscription>(&client, ns), wc.clone());
    let by_topic = subscriptions.store();
    let by_group = subscriptions.store();
    let subscriptions = subscriptions
        .watches(
            scoped::<Topic>(&client, ns),
            wc.clone(),
            move |topic: Topic| {
                let reference = format!(
                    "{}/{}",
                    topic.namespace().unwrap_or_default(),
                    topic.name_any()
                );
                by_topic
                    .state()
                    .iter()
                    .filter(|s| reconcile::subscription::named_topics(s).contains(&reference))
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            scoped::<ConsumerGroup>(&client, ns),
            wc.clone(),
            move |group: ConsumerGroup| {
                let namespace = group.namespace();
                let name = group.name_any();
                by_group
                    .state()
                    .iter()
                    .filter(|s| s.namespace() == namespace && s.spec.group == name)
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            reconcile::subscription::reconcile,
            error_policy::<Subscription>,
            ctx.clone(),
        )
        .for_each(log_result);

    let groups = Controller::new(scoped::<ConsumerGroup>(&client, ns), wc.clone());
    let of_pod = groups.store();
    let of_node = groups.store();
    // Every pod is cached: drop what membership never reads (managed fields, annotations
    // but the injection request, which membership requires) before it reaches the cache,
    // to keep the operator's memory small in large clusters.
    let pods = watcher(scoped::<Pod>(&client, ns), wc.clone()).modify(|pod| {
        pod.managed_fields_mut().clear();
        pod.annotations_mut()
            .retain(|k, _| k == ferry_api::consts::INJECT_ANNOTATION);
    });
    // The caches are updated before an event comes out of its reflector, so a poked pod
    // records' pass sees the change.
    let poke = Arc::new(Notify::new());
    let pod_events = reflector::reflector(pod_writer, pods)
        .default_backoff()
        .inspect({
            let poke = poke.clone();
            move |_| poke.notify_one()
        })
        .touched_objects();
    let node_events =
        reflector::reflector(node_writer, watcher(Api::<Node>::all(client.clone()), wc))
            .default_backoff()
            .touched_objects()
            .predicate_filter(predicates::labels, PredicateConfig::default())
            .inspect({
                let poke = poke.clone();
                move |_| poke.notify_one()
            });
    let records = reconcile::pods::run(ctx.clone(), reconcile::pods::scope(ns), poke, stop.clone());
    let groups = groups
        .watches_stream(pod_events, move |pod: Pod| {
            let namespace = pod.namespace();
            of_pod
                .state()
                .iter()
                .filter(|g| g.namespace() == namespace)
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(node_events, move |_node: Node| {
            of_node
                .state()
                .iter()
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            reconcile::group::reconcile,
            error_policy::<ConsumerGroup>,
            ctx,
        )
        .for_each(log_result);

    let controllers = async {
        futures::join!(topics, subscriptions, groups, records);
    };
    tokio::pin!(controllers);
    tokio::select! {
        () = &mut controllers => return,
        () = stop.cancelled() => {}
    }
    // Graceful shutdown lets the reconciles in flight finish, but kube-runtime's applier
    // waits forever for a cache whose first list had not completed when the shutdown began
    // (its watch is no longer polled). So the grace is bounded; whatever is still running
    // after it is dropped, which is safe: every write is fenced and checks the lease.
    if tokio::time::timeout(SHUTDOWN_GRACE, controllers)
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "the controllers did not stop in time; dropping them");
    }
}
