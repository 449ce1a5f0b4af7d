//! The Helm chart `charts/ferry`, checked with the pinned helm and the real local
//! kube-apiserver: `helm lint --strict` passes, the schema refuses what the chart cannot
//! deploy, and what `helm template --include-crds` renders is accepted by the API server
//! (`kubectl apply --dry-run=server --validate=strict`) for the default values and for the
//! high-availability variant (2 operator replicas, 3 etcd members). The rendered objects
//! are also checked against what the operator and the design expect: the operator's
//! `FERRY_*` flags, the probes, the webhook's namespace exclusions, least-privilege RBAC.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferry_kind_tests::{CRDS_DIR, ControlPlane, tools};
use serde_json::Value;
use tokio::process::Command;

/// The chart under test.
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ferry");
/// The operator's flags and their `FERRY_*` variables.
const OPERATOR_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../operator/src/config.rs");
/// Namespace the chart is rendered for.
const NAMESPACE: &str = "ferry-system";
/// Deadline of every helm or kubectl run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `program args` with a deadline; returns its output whatever its exit status.
async fn run<I, S>(program: &Path, args: I, env: &[(&str, &Path)]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .with_context(|| {
            format!(
                "{} did not finish in {COMMAND_TIMEOUT:?}",
                program.display()
            )
        })?
        .with_context(|| format!("running {}", program.display()))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// helm with its config, cache and data folders in a scratch folder of its own.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    async fn new() -> Result<Self> {
        let bin = tools::helm().await?;
        let home = tempfile::tempdir().context("creating a HELM_*_HOME folder")?;
        Ok(Self { bin, home })
    }

    async fn run(&self, args: &[&str]) -> Result<Output> {
        let home = self.home.path();
        run(
            &self.bin,
            args,
            &[
                ("HELM_CONFIG_HOME", &home.join("config")),
                ("HELM_CACHE_HOME", &home.join("cache")),
                ("HELM_DATA_HOME", &home.join("data")),
            ],
        )
        .await
    }

    /// `helm template ferry CHART --namespace ferry-system --include-crds --set ...`: the
    /// YAML text; fails when helm does.
    async fn template(&self, sets: &[&str]) -> Result<String> {
        let mut args = vec![
            "template",
            "ferry",
            CHART,
            "--namespace",
            NAMESPACE,
            "--include-crds",
        ];
        for set in sets {
            args.extend(["--set", set]);
        }
        let output = self.run(&args).await?;
        ensure!(
            output.status.success(),
            "helm {args:?} failed:\n{}",
            text(&output)
        );
        String::from_utf8(output.stdout).context("helm template printed non-UTF-8")
    }
}

/// The rendered objects, empty documents dropped.
fn objects(yaml: &str) -> Result<Vec<Value>> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(yaml).context("parsing helm template's output")?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// The one object of `kind`; fails when there is none or more than one.
fn one<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
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
fn check_rendered(objects: &[Value], operators: u64, etcd_members: u64) -> Result<()> {
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
    ensure!(ports == [8080, 8443].into(), "operator ports: {ports:?}");
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
    let lease_role = one(objects, "Role")?;
    ensure!(
        lease_role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| strings(&r["resources"]) == ["leases".to_owned()].into()),
        "the namespaced Role is for leases only"
    );
    Ok(())
}

/// Creates the namespace (idempotent) and server-side dry-runs the rendered YAML.
async fn dry_run(cp: &ControlPlane, name: &str, yaml: &str) -> Result<String> {
    let namespace = cp
        .kubectl([
            "create",
            "namespace",
            NAMESPACE,
            "--dry-run=client",
            "-o",
            "yaml",
        ])
        .await?;
    ensure!(namespace.status.success(), "{}", text(&namespace));
    let file = cp.dir().join(format!("namespace-{NAMESPACE}.yaml"));
    std::fs::write(&file, &namespace.stdout)?;
    let applied = tokio::time::timeout(
        COMMAND_TIMEOUT,
        cp.kubectl(["apply".as_ref(), "-f".as_ref(), file.as_os_str()]),
    )
    .await
    .context("kubectl apply of the namespace timed out")??;
    ensure!(applied.status.success(), "{}", text(&applied));

    let file = cp.dir().join(format!("helm-{name}.yaml"));
    std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    let output = tokio::time::timeout(
        COMMAND_TIMEOUT,
        cp.kubectl([
            "apply".as_ref(),
            "--dry-run=server".as_ref(),
            "--validate=strict".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
        ]),
    )
    .await
    .context("kubectl apply --dry-run=server timed out")??;
    let report = text(&output);
    ensure!(
        output.status.success(),
        "the API server refused the {name} rendering:\n{report}"
    );
    Ok(report)
}

#[tokio::test]
async fn helm_lint_passes_and_the_schema_refuses_bad_values() -> Result<()> {
    let helm = Helm::new().await?;
    for sets in [
        vec![],
        vec!["replicaCount=2", "etcd.replicas=3"],
        vec![
            "webhook.certManager.enabled=true",
            "metrics.serviceMonitor.enabled=true",
        ],
        vec!["etcd.external.endpoints={http://etcd.example:2379}"],
    ] {
        let mut args = vec!["lint", CHART, "--strict", "--namespace", NAMESPACE];
        for set in &sets {
            args.extend(["--set", set]);
        }
        let output = helm.run(&args).await?;
        let report = text(&output);
        println!("helm lint {sets:?}:\n{report}");
        ensure!(
            output.status.success() && report.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint {sets:?} failed:\n{report}"
        );
    }
    // What the chart cannot deploy is refused before anything reaches a cluster.
    for (set, field) in [
        ("replicaCount=3", "replicaCount"),
        ("etcd.replicas=2", "replicas"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        (
            "operator.leaderElection.leaseDuration=15 seconds",
            "leaseDuration",
        ),
        ("etcd.external.endpoints={etcd:2379}", "endpoints"),
        ("replicaCont=2", "replicaCont"),
    ] {
        let error = helm
            .template(&[set])
            .await
            .err()
            .with_context(|| format!("helm template --set {set} was accepted"))?;
        let error = format!("{error:#}");
        ensure!(
            error.contains("values don't meet the specifications of the schema")
                && error.contains(field),
            "--set {set}: the error does not name {field}:\n{error}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    println!("{}", cp.start_report().trim_end());
    // Server-side dry runs of custom resources need their CRDs installed.
    cp.install_crds(CRDS_DIR).await?;
    let helm = Helm::new().await?;
    for (name, sets, operators, etcd_members) in [
        ("default", vec![], 1, 1),
        ("ha", vec!["replicaCount=2", "etcd.replicas=3"], 2, 3),
    ] {
        let yaml = helm.template(&sets).await?;
        let rendered = objects(&yaml)?;
        check_rendered(&rendered, operators, etcd_members)
            .with_context(|| format!("the {name} rendering"))?;
        let report = dry_run(cp, name, &yaml).await?;
        println!("{name} ({sets:?}):\n{report}");
        // Every rendered object was seen by the server, none skipped.
        let lines = report
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        ensure!(
            lines == rendered.len(),
            "{} objects rendered, {lines} dry-run by the server:\n{report}",
            rendered.len()
        );
        let pdbs = rendered
            .iter()
            .filter(|o| kind_of(o) == "PodDisruptionBudget")
            .count();
        ensure!(
            pdbs == if operators > 1 { 2 } else { 0 },
            "{name}: {pdbs} PodDisruptionBudgets"
        );
    }
    Ok(())
}

#[tokio::test]
async fn optional_parts_render_when_enabled() -> Result<()> {
    let helm = Helm::new().await?;
    // cert-manager issues the webhook certificate and injects the CA; no Helm-made Secret.
    let rendered = objects(&helm.template(&["webhook.certManager.enabled=true"]).await?)?;
    let certificate = one(&rendered, "Certificate")?;
    let webhook = one(&rendered, "MutatingWebhookConfiguration")?;
    ensure!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            == format!("{NAMESPACE}/{}", name_of(certificate)),
        "inject-ca-from does not name the Certificate"
    );
    ensure!(webhook["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    ensure!(!rendered.iter().any(|o| kind_of(o) == "Secret"));
    one(&rendered, "Issuer")?;

    // The ServiceMonitor scrapes the metrics Service.
    let rendered = objects(
        &helm
            .template(&["metrics.serviceMonitor.enabled=true"])
            .await?,
    )?;
    let monitor = one(&rendered, "ServiceMonitor")?;
    ensure!(monitor["spec"]["endpoints"][0]["port"] == "metrics");

    // An external etcd: no StatefulSet, the operator uses the given endpoints.
    let rendered = objects(
        &helm
            .template(&["etcd.external.endpoints={http://a.example:2379,http://b.example:2379}"])
            .await?,
    )?;
    ensure!(!rendered.iter().any(|o| kind_of(o) == "StatefulSet"));
    let deployment = one(&rendered, "Deployment")?;
    let endpoints = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "FERRY_ETCD_ENDPOINTS")
        .and_then(|v| v["value"].as_str())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        endpoints == "http://a.example:2379,http://b.example:2379",
        "{endpoints}"
    );
    Ok(())
}

/// GitOps without the chart: `deploy/` is a kustomization of the CRDs that builds with
/// kustomize's default restrictions (its CRD files are generated copies beside it) and that
/// the API server accepts by server-side apply.
#[tokio::test]
async fn the_crd_kustomization_applies_as_is() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let output = tokio::time::timeout(
        COMMAND_TIMEOUT,
        cp.kubectl([
            "apply".as_ref(),
            "--dry-run=server".as_ref(),
            "--server-side".as_ref(),
            "-k".as_ref(),
            deploy.as_os_str(),
        ]),
    )
    .await
    .context("kubectl apply -k deploy/ timed out")??;
    let report = text(&output);
    println!("{}", report.trim_end());
    ensure!(
        output.status.success(),
        "kubectl apply -k deploy/:\n{report}"
    );
    for crd in ["topics", "consumergroups", "subscriptions"] {
        ensure!(
            report.contains(&format!("{crd}.ferry.dev")),
            "{crd}.ferry.dev is not in the kustomization:\n{report}"
        );
    }
    Ok(())
}
