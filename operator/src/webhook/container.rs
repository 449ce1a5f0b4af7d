//! The sidecar container the webhook injects, built from the operator's [`Injection`] and
//! the pod's [`Overrides`]. It depends on nothing else of the pod, so the webhook can build
//! it again to recognise its own work on a re-invocation ([`super::spoof`]).

use ferry_api::consts::{
    IDENTITY_AUDIENCE, IDENTITY_TOKEN_DIR, IDENTITY_TOKEN_FILE, IDENTITY_TOKEN_PATH,
};
use k8s_openapi::api::core::v1::ResourceRequirements;
use serde_json::{Value, json};

use super::overrides::Overrides;
use super::{ADMIN_PORT_NAME, DATA_DIR, DATA_VOLUME, IDENTITY_VOLUME, Injection, PEER_PORT_NAME};
use crate::desired::members::SIDECAR_CONTAINER;
use crate::identity::service::Published;

/// Lifetime the kubelet gives the projected token (it refreshes it at 80 %).
const IDENTITY_TOKEN_SECONDS: i64 = 3600;

/// The projected service-account token volume the sidecar proves its pod with.
pub fn identity_volume() -> Value {
    json!({"name": IDENTITY_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "audience": IDENTITY_AUDIENCE,
        "expirationSeconds": IDENTITY_TOKEN_SECONDS,
        "path": IDENTITY_TOKEN_FILE,
    }}]}})
}

/// The env entries and mount that give the sidecar its identity.
fn identity_parts(published: &Published) -> (Vec<Value>, Value) {
    let env = |name: &str, value: &str| json!({"name": name, "value": value});
    let env = vec![
        env("FERRY_IDENTITY_URL", &published.url),
        env("FERRY_IDENTITY_SERVER", &published.server.to_string()),
        env(
            "FERRY_IDENTITY_TRUST_ANCHORS",
            &published.trust_bundle_pem(),
        ),
        env("FERRY_IDENTITY_TOKEN_FILE", IDENTITY_TOKEN_PATH),
    ];
    let mount = json!({"name": IDENTITY_VOLUME, "mountPath": IDENTITY_TOKEN_DIR, "readOnly": true});
    (env, mount)
}

/// The volume that holds the sidecar's data: the pod's own when an annotation names one.
pub fn data_volume_name(overrides: &Overrides) -> String {
    overrides
        .data_volume
        .clone()
        .unwrap_or_else(|| DATA_VOLUME.to_owned())
}

/// The sidecar container, as JSON for the patch.
pub fn sidecar(injection: &Injection, overrides: &Overrides) -> Value {
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = |name: &str, mut value: Value| {
        if let Some(obj) = value.as_object_mut() {
            obj.insert("name".into(), json!(name));
        }
        value
    };
    let port = injection.peer_port;
    let mut settings = injection.env.clone();
    settings.insert("FERRY_PEER_ADDR".into(), format!("0.0.0.0:{port}"));
    if let Some(log) = &overrides.log {
        settings.insert("FERRY_LOG".into(), log.clone());
    }
    // No zone or node: the sidecar learns both from its pod record, which the operator
    // writes once the pod is scheduled (the zone is a label of the node, which the downward
    // API cannot read). The name and namespace say which record is its own.
    let mut env_list = vec![
        env("FERRY_POD_NAME", field("metadata.name")),
        env("FERRY_NAMESPACE", field("metadata.namespace")),
        env("FERRY_SERVICE_ACCOUNT", field("spec.serviceAccountName")),
        env("FERRY_POD_IP", field("status.podIP")),
        env(
            "FERRY_ADVERTISE_ADDR",
            json!({"value": format!("$(FERRY_POD_IP):{port}")}),
        ),
        env("FERRY_DATA_DIR", json!({"value": DATA_DIR})),
    ];
    // With the identity service, the routing table comes from the operator's routing
    // service on the same port (the pod's scoped view, over mutual TLS): the sidecar never
    // talks to etcd. Without it, the sidecar follows etcd itself.
    match &injection.identity {
        Some(published) => env_list.push(env("FERRY_ROUTING_URL", json!({"value": published.url}))),
        None => env_list.push(env(
            "FERRY_ETCD_ENDPOINTS",
            json!({"value": injection.etcd_endpoints.join(",")}),
        )),
    }
    env_list.extend(settings.iter().map(|(k, v)| env(k, json!({ "value": v }))));
    let mut mounts = vec![json!({"name": data_volume_name(overrides), "mountPath": DATA_DIR})];
    if let Some((identity_env, mount)) = injection.identity.as_ref().map(identity_parts) {
        env_list.extend(identity_env);
        mounts.push(mount);
    }
    let mut resources = injection.resources.clone().unwrap_or_default();
    if !overrides.requests.is_empty() {
        resources
            .requests
            .get_or_insert_with(Default::default)
            .extend(overrides.requests.clone());
    }
    if !overrides.limits.is_empty() {
        resources
            .limits
            .get_or_insert_with(Default::default)
            .extend(overrides.limits.clone());
    }
    let mut container = json!({
        "name": SIDECAR_CONTAINER,
        "image": injection.image,
        "restartPolicy": "Always",
        "ports": [
            {"name": PEER_PORT_NAME, "containerPort": port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": injection.admin_port, "protocol": "TCP"},
        ],
        "env": env_list,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME}, "periodSeconds": 2},
    });
    if let Some(obj) = container.as_object_mut() {
        if let Some(policy) = &injection.image_pull_policy {
            obj.insert("imagePullPolicy".into(), json!(policy));
        }
        if resources != ResourceRequirements::default() {
            obj.insert("resources".into(), json!(resources));
        }
    }
    container
}
