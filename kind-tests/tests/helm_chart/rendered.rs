//! What `helm template` renders, checked against the design and the operator: the CRDs,
//! the operator's `FERRY_*` variables, probes, the webhook's namespace exclusions and
//! least-privilege RBAC.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::NAMESPACE;

/// The operator's flags and their `FERRY_*` variables.
const OPERATOR_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../operator/src/config.rs");

/// The rendered objects, empty documents dropped.
pub fn objects(yaml: &str) -> Result<Vec<Value>> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(yaml).context("parsing helm template's output")?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

pub fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

pub fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// The one object of `kind`; fails when there is none or more than one.
pub fn one<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = objects.iter().filter(|o| kind_of(o) == kind).collect();
    match found.as_slice() {
        [object] => Ok(object),
        _ => bail!("expected one {kind}, found {}", found.len()),
    }
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Every `env = "FERRY_..."` of the operator's clap struct.
fn operator_env_vars() -> Result<BTreeSet<String>> {
    let source = std::fs::read_to_string(OPERATOR_CONFIG)
        .with_context(|| format!("reading {OPERATOR_CONFIG}"))?;
    let vars: BTreeSet<String> = source
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|name| name.starts_with("FERRY_"))
        .map(str::to_owned)
        .collect();
    ensure!(
        vars.contains("FERRY_ETCD_ENDPOINTS"),
        "no FERRY_ETCD_ENDPOINTS flag found in {OPERATOR_CONFIG}"
    );
    Ok(vars)
}

/// Checks the rendered chart against the design; `operators` and `etcd_members` are the
/// replica counts the values asked for.
pub fn check_rendered(objects: &[Value], operators: u64, etcd_members: u64) -> Result<()> {
    // The CRDs come along with --include-crds, the same as the generated ones.
    let crds: BTreeSet<&str> = objects
        .iter()
        .filter(|o| kind_of(o) == "CustomResourceDefinition")
        .map(name_of)
        .collect();
    let expected: BTreeSet<&str> = [
        "consumergroups.ferry.dev",
        "subscriptions.ferry.dev",
        "topics.ferry.dev",
    ]
    .into();
    ensure!(crds == expected, "rendered CRDs: {crds:?}");
    for object in objects {
        if kind_of(object) != "CustomResourceDefinition"
            && object["metadata"]["namespace"].as_str().is_some()
        {
            ensure!(
                object["metadata"]["namespace"] == NAMESPACE,
                "{} {} is not in {NAMESPACE}",
                kind_of(object),
                name_of(object)
            );
        }
    }
    ensure!(
        !objects.iter().any(|o| kind_of(o) == "ServiceMonitor"),
        "a ServiceMonitor is rendered although metrics.serviceMonitor.enabled is false"
    );

    // The operator: replicas, FERRY_* variables that the operator really reads, probes,
    // non-root with a read-only root filesystem, resources.
    let deployment = one(objects, "Deployment")?;
    ensure!(deployment["spec"]["replicas"] == operators);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let known = operator_env_vars()?;
    let mut env = BTreeSet::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default();
        if name.starts_with("FERRY_") {
            ensure!(
                known.contains(name),
                "the chart sets {name}, which ferry-operator does not read (it reads {known:?})"
            );
        }
        env.insert(name.to_owned());
    }
    for required in [
        "FERRY_ETCD_ENDPOINTS",
        "FERRY_LEASE_NAME",
        "FERRY_LEASE_NAMESPACE",
        "FERRY_WEBHOOK_CERT_DIR",
        "FERRY_SIDECAR_IMAGE",
    ] {
        ensure!(env.contains(required), "the operator gets no {required}");
    }
    let endpoints = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "FERRY_ETCD_ENDPOINTS")
        .and_then(|v| v["value"].as_str())
        .unwrap_or_default();
    ensure!(
        endpoints.split(',').count() as u64 == etcd_members
            && endpoints
                .split(',')
                .all(|e| e.starts_with("http://ferry-etcd-") && e.ends_with(":2379")),
        "FERRY_ETCD_ENDPOINTS={endpoints:?} does not list the {etcd_members} etcd member(s)"
    );
    ensure!(container["livenessProbe"]["httpGet"]["path"] == "/healthz");
    ensure!(container["readinessProbe"]["httpGet"]["path"] == "/readyz");
    let ports: BTreeSet<u64> = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    ensure!(
        ports == [8080, 8443, 8444].into(),
        "operator ports (metrics, webhook, identity): {ports:?}"
    );
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true);
    ensure!(container["securityContext"]["allowPrivilegeEscalation"] == false);
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    ensure!(container["resources"]["requests"].is_object());

    // etcd: a StatefulSet with a headless Service and a volume per member.
    let etcd = one(objects, "StatefulSet")?;
    ensure!(etcd["spec"]["replicas"] == etcd_members);
    let headless = etcd["spec"]["serviceName"].as_str().unwrap_or_default();
    ensure!(
        objects.iter().any(|o| kind_of(o) == "Service"
            && name_of(o) == headless
            && o["spec"]["clusterIP"] == "None"),
        "no headless Service {headless:?} for etcd"
    );
    ensure!(
        etcd["spec"]["volumeClaimTemplates"]
            .as_array()
            .is_some_and(|v| v.len() == 1),
        "etcd has no volume claim template"
    );
    let initial_cluster = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix("--initial-cluster="))
        .unwrap_or_default();
    ensure!(
        initial_cluster.split(',').count() as u64 == etcd_members,
        "--initial-cluster={initial_cluster:?} for {etcd_members} member(s)"
    );

    // The webhook: fails closed, never for the system namespaces or its own, TLS with a CA.
    let webhook_config = one(objects, "MutatingWebhookConfiguration")?;
    let webhook = &webhook_config["webhooks"][0];
    ensure!(webhook["failurePolicy"] == "Fail");
    ensure!(webhook["clientConfig"]["service"]["path"] == "/mutate-pods");
    ensure!(webhook["clientConfig"]["service"]["port"] == 8443);
    ensure!(
        webhook["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|ca| ca.len() > 100),
        "the webhook has no caBundle"
    );
    let excluded = webhook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
        .map(|e| strings(&e["values"]))
        .unwrap_or_default();
    for namespace in ["kube-system", "kube-public", "kube-node-lease", NAMESPACE] {
        ensure!(
            excluded.contains(namespace),
            "the webhook does not exclude {namespace} (excluded: {excluded:?})"
        );
    }
    let service = webhook["clientConfig"]["service"]["name"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        objects.iter().any(|o| kind_of(o) == "Service"
            && name_of(o) == service
            && o["spec"]["ports"][0]["port"] == 8443),
        "no webhook Service {service:?} on 8443"
    );
    let secret = objects
        .iter()
        .find(|o| kind_of(o) == "Secret")
        .context("no webhook TLS Secret")?;
    ensure!(secret["data"]["ca.crt"] == webhook["clientConfig"]["caBundle"]);

    // Sidecar defaults for the webhook: the design's ports.
    let config = one(objects, "ConfigMap")?;
    let sidecar = config["data"]["sidecar.yaml"].as_str().unwrap_or_default();
    for port in ["7700", "7701", "7710", "7790"] {
        ensure!(
            sidecar.contains(port),
            "sidecar defaults lack port {port}:\n{sidecar}"
        );
    }

    // Least privilege: no wildcards, no secrets, status and finalizers of the three kinds.
    let role = one(objects, "ClusterRole")?;
    let rules = role["rules"]
        .as_array()
        .context("ClusterRole without rules")?;
    let mut resources = BTreeSet::new();
    for rule in rules {
        let verbs = strings(&rule["verbs"]);
        ensure!(
            !verbs.contains("*") && !verbs.contains("delete"),
            "rule {rule}"
        );
        resources.extend(strings(&rule["resources"]));
    }
    for kind in ["topics", "consumergroups", "subscriptions"] {
        for resource in [
            kind.to_owned(),
            format!("{kind}/status"),
            format!("{kind}/finalizers"),
        ] {
            ensure!(
                resources.contains(&resource),
                "the ClusterRole lacks {resource}"
            );
        }
    }
    ensure!(
        !resources.contains("*") && !resources.contains("secrets"),
        "ClusterRole resources: {resources:?}"
    );
    ensure!(
        resources.contains("tokenreviews"),
        "the identity service needs TokenReviews: {resources:?}"
    );
    // Namespaced Roles: the Lease, and the identity CA's one Secret (get by name only).
    for role in objects.iter().filter(|o| kind_of(o) == "Role") {
        for rule in role["rules"].as_array().into_iter().flatten() {
            let resources = strings(&rule["resources"]);
            let verbs = strings(&rule["verbs"]);
            let ok = resources == ["leases".to_owned()].into()
                || (resources == ["secrets".to_owned()].into()
                    && (verbs == ["create".to_owned()].into()
                        || (verbs == ["get".to_owned()].into()
                            && strings(&rule["resourceNames"])
                                == ["ferry-identity-ca".to_owned()].into())));
            ensure!(
                ok,
                "Role {} grants more than it needs: {rule}",
                name_of(role)
            );
        }
    }

    // The identity service: its Service, and the operator told where sidecars reach it.
    ensure!(
        objects.iter().any(|o| kind_of(o) == "Service"
            && name_of(o).ends_with("-identity")
            && o["spec"]["ports"][0]["port"] == 8444),
        "no identity Service on 8444"
    );
    let rendered = serde_json::to_string(objects)?;
    ensure!(
        rendered.contains("FERRY_IDENTITY_URL")
            && rendered.contains("-identity.ferry-system.svc:8444"),
        "the operator is not told the identity service's URL"
    );
    Ok(())
}
