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

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A test CA in `dir` (`ca.crt`, `ca.key`); returns the CA certificate.
fn make_ca(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let mut ca = vec!["req", "-x509"];
    ca.extend(EC_KEY);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj"]);
    let subject = format!("/CN={name}");
    ca.push(&subject);
    openssl(dir, &ca)?;
    Ok(std::fs::read(dir.join("ca.crt"))?)
}

/// A serving certificate for 127.0.0.1 (`tls.crt`, `tls.key` in `dir`) signed by the CA in
/// `ca_dir`.
fn make_serving(dir: &Path, ca_dir: &Path) -> Result<()> {
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
    openssl(dir, &csr)?;
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    let ca_crt = ca_dir.join("ca.crt").display().to_string();
    let ca_key = ca_dir.join("ca.key").display().to_string();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    )
}

/// The SHA-256 fingerprint of the certificate that `addr` serves (asynchronously: the
/// webhook serves from this test's own runtime).
async fn served_fingerprint(addr: std::net::SocketAddr) -> Result<String> {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The SHA-256 fingerprint of the certificate file `path`.
fn file_fingerprint(path: &Path) -> Result<String> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(path)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Creates the pod `name` asking for injection; returns whether it came back injected
/// (and deletes it if not).
async fn create_probe(pods: &Api<Pod>, name: &str) -> Result<Option<Pod>> {
    let created = pods
        .create(&PostParams::default(), &asking_pod(name)?)
        .await?;
    let has = created
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "ferry-sidecar"));
    if !has {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    Ok(has.then_some(created))
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
    let ca_dir = tempfile::tempdir()?;
    let ca = make_ca(ca_dir.path(), "ferry-test-ca")?;
    let certs = tempfile::tempdir()?;
    make_serving(certs.path(), ca_dir.path())?;
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
        async move { create_probe(&pods, &name).await }
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

    // A malformed override is refused at admission, naming the annotation.
    let mut bad = asking_pod("bad-override")?;
    bad.metadata
        .annotations
        .get_or_insert_default()
        .insert("ferry.dev/sidecar-memory-limit".into(), "lots".into());
    let refused = pods
        .create(&PostParams::default(), &bad)
        .await
        .err()
        .context("a pod with a malformed sidecar annotation is refused")?;
    ensure!(
        refused
            .to_string()
            .contains("ferry.dev/sidecar-memory-limit"),
        "{refused}"
    );

    rotation_and_tls_failure(&world, &pods, addr, certs.path(), ca_dir.path()).await?;

    configs
        .delete(&format!("ferry-{}", world.ns), &DeleteParams::default())
        .await?;
    operator.stop().await
}

/// Row 22, webhook TLS: a certificate rotated on disk (new key, same CA, files replaced
/// one after the other as a Secret volume update does) is served without a restart and
/// without a single refused pod; a webhook whose `caBundle` does not match fails closed,
/// with an error naming the webhook, for its own namespaces only.
async fn rotation_and_tls_failure(
    world: &World,
    pods: &Api<Pod>,
    addr: std::net::SocketAddr,
    certs: &Path,
    ca_dir: &Path,
) -> Result<()> {
    let before = served_fingerprint(addr).await?;
    ensure!(before == file_fingerprint(&certs.join("tls.crt"))?);
    let staged = tempfile::tempdir()?;
    make_serving(staged.path(), ca_dir)?;
    let rotated = file_fingerprint(&staged.path().join("tls.crt"))?;
    ensure!(rotated != before, "a new certificate");
    // Pods keep being created (and injected) across the rotation.
    let mut created = 0;
    for step in 0..3 {
        if step == 1 {
            std::fs::rename(staged.path().join("tls.key"), certs.join("tls.key"))?;
            std::fs::rename(staged.path().join("tls.crt"), certs.join("tls.crt"))?;
        }
        for i in 0..3 {
            let name = format!("rotation-{step}-{i}");
            create_probe(pods, &name)
                .await?
                .with_context(|| format!("{name} was not injected during the rotation"))?;
            created += 1;
        }
    }
    wait_for_value(CONVERGE, || async {
        Ok((served_fingerprint(addr).await? == rotated).then_some(()))
    })
    .await
    .context("the rotated certificate is served without a restart")?;
    println!("rotation: {created} pods created and injected, new certificate {rotated}");

    // A caBundle from another CA: the API server cannot verify the webhook.
    let other_ca_dir = tempfile::tempdir()?;
    let other_ca = make_ca(other_ca_dir.path(), "another-ca")?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(world.client.clone());
    let name = format!("ferry-{}", world.ns);
    let mut webhook = configs.get(&name).await?;
    for hook in webhook.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(other_ca.clone()));
    }
    configs
        .replace(&name, &PostParams::default(), &webhook)
        .await?;
    let mut attempt = 0;
    let refusal = wait_for_value(CONVERGE, || {
        attempt += 1;
        let name = format!("refused-{attempt}");
        async move {
            Ok(
                match pods
                    .create(&PostParams::default(), &asking_pod(&name)?)
                    .await
                {
                    Ok(_) => {
                        pods.delete(&name, &DeleteParams::default()).await?;
                        None
                    }
                    Err(error) => Some(error.to_string()),
                },
            )
        }
    })
    .await
    .context("pods are refused while the webhook's TLS cannot be verified")?;
    println!("with a wrong caBundle: {refusal}");
    ensure!(
        refusal.contains("inject.ferry.dev"),
        "the refusal names the webhook: {refusal}"
    );
    // Fail closed for the webhook's namespaces only: another namespace is not blocked.
    let elsewhere: Api<Pod> = Api::namespaced(world.client.clone(), "default");
    let name = format!("unblocked-{}", world.ns);
    elsewhere
        .create(&PostParams::default(), &asking_pod(&name)?)
        .await
        .context("a namespace outside the webhook's selector is not blocked")?;
    elsewhere.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}
