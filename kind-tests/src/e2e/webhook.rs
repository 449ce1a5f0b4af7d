//! The world's sidecar injection, set up as a platform team would: the operator serves the
//! webhook over TLS (a CA and a serving certificate for 127.0.0.1 made with `openssl`),
//! reads the injected sidecar's defaults from a `sidecar.yaml` (the Helm chart's
//! `--sidecar-config`), and a MutatingWebhookConfiguration for the world's namespace
//! points the API server at it.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ferry_api::consts::{INJECT_ANNOTATION, SIDECAR_CONTAINER};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::CONVERGE;
use crate::wait_for_value;

/// The image the world's webhook injects; the world's kubelet runs the built sidecar for it.
pub const SIDECAR_IMAGE: &str = "ghcr.io/ferry-dev/ferry-sidecar:e2e";
/// The sidecar's entrypoint in that image.
pub const SIDECAR_ENTRYPOINT: &str = "/usr/local/bin/ferry-sidecar";
/// Name of the webhook in the configuration.
const WEBHOOK_NAME: &str = "inject.ferry.dev";

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA in `dir/ca` and a serving certificate for 127.0.0.1 signed by it in `dir/certs`
/// (`tls.crt`, `tls.key`: the layout of a `kubernetes.io/tls` Secret); returns the CA
/// certificate (the webhook's `caBundle`).
pub(super) fn make_certs(dir: &Path) -> Result<Vec<u8>> {
    let ca_dir = dir.join("ca");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&ca_dir)?;
    std::fs::create_dir_all(&certs)?;
    let mut ca = vec!["req", "-x509"];
    ca.extend(EC_KEY);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "1"]);
    ca.extend(["-subj", "/CN=ferry-e2e-webhook-ca"]);
    openssl(&ca_dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(EC_KEY);
    csr.extend([
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&certs, &csr)?;
    std::fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    let ca_crt = ca_dir.join("ca.crt").display().to_string();
    let ca_key = ca_dir.join("ca.key").display().to_string();
    #[rustfmt::skip]
    let sign = [
        "x509", "-req", "-in", "tls.csr", "-CA", &ca_crt, "-CAkey", &ca_key,
        "-CAcreateserial", "-out", "tls.crt", "-days", "1", "-extfile", "san.ext",
    ];
    openssl(&certs, &sign)?;
    Ok(std::fs::read(ca_dir.join("ca.crt"))?)
}

/// The operator's `--sidecar-config`: the image, and the etcd endpoints every sidecar
/// reaches from its pod (the fabric's service address).
pub(super) fn write_sidecar_config(path: &Path, etcd: SocketAddr) -> Result<()> {
    // JSON is YAML.
    let config = json!({
        "image": SIDECAR_IMAGE,
        "etcdEndpoints": format!("http://{etcd}"),
    });
    std::fs::write(path, serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// Registers the webhook at `addr` for namespace `ns` (fail closed, as the chart does).
pub(super) async fn register(client: &Client, ns: &str, addr: SocketAddr, ca: &[u8]) -> Result<()> {
    let mut webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("ferry-{ns}")},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": {"url": format!("https://{addr}/mutate-pods")},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
        }]
    }))?;
    for hook in webhook.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(ca.to_vec()));
    }
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook)
        .await
        .context("creating the MutatingWebhookConfiguration")?;
    Ok(())
}

/// Waits until the API server calls the webhook and it injects (the API server picks a new
/// configuration up asynchronously, and the operator needs a moment to serve): dry-run
/// creates of a pod that asks, until one comes back with the sidecar.
pub(super) async fn wait_injecting(pods: &Api<Pod>) -> Result<()> {
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "webhook-probe", "annotations": {INJECT_ANNOTATION: "true"}},
        // The ServiceAccount admission plugin is off here: name the account, as it would.
        "spec": {"serviceAccountName": super::SERVICE_ACCOUNT, "containers": [{"name": "app", "image": "app"}]}
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_for_value(CONVERGE, || async {
        let created = pods.create(&dry_run, &probe).await?;
        let injected = created
            .spec
            .and_then(|s| s.init_containers)
            .is_some_and(|c| c.iter().any(|c| c.name == SIDECAR_CONTAINER));
        Ok(injected.then_some(()))
    })
    .await
    .context("the API server calls the injection webhook")
}
