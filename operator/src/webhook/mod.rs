//! The mutating admission webhook that injects the sidecar into pods that ask for it.
//!
//! A pod annotated `ferry.dev/inject: "true"` gets the sidecar as a **native sidecar**: an
//! init container named `ferry-sidecar` with `restartPolicy: Always`, placed first so
//! that it is up before the other init containers and the app start, and stopped after
//! the app. It also gets an `emptyDir` volume for the sidecar's log. A pod that already
//! has a `ferry-sidecar` container is left alone, so the webhook is idempotent (the API
//! server may call it twice with `reinvocationPolicy: IfNeeded`).
//!
//! Every replica serves it, leader or not: admission must not wait for an election.
//! It serves TLS only ([`tls`]), on `--webhook-addr`, with the certificate in
//! `--webhook-cert-dir`, re-read when the files change (rotation without a restart).
//! The `MutatingWebhookConfiguration` (in the Helm chart) should select Pods on CREATE,
//! exclude system namespaces, and fail closed (`failurePolicy: Fail`) only for
//! namespaces that opted in.

pub mod tls;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use ferry_api::consts::{INJECT_ANNOTATION, SIDECAR_ADMIN_PORT};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::desired::members::{SIDECAR_CONTAINER, carries_sidecar};

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

/// What the injected container needs to know.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The sidecar image.
    pub image: String,
    /// Sidecar peer port (`FERRY_PEER_ADDR`, `FERRY_ADVERTISE_ADDR`).
    pub peer_port: u16,
    /// etcd endpoints the sidecar follows the routing table from.
    pub etcd_endpoints: Vec<String>,
}

/// The JSON patch that injects the sidecar, or `None` when the pod did not ask for it or
/// already has it.
pub fn inject(pod: &Pod, injection: &Injection) -> Option<Value> {
    let asked = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some_and(|v| v == "true");
    if !asked || carries_sidecar(pod) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = |name: &str, mut value: Value| {
        if let Some(obj) = value.as_object_mut() {
            obj.insert("name".into(), json!(name));
        }
        value
    };
    let port = injection.peer_port;
    let container = json!({
        "name": SIDECAR_CONTAINER,
        "image": injection.image,
        "restartPolicy": "Always",
        "ports": [
            {"name": PEER_PORT_NAME, "containerPort": port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": SIDECAR_ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": [
            env("FERRY_POD_NAME", field("metadata.name")),
            env("FERRY_NAMESPACE", field("metadata.namespace")),
            env("FERRY_NODE", field("spec.nodeName")),
            env("FERRY_SERVICE_ACCOUNT", field("spec.serviceAccountName")),
            env("FERRY_POD_IP", field("status.podIP")),
            env("FERRY_PEER_ADDR", json!({"value": format!("0.0.0.0:{port}")})),
            env("FERRY_ADVERTISE_ADDR", json!({"value": format!("$(FERRY_POD_IP):{port}")})),
            env("FERRY_DATA_DIR", json!({"value": DATA_DIR})),
            env("FERRY_ETCD_ENDPOINTS", json!({"value": injection.etcd_endpoints.join(",")})),
        ],
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": DATA_DIR}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME}, "periodSeconds": 2},
    });
    let mut ops = Vec::new();
    match &spec.init_containers {
        Some(init) if !init.is_empty() => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
        }
        _ => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]})),
    }
    let volume = json!({"name": DATA_VOLUME, "emptyDir": {}});
    match &spec.volumes {
        Some(volumes) if volumes.iter().any(|v| v.name == DATA_VOLUME) => {}
        Some(volumes) if !volumes.is_empty() => {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
        _ => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
    }
    Some(Value::Array(ops))
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
    if let Some(patch) = inject(pod, &injection) {
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

    fn injection() -> Injection {
        Injection {
            image: "ferry-sidecar:test".into(),
            peer_port: 7710,
            etcd_endpoints: vec!["http://etcd:2379".into()],
        }
    }

    fn pod(manifest: Value) -> Result<Pod, serde_json::Error> {
        serde_json::from_value(manifest)
    }

    #[test]
    fn only_pods_that_ask_get_the_sidecar_once() -> Result<(), Box<dyn std::error::Error>> {
        let plain =
            pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app"}]}}))?;
        assert_eq!(inject(&plain, &injection()), None);

        let asking = pod(json!({
            "metadata": {"name": "a", "annotations": {"ferry.dev/inject": "true"}},
            "spec": {"containers": [{"name": "app"}], "volumes": [{"name": "x", "emptyDir": {}}]}
        }))?;
        let patch = inject(&asking, &injection()).ok_or("no patch")?;
        let mut doc = serde_json::to_value(&asking)?;
        json_patch::patch(
            &mut doc,
            &serde_json::from_value::<json_patch::Patch>(patch)?,
        )?;
        let injected: Pod = serde_json::from_value(doc)?;
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
        assert_eq!(inject(&again, &injection()), None, "idempotent");
        Ok(())
    }
}
