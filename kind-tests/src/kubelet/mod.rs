//! The suite's kubelet: it turns one container of a bound Pod, as the API server returns it
//! (after the injection webhook mutated it), into a process, so that the end-to-end suite
//! runs exactly what a cluster would run and nothing the test harness made up.
//!
//! Resolution ([`plan`]) is pure and strict: the container's command and args (the image
//! mapped to a built binary by [`Images`]), its env (`value` with `$(VAR)` expansion, and
//! downward-API `fieldRef`s read from the bound pod), the volumes it mounts, its ports and
//! its startup and readiness probes. Any field the harness cannot honour is an error that
//! names it ([`SpecError`]), never silently dropped: a webhook change that the suite does not
//! run fails the suite instead of testing something else.
//!
//! Running ([`Sandbox`], [`container_command`], [`wait_started`]) is what a kubelet and a
//! container runtime do with the plan: volumes as folders of the pod (an `emptyDir` is an
//! empty folder, a projected `serviceAccountToken` is a token from the TokenRequest API
//! bound to the pod, refreshed before it expires), bind-mounted at the container's
//! `mountPath` in a mount namespace of the process's own, inside the pod's network
//! namespace, with only the container's environment; then the probes, on the pod IP.
//!
//! Only the containers the plan is asked for are run from their spec; volumes no such
//! container mounts are not made.

mod env;
mod probe;
mod runtime;
mod tokens;
mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;

pub use env::{expand, field_ref};
pub use probe::{HttpGet, Probe, probe_once, wait_started};
pub use runtime::{Sandbox, container_command};
pub use tokens::refresh_after;
pub use volumes::{Mount, TokenSource, Volume};

/// What is wrong with a pod spec for this kubelet; `field` is the JSON path of the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A field the harness cannot honour (it would be silently dropped otherwise).
    #[error("{field}: the e2e kubelet cannot honour this ({detail})")]
    Unsupported { field: String, detail: String },
    /// A field the container depends on that the pod does not have (yet).
    #[error("{field} is not set")]
    Missing { field: String },
    /// A field whose value cannot be used.
    #[error("{field}: {detail}")]
    Invalid { field: String, detail: String },
}

impl SpecError {
    fn unsupported(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Unsupported {
            field: field.into(),
            detail: detail.into(),
        }
    }

    fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// A container image as this machine has it: the built binary its entrypoint runs.
#[derive(Debug, Clone)]
pub struct Image {
    /// The binary on this machine.
    pub program: PathBuf,
    /// The entrypoint's name inside the image: a `command` may name it (or its path).
    pub entrypoint: String,
}

/// The images the harness can run, by their full reference (`repo:tag`).
#[derive(Debug, Clone, Default)]
pub struct Images(pub BTreeMap<String, Image>);

impl Images {
    /// Registers `reference` as running `program`, whose in-image name is `entrypoint`.
    pub fn with(mut self, reference: &str, program: PathBuf, entrypoint: &str) -> Self {
        self.0.insert(
            reference.to_owned(),
            Image {
                program,
                entrypoint: entrypoint.to_owned(),
            },
        );
        self
    }
}

/// One container of a pod, resolved into what a process needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// The pod's name, namespace and uid.
    pub pod: String,
    pub namespace: String,
    pub uid: String,
    /// The pod's service account (what its projected tokens are requested for).
    pub service_account: String,
    /// The container's name.
    pub container: String,
    /// The binary and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The container's whole environment, in order.
    pub env: Vec<(String, String)>,
    /// The pod's volumes that this container mounts.
    pub volumes: BTreeMap<String, Volume>,
    /// Where they are mounted, parents before children.
    pub mounts: Vec<Mount>,
    /// Container ports by name (unnamed ones under their number).
    pub ports: BTreeMap<String, u16>,
    pub startup: Option<Probe>,
    pub readiness: Option<Probe>,
}

/// Container fields the plan honours; every other field that is set is an error.
const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    // Where the image comes from does not change what runs.
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "volumeMounts",
    "startupProbe",
    "readinessProbe",
    // Native sidecar: started before the app, which the harness does.
    "restartPolicy",
    // API server defaults about where the exit message goes; nothing reads it here.
    "terminationMessagePath",
    "terminationMessagePolicy",
    // Only when empty (checked below).
    "resources",
];

/// Pod-level fields that change how a container runs and that this kubelet cannot honour
/// when set to anything but their default.
const POD_FLAGS: &[&str] = &["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"];

/// Resolves container `name` (an init container or a regular one) of `pod`, which must be
/// bound to a node and have its IP (set them first, as a kubelet runs nothing before).
pub fn plan(pod: &Pod, name: &str, images: &Images) -> Result<ContainerPlan, SpecError> {
    let spec = pod.spec.as_ref().ok_or_else(|| SpecError::Missing {
        field: "spec".into(),
    })?;
    let (list, container) = find_container(pod, name)?;
    let at = format!("spec.{list}[{name}]");
    let json = serde_json::to_value(container)
        .map_err(|e| SpecError::invalid(&at, format!("not serializable: {e}")))?;
    only(&json, &at, CONTAINER_FIELDS)?;
    if let Some(resources) = json.get("resources")
        && !is_empty(resources)
    {
        return Err(SpecError::unsupported(
            format!("{at}.resources"),
            "requests and limits are not enforced",
        ));
    }
    if let Some(policy) = &container.restart_policy
        && (list != "initContainers" || policy != "Always")
    {
        return Err(SpecError::unsupported(
            format!("{at}.restartPolicy"),
            format!("{policy:?}: only native sidecars (init containers with Always) are run"),
        ));
    }
    let pod_json = serde_json::to_value(spec)
        .map_err(|e| SpecError::invalid("spec", format!("not serializable: {e}")))?;
    for flag in POD_FLAGS {
        if pod_json.get(*flag).is_some_and(|v| v == &Value::Bool(true)) {
            return Err(SpecError::unsupported(
                format!("spec.{flag}"),
                "pods run in a network namespace of their own",
            ));
        }
    }
    if let Some(context) = pod_json.get("securityContext")
        && !is_empty(context)
    {
        return Err(SpecError::unsupported(
            "spec.securityContext",
            "processes run as the test's user",
        ));
    }
    let metadata = |field: &str, value: &Option<String>| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| SpecError::Missing {
                field: field.into(),
            })
    };
    let env = env::resolve(pod, container, &at)?;
    let image = metadata(&format!("{at}.image"), &container.image)?;
    let known = images.0.get(&image).ok_or_else(|| {
        SpecError::invalid(
            format!("{at}.image"),
            format!(
                "no binary is known for image {image:?} (known: {:?})",
                images.0.keys().collect::<Vec<_>>()
            ),
        )
    })?;
    let lookup = |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
    let mut args: Vec<String> = Vec::new();
    if let Some(command) = &container.command {
        let (first, rest) = command.split_first().ok_or_else(|| {
            SpecError::invalid(format!("{at}.command"), "an empty command runs nothing")
        })?;
        let basename = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
        if basename(first) != basename(&known.entrypoint) {
            return Err(SpecError::unsupported(
                format!("{at}.command[0]"),
                format!(
                    "{first:?}: image {image:?} has only its entrypoint {:?}",
                    known.entrypoint
                ),
            ));
        }
        args.extend(rest.iter().map(|a| expand(a, &lookup)));
    }
    args.extend(container.args.iter().flatten().map(|a| expand(a, &lookup)));
    let mut ports = BTreeMap::new();
    for port in container.ports.iter().flatten() {
        let field = format!("{at}.ports[{}]", port.container_port);
        only(
            &serde_json::to_value(port).unwrap_or_default(),
            &field,
            &["name", "containerPort", "protocol"],
        )?;
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            return Err(SpecError::unsupported(
                format!("{field}.protocol"),
                "only TCP",
            ));
        }
        let number = u16::try_from(port.container_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| SpecError::invalid(&field, "not a port number"))?;
        let key = port.name.clone().unwrap_or_else(|| number.to_string());
        ports.insert(key, number);
    }
    let (volumes, mounts) = volumes::resolve(spec, container, &at)?;
    let startup = probe::resolve(
        container.startup_probe.as_ref(),
        &ports,
        &format!("{at}.startupProbe"),
    )?;
    let readiness = probe::resolve(
        container.readiness_probe.as_ref(),
        &ports,
        &format!("{at}.readinessProbe"),
    )?;
    Ok(ContainerPlan {
        pod: metadata("metadata.name", &pod.metadata.name)?,
        namespace: metadata("metadata.namespace", &pod.metadata.namespace)?,
        uid: metadata("metadata.uid", &pod.metadata.uid)?,
        service_account: spec.service_account_name.clone().unwrap_or_default(),
        container: name.to_owned(),
        program: known.program.clone(),
        args,
        env,
        volumes,
        mounts,
        ports,
        startup,
        readiness,
    })
}

/// The container called `name` and the list it is in.
fn find_container<'a>(
    pod: &'a Pod,
    name: &str,
) -> Result<(&'static str, &'a Container), SpecError> {
    let spec = pod.spec.as_ref().ok_or_else(|| SpecError::Missing {
        field: "spec".into(),
    })?;
    if let Some(c) = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
    {
        return Ok(("initContainers", c));
    }
    if let Some(c) = spec.containers.iter().find(|c| c.name == name) {
        return Ok(("containers", c));
    }
    Err(SpecError::Missing {
        field: format!("spec.initContainers[{name}]"),
    })
}

/// Fails naming the first key of `object` outside `allowed`.
fn only(object: &Value, at: &str, allowed: &[&str]) -> Result<(), SpecError> {
    if let Some(map) = object.as_object() {
        for (key, value) in map {
            if !allowed.contains(&key.as_str()) && !value.is_null() {
                return Err(SpecError::unsupported(
                    format!("{at}.{key}"),
                    "not implemented by the e2e kubelet",
                ));
            }
        }
    }
    Ok(())
}

/// `{}`, `[]`, `null`, or an object of only such values.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().all(is_empty),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
