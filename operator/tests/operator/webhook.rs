//! Sidecar injection through the real API server: a MutatingWebhookConfiguration that
//! points at the in-process operator's webhook over TLS (a CA and certificate made with
//! `openssl` for the test).

use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use ferry_api::ConsumerGroup;
use ferry_kind_tests::wait_for_value;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::support::*;

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

/// A test CA and a serving certificate for 127.0.0.1 in `dir` (`ca.crt`, `tls.crt`,
/// `tls.key`); returns the CA certificate.
fn make_certs(dir: &Path) -> Result<Vec<u8>> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=ferry-test-ca",
    ]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    )?;
    Ok(std::fs::read(dir.join("ca.crt"))?)
}

fn asking_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "injected"}, "annotations": {"ferry.dev/inject": "true"}},
        "spec": {"nodeName": "nowhere", "containers": [{"name": "app", "image": "app"}]}
    }))?)
}

#[tokio::test]
async fn the_webhook_injects_a_native_sidecar() -> Result<()> {
    let world = World::new("webhook").await?;
    let certs = tempfile::tempdir()?;
    let ca = make_certs(certs.path())?;
    let mut config = world.config("op-a");
    config.webhook_cert_dir = Some(certs.path().to_owned());
    config.webhook_addr = "127.0.0.1:0".parse()?;
    config.sidecar_image = "ferry-sidecar:test".into();
    let operator = Operator::start(config).await?;
    let addr = operator
        .running
        .webhook_addr
        .context("the webhook is served")?;

    let configs: Api<MutatingWebhookConfiguration> = Api::all(world.client.clone());
    let mut webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("ferry-{}", world.ns)},
        "webhooks": [{
            "name": "inject.ferry.dev",
            "clientConfig": {"url": format!("https://{addr}/mutate-pods")},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": world.ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 5,
        }]
    }))?;
    for hook in webhook.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(ca.clone()));
    }
    configs.create(&PostParams::default(), &webhook).await?;

    // The API server picks new webhook configurations up asynchronously: create probe
    // pods until one comes back injected.
    let pods = world.api::<Pod>();
    let mut attempt = 0;
    let injected = wait_for_value(CONVERGE, || {
        attempt += 1;
        let name = format!("probe-{attempt}");
        let pods = pods.clone();
        async move {
            let created = pods
                .create(&PostParams::default(), &asking_pod(&name)?)
                .await?;
            let has = created
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.name == "ferry-sidecar"));
            if !has {
                pods.delete(&name, &DeleteParams::default()).await?;
            }
            Ok(has.then_some(created))
        }
    })
    .await
    .context("a pod asking for injection is injected")?;

    let spec = injected.spec.clone().context("spec")?;
    let init = spec.init_containers.unwrap_or_default();
    let sidecar = init.first().context("init container")?;
    ensure!(
        sidecar.name == "ferry-sidecar",
        "the sidecar comes first: {init:?}"
    );
    ensure!(
        sidecar.restart_policy.as_deref() == Some("Always"),
        "a native sidecar"
    );
    ensure!(sidecar.image.as_deref() == Some("ferry-sidecar:test"));
    let env = sidecar.env.clone().unwrap_or_default();
    ensure!(env.iter().any(|e| e.name == "FERRY_POD_NAME"), "{env:?}");
    ensure!(
        spec.volumes
            .unwrap_or_default()
            .iter()
            .any(|v| v.name == "ferry-data")
    );
    ensure!(spec.containers.len() == 1, "the app is untouched");

    // A pod that does not ask is left alone.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain", "labels": {"app": "injected"}},
        "spec": {"nodeName": "nowhere", "containers": [{"name": "app", "image": "app"}]}
    }))?;
    let plain = pods.create(&PostParams::default(), &plain).await?;
    ensure!(
        plain
            .spec
            .and_then(|s| s.init_containers)
            .is_none_or(|c| c.is_empty())
    );

    // The injected pod, once Ready, is a member; the plain one is not.
    world
        .apply::<ConsumerGroup>(group("injected", "injected"))
        .await?;
    let probe = injected.metadata.name.clone().context("name")?;
    set_pod_status(&world, &probe, "10.3.0.1", true).await?;
    set_pod_status(&world, "plain", "10.3.0.2", true).await?;
    wait_members(&world, "injected", &[probe.as_str()], CONVERGE).await?;

    configs
        .delete(&format!("ferry-{}", world.ns), &DeleteParams::default())
        .await?;
    operator.stop().await
}
