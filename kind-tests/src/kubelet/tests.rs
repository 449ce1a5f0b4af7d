use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

fn images() -> Images {
    Images::default().with(
        "ferry-sidecar:test",
        PathBuf::from("/build/ferry-sidecar"),
        "/usr/local/bin/ferry-sidecar",
    )
}

fn field(path: &str) -> Value {
    json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}})
}

/// A bound pod with its IP, shaped as the API server returns an injected one.
fn bound_pod() -> Value {
    json!({
        "metadata": {"name": "p1", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}},
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": "orders",
            "securityContext": {},
            "initContainers": [{
                "name": "ferry-sidecar",
                "image": "ferry-sidecar:test",
                "imagePullPolicy": "IfNotPresent",
                "restartPolicy": "Always",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "resources": {},
                "args": ["--pod=$(FERRY_POD_NAME)"],
                "ports": [
                    {"name": "ferry-peer", "containerPort": 7710, "protocol": "TCP"},
                    {"name": "ferry-admin", "containerPort": 7790, "protocol": "TCP"},
                ],
                "env": [
                    {"name": "FERRY_POD_NAME", "valueFrom": field("metadata.name")},
                    {"name": "FERRY_NAMESPACE", "valueFrom": field("metadata.namespace")},
                    {"name": "FERRY_NODE", "valueFrom": field("spec.nodeName")},
                    {"name": "FERRY_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
                    {"name": "FERRY_POD_IP", "valueFrom": field("status.podIP")},
                    {"name": "APP", "valueFrom": field("metadata.labels['app']")},
                    {"name": "NO_LABEL", "valueFrom": field("metadata.labels['none']")},
                    {"name": "FERRY_ADVERTISE_ADDR", "value": "$(FERRY_POD_IP):7710"},
                    {"name": "LITERAL", "value": "$$(FERRY_POD_IP) $(UNDEFINED) $(LATER)"},
                    {"name": "LATER", "value": "x"},
                ],
                "volumeMounts": [
                    {"name": "identity", "mountPath": "/var/run/secrets/ferry.dev/identity"},
                    {"name": "ferry-data", "mountPath": "/var/lib/ferry"},
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/readyz", "port": "ferry-admin", "scheme": "HTTP"},
                    "periodSeconds": 2, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3,
                },
                "startupProbe": {"httpGet": {"path": "/healthz", "port": 7790}},
            }],
            "containers": [{"name": "app", "image": "app"}],
            "volumes": [
                {"name": "ferry-data", "emptyDir": {}},
                {"name": "identity", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"audience": "ferry.dev/identity", "expirationSeconds": 900, "path": "token"}},
                ]}},
                {"name": "unused", "hostPath": {"path": "/etc"}},
            ],
        },
        "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]},
    })
}

fn plan_of(pod: &Value) -> Result<ContainerPlan, SpecError> {
    let pod: Pod = serde_json::from_value(pod.clone()).map_err(|e| SpecError::Invalid {
        field: "test pod".into(),
        detail: e.to_string(),
    })?;
    plan(&pod, "ferry-sidecar", &images())
}

fn container(pod: &mut Value) -> &mut Value {
    &mut pod["spec"]["initContainers"][0]
}

#[test]
fn the_injected_container_resolves_from_the_bound_pod() -> Result<(), SpecError> {
    let plan = plan_of(&bound_pod())?;
    assert_eq!(plan.program, PathBuf::from("/build/ferry-sidecar"));
    assert_eq!(plan.args, ["--pod=p1"]);
    let env: BTreeMap<&str, &str> = plan
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env["FERRY_POD_NAME"], "p1");
    assert_eq!(env["FERRY_NAMESPACE"], "ns");
    assert_eq!(env["FERRY_NODE"], "node-a");
    assert_eq!(env["FERRY_SERVICE_ACCOUNT"], "orders");
    assert_eq!(env["APP"], "a");
    assert_eq!(
        env["NO_LABEL"], "",
        "a missing label is empty, as in Kubernetes"
    );
    assert_eq!(env["FERRY_ADVERTISE_ADDR"], "10.1.0.5:7710");
    assert_eq!(
        env["LITERAL"], "$(FERRY_POD_IP) $(UNDEFINED) $(LATER)",
        "$$ escapes; undefined and later variables stay as written"
    );
    assert_eq!(plan.ports["ferry-admin"], 7790);
    assert_eq!(
        (plan.uid.as_str(), plan.service_account.as_str()),
        ("u-1", "orders")
    );
    let readiness = plan.readiness.as_ref().ok_or(SpecError::Missing {
        field: "readiness".into(),
    })?;
    assert_eq!(
        readiness.http,
        HttpGet {
            path: "/readyz".into(),
            port: 7790
        }
    );
    assert_eq!(readiness.period, Duration::from_secs(2));
    let startup = plan.startup.as_ref().ok_or(SpecError::Missing {
        field: "startup".into(),
    })?;
    assert_eq!(
        (startup.period, startup.failure_threshold),
        (Duration::from_secs(10), 3)
    );
    // Only the volumes it mounts, parents before children; hostPath is another
    // container's business.
    assert_eq!(plan.volumes.len(), 2);
    assert_eq!(plan.volumes["ferry-data"], Volume::EmptyDir);
    assert_eq!(
        plan.volumes["identity"],
        Volume::Projected {
            mode: 0o644,
            tokens: vec![TokenSource {
                path: "token".into(),
                audience: Some("ferry.dev/identity".into()),
                expiration_seconds: 900,
            }],
        }
    );
    let paths: Vec<_> = plan
        .mounts
        .iter()
        .map(|m| m.path.display().to_string())
        .collect();
    assert_eq!(
        paths,
        ["/var/lib/ferry", "/var/run/secrets/ferry.dev/identity"]
    );
    Ok(())
}

#[test]
fn fields_a_kubelet_always_has_must_be_set() {
    for (pointer, path) in [
        ("/status/podIP", "status.podIP"),
        ("/spec/nodeName", "spec.nodeName"),
        ("/spec/serviceAccountName", "spec.serviceAccountName"),
    ] {
        let mut pod = bound_pod();
        if let Some(value) = pod.pointer_mut(pointer) {
            *value = Value::Null;
        }
        if pointer == "/status/podIP" {
            pod["status"]["podIPs"] = Value::Null;
        }
        let error = plan_of(&pod).unwrap_err();
        assert!(matches!(error, SpecError::Missing { .. }), "{error}");
        assert!(error.to_string().contains(path), "{error}");
        assert!(
            error.to_string().contains("env[FERRY_"),
            "names the variable: {error}"
        );
    }
}

#[test]
fn fields_the_harness_cannot_honour_are_named() {
    let cases: [(&str, Value, &str); 10] = [
        (
            "/spec/volumes/0",
            json!({"name": "ferry-data", "hostPath": {"path": "/x"}}),
            "spec.volumes[ferry-data].hostPath",
        ),
        (
            "/spec/volumes/0/emptyDir",
            json!({"medium": "Memory"}),
            "emptyDir.medium",
        ),
        (
            "/spec/volumes/0/emptyDir",
            json!({"sizeLimit": "1Gi"}),
            "emptyDir.sizeLimit",
        ),
        (
            "/spec/volumes/1/projected/sources/0",
            json!({"configMap": {"name": "c"}}),
            "projected.sources[0].configMap",
        ),
        (
            "/spec/initContainers/0/livenessProbe",
            json!({"httpGet": {"port": 7790}}),
            "[ferry-sidecar].livenessProbe",
        ),
        (
            "/spec/initContainers/0/securityContext",
            json!({"runAsNonRoot": true}),
            ".securityContext",
        ),
        (
            "/spec/initContainers/0/env/0/valueFrom",
            json!({"secretKeyRef": {"name": "s", "key": "k"}}),
            "env[FERRY_POD_NAME].valueFrom.secretKeyRef",
        ),
        (
            "/spec/initContainers/0/env/0/valueFrom/fieldRef/fieldPath",
            json!("metadata.labels"),
            "metadata.labels",
        ),
        (
            "/spec/initContainers/0/resources",
            json!({"limits": {"memory": "1Gi"}}),
            ".resources",
        ),
        ("/spec/hostNetwork", json!(true), "spec.hostNetwork"),
    ];
    for (pointer, value, named) in cases {
        let mut pod = bound_pod();
        let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
        match pod.pointer_mut(parent) {
            Some(Value::Object(map)) => {
                map.insert(key.to_owned(), value);
            }
            Some(Value::Array(list)) => {
                let index: usize = key.parse().unwrap_or_default();
                list[index] = value;
            }
            _ => panic!("{pointer}"),
        }
        let error = plan_of(&pod).unwrap_err();
        assert!(
            matches!(error, SpecError::Unsupported { .. }),
            "{pointer}: {error}"
        );
        assert!(error.to_string().contains(named), "{pointer}: {error}");
    }
}

#[test]
fn images_commands_and_ports_must_be_known() {
    let mut pod = bound_pod();
    container(&mut pod)["image"] = json!("nginx:1");
    let error = plan_of(&pod).unwrap_err().to_string();
    assert!(
        error.contains(".image") && error.contains("nginx:1"),
        "{error}"
    );

    let mut pod = bound_pod();
    container(&mut pod)["command"] = json!(["ferry-sidecar", "--verbose"]);
    assert_eq!(
        plan_of(&pod).map(|p| p.args),
        Ok(vec!["--verbose".into(), "--pod=p1".into()])
    );
    container(&mut pod)["command"] = json!(["/bin/sh", "-c", "evil"]);
    let error = plan_of(&pod).unwrap_err().to_string();
    assert!(error.contains("command[0]"), "{error}");

    let mut pod = bound_pod();
    container(&mut pod)["readinessProbe"]["httpGet"]["port"] = json!("nope");
    let error = plan_of(&pod).unwrap_err().to_string();
    assert!(error.contains("readinessProbe.httpGet.port"), "{error}");

    let mut pod = bound_pod();
    container(&mut pod)["volumeMounts"][1]["name"] = json!("gone");
    let error = plan_of(&pod).unwrap_err().to_string();
    assert!(error.contains("volumeMounts[gone]"), "{error}");

    let mut pod = bound_pod();
    container(&mut pod)["volumeMounts"][1]["subPath"] = json!("x");
    let error = plan_of(&pod).unwrap_err().to_string();
    assert!(
        error.contains("volumeMounts[ferry-data].subPath"),
        "{error}"
    );

    let pod: Pod = serde_json::from_value(bound_pod()).unwrap_or_default();
    let error = plan(&pod, "absent", &images()).unwrap_err().to_string();
    assert!(error.contains("absent"), "{error}");
}

#[test]
fn projected_tokens_get_the_api_defaults_and_safe_paths() {
    let mut pod = bound_pod();
    pod["spec"]["volumes"][1]["projected"] =
        json!({"sources": [{"serviceAccountToken": {"path": "t"}}]});
    let plan = plan_of(&pod).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        plan.volumes["identity"],
        Volume::Projected {
            mode: 0o644,
            tokens: vec![TokenSource {
                path: "t".into(),
                audience: None,
                expiration_seconds: 3600,
            }],
        }
    );
    for bad in [
        json!({"path": "../x"}),
        json!({"path": "/abs"}),
        json!({"path": "t", "expirationSeconds": 60}),
    ] {
        pod["spec"]["volumes"][1]["projected"] = json!({"sources": [{"serviceAccountToken": bad}]});
        let error = plan_of(&pod).unwrap_err();
        assert!(matches!(error, SpecError::Invalid { .. }), "{error}");
    }
}

#[test]
fn expansion_follows_kubernetes() {
    let vars: BTreeMap<String, String> = [("A".to_owned(), "1".to_owned())].into();
    let lookup = |name: &str| vars.get(name);
    for (text, expected) in [
        ("$(A)", "1"),
        ("x$(A)y$(A)", "x1y1"),
        ("$$(A)", "$(A)"),
        ("$(B)", "$(B)"),
        ("$(A", "$(A"),
        ("$A", "$A"),
        ("cost: 5$", "cost: 5$"),
        ("$$$(A)", "$1"),
    ] {
        assert_eq!(expand(text, &lookup), expected, "{text}");
    }
}

#[test]
fn tokens_are_refreshed_at_four_fifths_of_their_life() {
    assert_eq!(
        refresh_after(Duration::from_secs(600)),
        Duration::from_secs(480)
    );
    assert_eq!(
        refresh_after(Duration::from_secs(7 * 24 * 3600)),
        Duration::from_secs(24 * 3600)
    );
}
