//! Pods of an [`E2e`] world: a network namespace, a Pod object whose status the test sets
//! as a kubelet would, and a sidecar process; and the group members the operator derives.

use crate::http::http_get;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::Child;

use super::{CONVERGE, E2e};
use crate::netns::{NetPod, PEER_PORT, Zone};
use crate::wait_for_value;

/// A pod of the world: its namespace, and its sidecar while one runs.
#[derive(Debug)]
pub struct E2ePod {
    pub name: String,
    pub net: NetPod,
    pub labels: BTreeMap<String, String>,
    pub(super) sidecar: Option<Child>,
    data_dir: PathBuf,
}

impl E2e {
    /// Creates pod `name` in `zone` with `labels`: a network namespace with a new IP, a
    /// Pod with a `ferry-sidecar` native sidecar on the zone's Node, status Running and
    /// Ready with that IP, and the sidecar process (waited on until it answers `/readyz`).
    pub async fn add_pod(
        &mut self,
        name: &str,
        zone: Zone,
        labels: &BTreeMap<String, String>,
    ) -> Result<Ipv4Addr> {
        ensure!(!self.pods.contains_key(name), "pod {name} exists");
        let net = self.fabric.add_pod(name, zone)?;
        let ip = net.ip;
        let manifest: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": format!("{}-{}", self.ns, zone.label()),
                "initContainers": [{"name": "ferry-sidecar", "image": "ferry/sidecar", "restartPolicy": "Always"}],
                "containers": [{"name": "app", "image": "ferry/e2e-app"}],
            }
        }))?;
        self.api::<Pod>()
            .create(&PostParams::default(), &manifest)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        let data_dir = self.dir.path().join("data").join(format!("{name}-{ip}"));
        self.pods.insert(
            name.to_owned(),
            E2ePod {
                name: name.to_owned(),
                net,
                labels: labels.clone(),
                sidecar: None,
                data_dir,
            },
        );
        self.start_sidecar(name).await?;
        self.set_ready(name, true).await?;
        Ok(ip)
    }

    /// Starts the pod's sidecar (again, on the same data dir) and waits until it is ready.
    pub async fn start_sidecar(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let etcd = self
            .etcd_forwarders
            .get(&pod.net.zone)
            .map(|p| format!("http://{}", p.listen))
            .context("etcd forwarder")?;
        let log_path = self.dir.path().join(format!("sidecar-{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = self
            .fabric
            .command(&pod.net, &self.bins.sidecar)
            .env("FERRY_POD_NAME", name)
            .env("FERRY_NAMESPACE", &self.ns)
            .env("FERRY_ZONE", pod.net.zone.label())
            .env(
                "FERRY_NODE",
                format!("{}-{}", self.ns, pod.net.zone.label()),
            )
            .env("FERRY_DATA_DIR", &pod.data_dir)
            .env("FERRY_ETCD_ENDPOINTS", etcd)
            .env(
                "FERRY_ADVERTISE_ADDR",
                format!("{}:{PEER_PORT}", pod.net.ip),
            )
            .env("FERRY_SHUTDOWN_GRACE", "5s")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the sidecar of {name}"))?;
        let admin = SocketAddr::from((pod.net.ip, 7790));
        if let Some(pod) = self.pods.get_mut(name) {
            pod.sidecar = Some(child);
        }
        wait_for_value(CONVERGE, || async {
            let (status, _) = http_get(admin, "/readyz").await?;
            Ok((status == 200).then_some(()))
        })
        .await
        .with_context(|| format!("the sidecar of {name} is ready ({})", log_path.display()))
    }

    /// Kills the pod's sidecar (`SIGKILL`).
    pub async fn kill_sidecar(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get_mut(name)
            .with_context(|| format!("no pod {name}"))?;
        if let Some(mut child) = pod.sidecar.take() {
            child.start_kill().ok();
            child.wait().await?;
        }
        Ok(())
    }

    /// Sets the pod's status as a kubelet would: Running, its IP, Ready true or false.
    pub async fn set_ready(&self, name: &str, ready: bool) -> Result<()> {
        let ip = self.pod(name)?.net.ip.to_string();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        }});
        self.api::<Pod>()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting the status of pod {name}"))?;
        Ok(())
    }

    /// Deletes the pod's Pod object (grace 0) and waits until it is gone; its sidecar and
    /// namespace stay until [`E2e::destroy_pod`].
    pub async fn delete_pod_object(&self, name: &str) -> Result<()> {
        let grace = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        self.api::<Pod>().delete(name, &grace).await?;
        wait_for_value(CONVERGE, || async {
            Ok(self
                .api::<Pod>()
                .get_opt(name)
                .await?
                .is_none()
                .then_some(()))
        })
        .await
        .with_context(|| format!("pod {name} is gone"))
    }

    /// Kills the pod's sidecar and deletes its network namespace (what is left of a pod
    /// after [`E2e::delete_pod_object`]); the name can then be used again.
    pub async fn destroy_pod(&mut self, name: &str) -> Result<()> {
        self.kill_sidecar(name).await?;
        if let Some(pod) = self.pods.remove(name) {
            self.fabric.remove_pod(&pod.net)?;
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> Result<&E2ePod> {
        self.pods
            .get(name)
            .with_context(|| format!("no pod {name}"))
    }

    /// The member entry of `pod` in `group` (JSON), if any.
    pub async fn member(&self, group: &str, pod: &str) -> Result<Option<serde_json::Value>> {
        let key = format!("/ferry/v1/members/{}/{group}/{pod}", self.ns);
        let out = self.cp.etcdctl(["get", "--print-value-only", &key]).await?;
        ensure!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(text)?))
    }

    /// The pod names of a group's members in the routing table.
    pub async fn members(&self, group: &str) -> Result<Vec<String>> {
        let prefix = format!("/ferry/v1/members/{}/{group}/", self.ns);
        let out = self
            .cp
            .etcdctl(["get", "--prefix", "--keys-only", &prefix])
            .await?;
        ensure!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Waits until a group's members are exactly `expected` (sorted pod names).
    pub async fn wait_members(
        &self,
        group: &str,
        expected: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let mut want: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        wait_for_value(timeout, || async {
            let mut found = self.members(group).await?;
            found.sort();
            Ok((found == want).then_some(()))
        })
        .await
        .with_context(|| format!("members of {group} become {expected:?}"))
    }
}
