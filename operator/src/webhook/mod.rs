//! The mutating admission webhook that injects the sidecar into pods that ask for it.
//!
//! A pod annotated `ferry.dev/inject: "true"` gets the sidecar as a **native sidecar**: an
//! init container named `ferry-sidecar` with `restartPolicy: Always`, placed first so
//! that it is up before the other init containers and the app start, and stopped after
//! the app ([`container`] builds it). It also gets an `emptyDir` volume for the sidecar's
//! log. The name `ferry-sidecar` is reserved ([`spoof`]): a pod that asks for injection and
//! already has a container of that name is admitted unchanged only when that container is
//! exactly the one the webhook would inject (the API server re-invoking it with
//! `reinvocationPolicy: IfNeeded`), and denied otherwise, naming the container; a pod that
//! does not ask for injection but has such a container is denied too.
//!
//! Every replica serves it, leader or not: admission must not wait for an election.
//! It serves TLS only ([`tls`]), on `--webhook-addr`, with the certificate in
//! `--webhook-cert-dir`, re-read when the files change (rotation without a restart).
//! The `MutatingWebhookConfiguration` (in the Helm chart) should select Pods on CREATE,
//! exclude system namespaces, and fail closed (`failurePolicy: Fail`) only for
//! namespaces that opted in.

pub mod container;
pub mod defaults;
pub mod overrides;
pub mod spoof;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::desired::members::{SIDECAR_CONTAINER, asks_for_injection};
use crate::identity::service::Published;

/// Path the webhook answers on.
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Name of the sidecar's peer port.
pub const PEER_PORT_NAME: &str = "ferry-peer";
/// Name of the sidecar's admin port (metrics, health, readiness).
pub const ADMIN_PORT_NAME: &str = "ferry-admin";
/// Name of the sidecar's data volume.
pub const DATA_VOLUME: &str = "ferry-data";
/// Where the data volume is mounted in the sidecar.
pub const DATA_DIR: &str = "/var/lib/ferry";

/// What the injected container needs to know ([`defaults::injection`] builds it).
#[derive(Debug, Clone)]
pub struct Injection {
    /// The sidecar image.
    pub image: String,
    /// The image pull policy (the cluster's default when unset).
    pub image_pull_policy: Option<String>,
    /// Sidecar peer port (`FERRY_PEER_ADDR`, `FERRY_ADVERTISE_ADDR`).
    pub peer_port: u16,
    /// Sidecar admin port (metrics, health, the readiness probe).
    pub admin_port: u16,
    /// etcd endpoints the sidecar follows the routing table from.
    pub etcd_endpoints: Vec<String>,
    /// Default requests and limits; pod annotations override them one by one.
    pub resources: Option<ResourceRequirements>,
    /// More `FERRY_*` settings of the sidecar.
    pub env: BTreeMap<String, String>,
    /// The identity service the sidecar asks for its certificate, when the operator runs
    /// one: the sidecar gets its URL, the identity it must prove, the trust bundle, and a
    /// projected service-account token for
    /// [`ferry_api::consts::IDENTITY_AUDIENCE`] bound to the pod.
    pub identity: Option<Published>,
}

/// Name of the projected token volume.
pub const IDENTITY_VOLUME: &str = "ferry-identity-token";

/// Whether the pod has a container named like the sidecar, plain or init.
fn has_sidecar_name(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    })
}

/// The JSON patch that injects the sidecar; `Ok(None)` when the pod did not ask for it or
/// already has exactly the sidecar the webhook injects (a re-invocation), `Err` (the denial
/// message) when an override is malformed or the pod brings its own `ferry-sidecar`
/// container ([`spoof`]).
pub fn inject(pod: &Pod, injection: &Injection) -> Result<Option<Value>, String> {
    let asked = asks_for_injection(pod);
    if !asked {
        return if has_sidecar_name(pod) {
            Err(spoof::not_asked())
        } else {
            Ok(None)
        };
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let overrides = overrides::overrides(pod)?;
    let container = container::sidecar(injection, &overrides);
    if has_sidecar_name(pod) {
        let expected: Container = serde_json::from_value(container)
            .map_err(|e| format!("building the sidecar container: {e}"))?;
        spoof::check(pod, &expected)?;
        return Ok(None);
    }
    let mut new_volumes = Vec::new();
    if injection.identity.is_some() {
        new_volumes.push(container::identity_volume());
    }
    let mut ops = Vec::new();
    match &spec.init_containers {
        Some(init) if !init.is_empty() => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
        }
        _ => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]})),
    }
    // A projected token needs a service account: the API server's ServiceAccount admission
    // names `default` before webhooks run, but where it is off the pod would be refused.
    if injection.identity.is_some()
        && spec
            .service_account_name
            .as_deref()
            .is_none_or(str::is_empty)
    {
        ops.push(json!({"op": "add", "path": "/spec/serviceAccountName", "value": "default"}));
    }
    let mut empty_dir = json!({});
    if let Some(limit) = &overrides.data_size_limit {
        empty_dir = json!({ "sizeLimit": limit });
    }
    let has = |name: &str| spec.volumes.iter().flatten().any(|v| v.name == name);
    if overrides.data_volume.is_none() && !has(DATA_VOLUME) {
        new_volumes.insert(0, json!({"name": DATA_VOLUME, "emptyDir": empty_dir}));
    }
    if has(IDENTITY_VOLUME) {
        return Err(format!(
            "the pod already has a volume named {IDENTITY_VOLUME:?}, which the sidecar's identity token needs"
        ));
    }
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        for volume in new_volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    } else if !new_volumes.is_empty() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": new_volumes}));
    }
    Ok(Some(Value::Array(ops)))
}

/// The webhook's routes.
pub fn router(injection: Injection) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .with_state(Arc::new(injection))
}

async fn mutate(
    State(injection): State<Arc<Injection>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            warn!(%error, "an AdmissionReview without a request");
            return Json(AdmissionResponse::invalid(error.to_string()).into_review());
        }
    };
    let mut response = AdmissionResponse::from(&request);
    let Some(pod) = &request.object else {
        return Json(response.into_review());
    };
    let patch = match inject(pod, &injection) {
        Ok(patch) => patch,
        Err(message) => {
            info!(
                namespace = request.namespace.as_deref().unwrap_or_default(),
                %message,
                "pod denied"
            );
            return Json(response.deny(message).into_review());
        }
    };
    if let Some(patch) = patch {
        let patch = serde_json::from_value::<json_patch::Patch>(patch)
            .map_err(|e| e.to_string())
            .and_then(|patch| {
                response
                    .clone()
                    .with_patch(patch)
                    .map_err(|e| e.to_string())
            });
        response = match patch {
            Ok(patched) => {
                info!(
                    namespace = request.namespace.as_deref().unwrap_or_default(),
                    pod = pod
                        .metadata
                        .name
                        .as_deref()
                        .or(pod.metadata.generate_name.as_deref())
                        .unwrap_or_default(),
                    "injecting the sidecar"
                );
                patched
            }
            Err(error) => response.deny(format!("building the sidecar patch: {error}")),
        };
    }
    Json(response.into_review())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::members::carries_sidecar;
    use ferry_api::consts::{IDENTITY_AUDIENCE, IDENTITY_TOKEN_DIR, IDENTITY_TOKEN_PATH};

    pub(super) fn injection() -> Injection {
        Injection {
            image: "ferry-sidecar:test".into(),
            image_pull_policy: None,
            peer_port: 7710,
            admin_port: 7790,
            etcd_endpoints: vec!["http://etcd:2379".into()],
            resources: None,
            env: BTreeMap::new(),
            identity: None,
        }
    }

    pub(super) fn pod(manifest: Value) -> Result<Pod, serde_json::Error> {
        serde_json::from_value(manifest)
    }

    /// `pod` with the webhook's patch applied.
    pub(super) fn injected(
        pod: &Pod,
        injection: &Injection,
    ) -> Result<Pod, Box<dyn std::error::Error>> {
        let patch = inject(pod, injection)?.ok_or("no patch")?;
        let mut doc = serde_json::to_value(pod)?;
        json_patch::patch(
            &mut doc,
            &serde_json::from_value::<json_patch::Patch>(patch)?,
        )?;
        Ok(serde_json::from_value(doc)?)
    }

    #[test]
    fn only_pods_that_ask_get_the_sidecar_once() -> Result<(), Box<dyn std::error::Error>> {
        let plain =
            pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app"}]}}))?;
        assert_eq!(inject(&plain, &injection()), Ok(None));

        let asking = pod(json!({
            "metadata": {"name": "a", "annotations": {"ferry.dev/inject": "true"}},
            "spec": {"containers": [{"name": "app"}], "volumes": [{"name": "x", "emptyDir": {}}]}
        }))?;
        let injected = injected(&asking, &injection())?;
        assert!(carries_sidecar(&injected));
        let spec = injected.spec.ok_or("no spec")?;
        let sidecar = &spec.init_containers.ok_or("no init containers")?[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar.image.as_deref(), Some("ferry-sidecar:test"));
        assert_eq!(spec.volumes.ok_or("no volumes")?.len(), 2);

        let mut again = asking.clone();
        again.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            init_containers: Some(vec![sidecar.clone()]),
            ..Default::default()
        });
        assert_eq!(inject(&again, &injection()), Ok(None), "idempotent");
        Ok(())
    }

    #[test]
    fn annotations_override_the_defaults() -> Result<(), Box<dyn std::error::Error>> {
        let mut defaults = injection();
        defaults.resources = Some(serde_json::from_value(
            json!({"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
        )?);
        defaults
            .env
            .insert("FERRY_SHUTDOWN_GRACE".into(), "25s".into());
        let asking = pod(json!({
            "metadata": {"name": "a", "annotations": {
                "ferry.dev/inject": "true",
                "ferry.dev/sidecar-memory-limit": "1Gi",
                "ferry.dev/sidecar-log": "debug",
                "ferry.dev/data-volume": "pvc",
            }},
            "spec": {"containers": [{"name": "app"}], "volumes": [{"name": "pvc", "persistentVolumeClaim": {"claimName": "c"}}]}
        }))?;
        let injected = injected(&asking, &defaults)?;
        let spec = injected.spec.ok_or("no spec")?;
        let sidecar = &spec.init_containers.ok_or("no init containers")?[0];
        let resources = sidecar.resources.clone().ok_or("no resources")?;
        assert_eq!(resources.limits.ok_or("limits")?["memory"].0, "1Gi");
        assert_eq!(resources.requests.ok_or("requests")?["cpu"].0, "20m");
        let env = sidecar.env.clone().unwrap_or_default();
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("FERRY_LOG").as_deref(), Some("debug"));
        assert_eq!(value("FERRY_SHUTDOWN_GRACE").as_deref(), Some("25s"));
        assert_eq!(
            sidecar.volume_mounts.clone().unwrap_or_default()[0].name,
            "pvc"
        );
        assert_eq!(spec.volumes.ok_or("volumes")?.len(), 1, "no emptyDir added");
        let field = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone())
        };
        assert_eq!(field("FERRY_POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(
            field("FERRY_NAMESPACE").as_deref(),
            Some("metadata.namespace")
        );
        assert!(
            !env.iter()
                .any(|e| e.name == "FERRY_ZONE" || e.name == "FERRY_NODE"),
            "zone and node come from the pod record, not the environment: {env:?}"
        );

        let mut bad = asking.clone();
        bad.metadata
            .annotations
            .get_or_insert_default()
            .insert("ferry.dev/sidecar-cpu-request".into(), "a lot".into());
        let error = inject(&bad, &defaults).unwrap_err();
        assert!(error.contains("ferry.dev/sidecar-cpu-request"), "{error}");
        Ok(())
    }

    #[test]
    fn the_identity_service_comes_with_a_pod_bound_token() -> Result<(), Box<dyn std::error::Error>>
    {
        let mut with_identity = injection();
        with_identity.identity = Some(Published {
            url: "https://ferry-identity.ferry-system.svc:8444".into(),
            server: "spiffe://ferry.local/ns/ferry-system/sa/ferry-operator".parse()?,
            trust_bundle: Arc::new(std::sync::RwLock::new("PEM".into())),
        });
        let asking = pod(json!({
            "metadata": {"name": "a", "annotations": {"ferry.dev/inject": "true"}},
            "spec": {"containers": [{"name": "app"}]}
        }))?;
        let injected = injected(&asking, &with_identity)?;
        let spec = injected.spec.ok_or("no spec")?;
        assert_eq!(spec.service_account_name.as_deref(), Some("default"));
        let sidecar = &spec.init_containers.ok_or("no init containers")?[0];
        let env = sidecar.env.clone().unwrap_or_default();
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            value("FERRY_IDENTITY_URL").as_deref(),
            Some("https://ferry-identity.ferry-system.svc:8444")
        );
        assert_eq!(
            value("FERRY_IDENTITY_TRUST_ANCHORS").as_deref(),
            Some("PEM")
        );
        // The routing table comes from the operator, not from etcd.
        assert_eq!(
            value("FERRY_ROUTING_URL").as_deref(),
            Some("https://ferry-identity.ferry-system.svc:8444")
        );
        assert_eq!(value("FERRY_ETCD_ENDPOINTS"), None);
        assert_eq!(
            value("FERRY_IDENTITY_TOKEN_FILE").as_deref(),
            Some(IDENTITY_TOKEN_PATH)
        );
        let volumes = spec.volumes.ok_or("no volumes")?;
        let token = volumes
            .iter()
            .find(|v| v.name == IDENTITY_VOLUME)
            .and_then(|v| v.projected.clone())
            .ok_or("no projected token volume")?;
        let source = token.sources.unwrap_or_default()[0]
            .service_account_token
            .clone()
            .ok_or("no serviceAccountToken source")?;
        assert_eq!(source.audience.as_deref(), Some(IDENTITY_AUDIENCE));
        let mounts = sidecar.volume_mounts.clone().unwrap_or_default();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == IDENTITY_VOLUME && m.mount_path == IDENTITY_TOKEN_DIR)
        );

        let mut clash = asking.clone();
        clash.spec.get_or_insert_default().volumes = Some(vec![serde_json::from_value(
            json!({"name": IDENTITY_VOLUME, "emptyDir": {}}),
        )?]);
        let error = inject(&clash, &with_identity).unwrap_err();
        assert!(error.contains(IDENTITY_VOLUME), "{error}");
        Ok(())
    }
}
