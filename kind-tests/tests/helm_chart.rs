//! The Helm chart `charts/ferry`, checked with the pinned helm and the real local
//! kube-apiserver: `helm lint --strict` passes, the schema refuses what the chart cannot
//! deploy, and what `helm template --include-crds` renders is accepted by the API server
//! (`kubectl apply --dry-run=server --validate=strict`) for the default values and for the
//! high-availability variant (2 operator replicas, 3 etcd members). The rendered objects
//! are also checked against what the operator and the design expect: the operator's
//! `FERRY_*` flags, the probes, the webhook's namespace exclusions, least-privilege RBAC.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_kind_tests::{CRDS_DIR, ControlPlane, tools};
use tokio::process::Command;

#[path = "helm_chart/network.rs"]
mod network;
#[path = "helm_chart/rendered.rs"]
mod rendered;

use rendered::{check_rendered, kind_of, name_of, objects, one};

/// The chart under test.
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ferry");
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
        network::check_etcd_policy(&rendered, 2379)
            .with_context(|| format!("the {name} rendering's etcd NetworkPolicy"))?;
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
    network::check_no_policy(&rendered)?;
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

    // Without the identity service sidecars dial etcd themselves: no policy shuts them out.
    let rendered = objects(&helm.template(&["identity.enabled=false"]).await?)?;
    network::check_no_policy(&rendered)?;
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
