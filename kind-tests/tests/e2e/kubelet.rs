//! The suite's kubelet against the real API server and webhook: the sidecar process of a
//! pod has exactly the environment of its injected container (no setting of the harness's
//! own), its data volume mounted where the container says, and the projected
//! service-account token it reads is a real token of the pod's service account, bound to
//! the pod, for the audience the volume names.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use ferry_api::consts::{IDENTITY_AUDIENCE, SIDECAR_CONTAINER};
use ferry_kind_tests::e2e::E2e;
use ferry_kind_tests::netns::Zone;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::support::labels;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sidecar_runs_as_its_pod_spec_says() -> Result<()> {
    let mut w = E2e::new("kubelet").await?;
    w.add_pod("p1", Zone::A, &labels(&[("app", "x")])).await?;
    let pod = w.api::<Pod>().get("p1").await?;
    let spec = pod.spec.clone().context("spec")?;
    let container = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_CONTAINER)
        .context("the injected sidecar")?;
    let spec_env: BTreeSet<String> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();

    // The process's environment: the container's variables, and what every image has.
    let e2e_pod = w.pod("p1")?;
    let pid = e2e_pod.sidecar_pid().context("the sidecar runs")?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let running: BTreeSet<String> = environ
        .split(|b| *b == 0)
        .filter_map(|var| {
            let var = String::from_utf8_lossy(var);
            Some(var.split_once('=')?.0.to_owned())
        })
        .collect();
    let mut expected = spec_env.clone();
    expected.extend(["PATH".to_owned(), "HOSTNAME".to_owned()]);
    println!("kubelet: the sidecar of p1 runs with {running:?}");
    ensure!(
        running == expected,
        "environment {running:?}, container spec {expected:?}"
    );
    let environ = String::from_utf8_lossy(&environ);
    let ip = e2e_pod.net.ip;
    ensure!(
        environ.contains(&format!("FERRY_ADVERTISE_ADDR={ip}:7710")),
        "$(FERRY_POD_IP) is expanded from status.podIP"
    );
    ensure!(
        environ.contains(&format!("FERRY_NAMESPACE={}\0", w.ns))
            && environ.contains("FERRY_POD_NAME=p1\0"),
        "metadata.namespace and metadata.name of the pod"
    );
    ensure!(
        !running.contains("FERRY_ZONE") && !running.contains("FERRY_NODE"),
        "the zone comes from the cluster, not from the environment"
    );

    // Its data volume is the pod's emptyDir, mounted at the container's mountPath.
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/lib/ferry")
        .context("the data mount")?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    ensure!(
        mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/var/lib/ferry")),
        "/var/lib/ferry is a mount point of the sidecar"
    );
    // What the pod's volume holds is what the sidecar sees there (`/proc/PID/root` is the
    // process's view of the file system, its own mounts included).
    let data = e2e_pod.volume_dir(&mount.name).context("the data volume")?;
    std::fs::write(data.join("kubelet-marker"), "emptyDir")?;
    let seen = std::fs::read_to_string(format!("/proc/{pid}/root/var/lib/ferry/kubelet-marker"))?;
    ensure!(
        seen == "emptyDir",
        "the sidecar's /var/lib/ferry is {}",
        data.display()
    );
    std::fs::remove_file(data.join("kubelet-marker"))?;
    ensure!(
        !std::path::Path::new("/var/lib/ferry/kubelet-marker").exists(),
        "the mount is the sidecar's own, not the host's"
    );

    // The projected serviceAccountToken volume the webhook injects for the sidecar's
    // identity: what the sidecar reads at its token file is a token of the pod's service
    // account, bound to the pod, for the volume's audience.
    let token_file = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "FERRY_IDENTITY_TOKEN_FILE")
        .and_then(|e| e.value.clone())
        .context("the webhook injects an identity token file")?;
    // `/var/run` is a symlink to `/run`, which `/proc/PID/root` would resolve in the
    // host's root: resolve the mount point's symlinks first (the host has the mount point).
    let token_file = std::path::Path::new(&token_file);
    let dir = token_file.parent().context("token dir")?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let name = token_file.file_name().context("token name")?;
    let seen_at = format!("/proc/{pid}/root{}", dir.join(name).display());
    let token = std::fs::read_to_string(&seen_at).with_context(|| seen_at.clone())?;
    let uid = pod.metadata.uid.clone().context("uid")?;
    let review: TokenReview = serde_json::from_value(json!({
        "spec": {"token": token, "audiences": [IDENTITY_AUDIENCE]}
    }))?;
    let review = Api::<TokenReview>::all(w.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = review.status.context("review status")?;
    println!(
        "kubelet: the projected token authenticates as {:?}",
        status.user
    );
    ensure!(status.authenticated == Some(true), "{status:?}");
    let user = status.user.context("user")?;
    ensure!(user.username.as_deref() == Some(&*format!("system:serviceaccount:{}:default", w.ns)));
    let extra = user.extra.unwrap_or_default();
    let bound = extra
        .get("authentication.kubernetes.io/pod-name")
        .cloned()
        .unwrap_or_default();
    ensure!(bound == ["p1"], "bound to the pod: {extra:?}");
    let bound_uid = extra
        .get("authentication.kubernetes.io/pod-uid")
        .cloned()
        .unwrap_or_default();
    ensure!(bound_uid == [uid], "bound to the pod's uid: {extra:?}");
    Ok(())
}
