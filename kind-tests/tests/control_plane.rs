//! Smoke test of the local control plane: a real etcd and kube-apiserver answer.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ferry_kind_tests::ControlPlane;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

#[tokio::test]
async fn control_plane_serves_kubernetes_and_etcd() -> Result<()> {
    let started = Instant::now();
    let cp = ControlPlane::shared().await?;
    println!("{}", cp.start_report().trim_end());
    println!(
        "control plane up in {:.1}s: etcd {} on {}, kube-apiserver {} on {}",
        started.elapsed().as_secs_f64(),
        cp.etcd_version(),
        cp.etcd_endpoints(),
        cp.kube_version(),
        cp.apiserver_url()
    );
    ensure!(
        cp.kube_version() == "v1.36.3",
        "kube-apiserver {}",
        cp.kube_version()
    );
    ensure!(cp.etcd_version() == "3.6.16", "etcd {}", cp.etcd_version());

    // The kube client, authenticated by the admin client certificate.
    let client = cp.client().await?;
    let namespaces: Api<Namespace> = Api::all(client);
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .context("listing namespaces")?
        .iter()
        .map(|ns| ns.name_any())
        .collect();
    println!("namespaces: {names:?}");
    for expected in ["default", "kube-system"] {
        ensure!(
            names.iter().any(|n| n == expected),
            "no {expected} namespace in {names:?}"
        );
    }

    // kubectl through the kubeconfig: client and server report the pinned version.
    let version = cp.kubectl(["version", "-o", "json"]).await?;
    ensure!(
        version.status.success(),
        "kubectl version: {}",
        String::from_utf8_lossy(&version.stderr)
    );
    let version: serde_json::Value = serde_json::from_slice(&version.stdout)?;
    for side in ["clientVersion", "serverVersion"] {
        let git_version = &version[side]["gitVersion"];
        ensure!(
            git_version == "v1.36.3",
            "kubectl version {side}: {git_version}"
        );
    }

    // etcd directly, as the routing table will use it.
    let put = cp.etcdctl(["put", "/ferry-smoke/key", "value 1"]).await?;
    ensure!(
        put.status.success(),
        "etcdctl put: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = cp
        .etcdctl(["get", "--print-value-only", "/ferry-smoke/key"])
        .await?;
    ensure!(
        get.status.success(),
        "etcdctl get: {}",
        String::from_utf8_lossy(&get.stderr)
    );
    let value = String::from_utf8_lossy(&get.stdout);
    ensure!(
        value.trim_end() == "value 1",
        "etcdctl get returned {value:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_private_control_plane_stops_on_drop() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let dir = cp.dir().to_path_buf();
    let url = cp.apiserver_url().to_owned();
    ensure!(dir.join("kubeconfig").is_file());
    let pids: Vec<u32> = ["etcd", "kube-apiserver"]
        .iter()
        .map(|name| -> Result<u32> {
            let text = std::fs::read_to_string(dir.join(format!("{name}.pid")))?;
            Ok(text.trim().parse()?)
        })
        .collect::<Result<_>>()?;
    drop(cp);
    ensure!(!dir.exists(), "{} still exists after drop", dir.display());
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        ensure!(!running, "pid {pid} still runs after drop ({url})");
    }
    Ok(())
}
