//! Telling the sidecar the webhook injected from a container that only has its name.
//!
//! The name `ferry-sidecar` is what membership, pod records and the identity service look
//! for, so a pod may not bring its own container of that name. A pod that asks for injection
//! and already has one is admitted unchanged only when that container is the one the webhook
//! would inject for it now: that is the API server re-invoking the webhook
//! (`reinvocationPolicy: IfNeeded`) on a pod it already patched. Anything else is denied with
//! a message that names the container and the field that differs.
//!
//! Only the fields the webhook sets and the sidecar's identity depends on are compared
//! (image, command and args, env, ports, volume mounts, `restartPolicy`, and being an init
//! container), each normalised the way the API server defaults it (`fieldRef.apiVersion`,
//! port `protocol`, `readOnly: false`); fields the webhook leaves to the API server's
//! defaults (`terminationMessagePath`, ...) are not. The one mount the API server itself
//! adds to every container, the service-account token at [`SA_TOKEN_DIR`] (the
//! `ServiceAccount` admission plugin runs again on a re-invocation), is tolerated.

use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, Pod, VolumeMount};

use crate::desired::members::SIDECAR_CONTAINER;

/// Where the API server's `ServiceAccount` admission mounts the pod's API token.
pub const SA_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why a pod that does not ask for injection may not have a `ferry-sidecar` container.
pub fn not_asked() -> String {
    format!(
        "container {SIDECAR_CONTAINER:?}: the name is reserved for the sidecar Ferry injects; \
         annotate the pod ferry.dev/inject: \"true\" and let the webhook add it, or rename the container"
    )
}

/// `Ok` when the pod's `ferry-sidecar` container is `expected` (the webhook's own), else the
/// denial message.
pub fn check(pod: &Pod, expected: &Container) -> Result<(), String> {
    let deny = |why: String| {
        Err(format!(
            "container {SIDECAR_CONTAINER:?} is not the sidecar Ferry injects ({why}); \
             remove it and let the webhook inject the sidecar"
        ))
    };
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.containers.iter().any(|c| c.name == SIDECAR_CONTAINER) {
        return deny(
            "it is a plain container; the sidecar is a native sidecar, an init container".into(),
        );
    }
    let Some(actual) = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_CONTAINER)
    else {
        return Ok(());
    };
    if actual.image != expected.image {
        return deny(format!(
            "image {:?}, not {:?}",
            actual.image.as_deref().unwrap_or_default(),
            expected.image.as_deref().unwrap_or_default()
        ));
    }
    let words = |w: &Option<Vec<String>>| w.clone().unwrap_or_default();
    if words(&actual.command) != words(&expected.command) {
        return deny(format!("command {:?}", words(&actual.command)));
    }
    if words(&actual.args) != words(&expected.args) {
        return deny(format!("args {:?}", words(&actual.args)));
    }
    if actual.restart_policy != expected.restart_policy {
        return deny(format!(
            "restartPolicy {:?}, not {:?}",
            actual.restart_policy.as_deref().unwrap_or_default(),
            expected.restart_policy.as_deref().unwrap_or_default()
        ));
    }
    let env = |c: &Container| c.env.iter().flatten().map(env_var).collect::<Vec<_>>();
    if env(actual) != env(expected) {
        return deny(env_difference(&env(actual), &env(expected)));
    }
    let ports = |c: &Container| c.ports.iter().flatten().map(port).collect::<Vec<_>>();
    if ports(actual) != ports(expected) {
        return deny(format!("ports {:?}", ports(actual)));
    }
    let mounts = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.mount_path != SA_TOKEN_DIR)
            .map(mount)
            .collect::<Vec<_>>()
    };
    if mounts(actual) != mounts(expected) {
        return deny(format!("volume mounts {:?}", mounts(actual)));
    }
    Ok(())
}

/// An env entry as compared: name, value, and where a `valueFrom` takes it from.
type Env = (String, String, Option<String>);

fn env_var(e: &EnvVar) -> Env {
    let from = e.value_from.as_ref().map(|from| {
        match (&from.field_ref, &from.resource_field_ref) {
            (Some(field), None)
                if from.config_map_key_ref.is_none() && from.secret_key_ref.is_none() =>
            {
                format!("fieldRef {}", field.field_path)
            }
            // Anything else the webhook never sets: it only has to differ from `None`.
            _ => format!("{from:?}"),
        }
    });
    (e.name.clone(), e.value.clone().unwrap_or_default(), from)
}

/// The first env entry that differs, named (values are not echoed: they may be secrets).
fn env_difference(actual: &[Env], expected: &[Env]) -> String {
    for (i, want) in expected.iter().enumerate() {
        match actual.get(i) {
            Some(got) if got == want => {}
            Some(got) if got.0 == want.0 => return format!("env {} differs", want.0),
            Some(got) => return format!("env {} where {} belongs", got.0, want.0),
            None => return format!("env {} is missing", want.0),
        }
    }
    match actual.get(expected.len()) {
        Some(extra) => format!("env {} is extra", extra.0),
        None => "env differs".into(),
    }
}

fn port(p: &ContainerPort) -> (Option<String>, i32, String, Option<i32>, Option<String>) {
    (
        p.name.clone(),
        p.container_port,
        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        p.host_port,
        p.host_ip.clone(),
    )
}

fn mount(m: &VolumeMount) -> (String, String, bool, String, String, Option<String>) {
    (
        m.name.clone(),
        m.mount_path.clone(),
        m.read_only.unwrap_or(false),
        m.sub_path.clone().unwrap_or_default(),
        m.sub_path_expr.clone().unwrap_or_default(),
        m.mount_propagation.clone().filter(|p| p != "None"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::PodSpec;
    use serde_json::json;

    use super::*;
    use crate::identity::service::Published;
    use crate::webhook::inject;
    use crate::webhook::tests::{injected, injection, pod};

    type TestResult = Result<(), Box<dyn std::error::Error>>;
    /// One change to a container, for a denial test.
    type Change = fn(&mut Container);

    fn asking() -> Result<Pod, serde_json::Error> {
        pod(json!({
            "metadata": {"name": "a", "annotations": {
                "ferry.dev/inject": "true",
                "ferry.dev/sidecar-log": "debug",
            }},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        }))
    }

    fn sidecar_of(pod: &mut Pod) -> Result<&mut Container, &'static str> {
        pod.spec
            .as_mut()
            .and_then(|s| s.init_containers.as_mut())
            .and_then(|c| c.iter_mut().find(|c| c.name == SIDECAR_CONTAINER))
            .ok_or("no sidecar")
    }

    /// What the API server's defaulting and its `ServiceAccount` admission do to an
    /// injected container before a re-invocation.
    fn defaulted(pod: &mut Pod) -> Result<(), &'static str> {
        let sidecar = sidecar_of(pod)?;
        sidecar.termination_message_path = Some("/dev/termination-log".into());
        sidecar.termination_message_policy = Some("File".into());
        sidecar.image_pull_policy = Some("IfNotPresent".into());
        for env in sidecar.env.iter_mut().flatten() {
            if let Some(field) = env.value_from.as_mut().and_then(|v| v.field_ref.as_mut()) {
                field.api_version = Some("v1".into());
            }
        }
        sidecar
            .volume_mounts
            .get_or_insert_default()
            .push(VolumeMount {
                name: "kube-api-access-x7k2p".into(),
                mount_path: SA_TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        Ok(())
    }

    #[test]
    fn a_reinvocation_on_an_injected_pod_changes_nothing() -> TestResult {
        let mut with_identity = injection();
        with_identity.identity = Some(Published {
            url: "https://ferry-identity.ferry-system.svc:8444".into(),
            server: "spiffe://ferry.local/ns/ferry-system/sa/ferry-operator".parse()?,
            trust_bundle: Arc::new(std::sync::RwLock::new("PEM".into())),
        });
        for injection in [injection(), with_identity] {
            let mut once = injected(&asking()?, &injection)?;
            assert_eq!(inject(&once, &injection), Ok(None), "as patched");
            defaulted(&mut once)?;
            assert_eq!(
                inject(&once, &injection),
                Ok(None),
                "as the API server stores it"
            );
        }
        Ok(())
    }

    /// The denial of `pod`, which must name the container.
    fn denial(pod: &Pod) -> Result<String, Box<dyn std::error::Error>> {
        let error = match inject(pod, &injection()) {
            Err(error) => error,
            Ok(patch) => return Err(format!("admitted with patch {patch:?}").into()),
        };
        assert!(error.contains("\"ferry-sidecar\""), "{error}");
        Ok(error)
    }

    #[test]
    fn a_pod_bringing_its_own_sidecar_is_denied() -> TestResult {
        // Its own container of that name, another image: what a spoofer writes.
        let mut own = asking()?;
        own.spec.get_or_insert_default().init_containers = Some(vec![serde_json::from_value(
            json!({"name": "ferry-sidecar", "image": "evil:latest", "restartPolicy": "Always"}),
        )?]);
        let error = denial(&own)?;
        assert!(error.contains("evil:latest"), "{error}");

        // The injected container with one thing changed, each in turn.
        let injected = injected(&asking()?, &injection())?;
        let changes: [(&str, Change); 6] = [
            ("args", |c| c.args = Some(vec!["--debug-shell".into()])),
            ("command", |c| c.command = Some(vec!["/bin/sh".into()])),
            ("env FERRY_NAMESPACE", |c| {
                if let Some(e) = c
                    .env
                    .iter_mut()
                    .flatten()
                    .find(|e| e.name == "FERRY_NAMESPACE")
                {
                    e.value_from = None;
                    e.value = Some("kube-system".into());
                }
            }),
            ("env FERRY_EXTRA", |c| {
                c.env.get_or_insert_default().push(EnvVar {
                    name: "FERRY_EXTRA".into(),
                    value: Some("1".into()),
                    ..EnvVar::default()
                });
            }),
            ("restartPolicy", |c| c.restart_policy = None),
            ("volume mounts", |c| {
                c.volume_mounts.get_or_insert_default().push(VolumeMount {
                    name: "host".into(),
                    mount_path: "/host".into(),
                    ..VolumeMount::default()
                });
            }),
        ];
        for (what, change) in changes {
            let mut pod = injected.clone();
            change(sidecar_of(&mut pod)?);
            let error = denial(&pod)?;
            assert!(error.contains(what), "{what}: {error}");
        }
        let mut ports = injected.clone();
        sidecar_of(&mut ports)?.ports.get_or_insert_default()[0].host_port = Some(7710);
        assert!(denial(&ports)?.contains("ports"));

        // The very container the webhook injects, but as a plain container.
        let mut plain = injected.clone();
        let sidecar = sidecar_of(&mut plain)?.clone();
        let spec = plain.spec.get_or_insert_default();
        spec.init_containers = None;
        spec.containers.push(sidecar);
        assert!(denial(&plain)?.contains("plain container"));
        Ok(())
    }

    #[test]
    fn a_pod_not_asking_may_not_name_a_container_ferry_sidecar() -> TestResult {
        let injected = injected(&asking()?, &injection())?;
        let mut not_asking = injected.clone();
        not_asking.metadata.annotations = None;
        denial(&not_asking)?;

        let mut plain =
            pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app"}]}}))?;
        assert_eq!(inject(&plain, &injection()), Ok(None));
        plain.spec = Some(PodSpec {
            containers: vec![serde_json::from_value(json!({"name": "ferry-sidecar"}))?],
            ..PodSpec::default()
        });
        denial(&plain)?;
        Ok(())
    }
}
