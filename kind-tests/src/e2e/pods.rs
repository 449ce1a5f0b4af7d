//! Pods of an [`E2e`] world, made as a cluster makes them: a Pod created through the API
//! server asking for injection (the real webhook mutates it), bound to its zone's Node, its
//! status set as a kubelet would (IP, then Ready once the sidecar's own probes pass), and
//! its injected sidecar container run from the mutated spec alone by the suite's
//! [`kubelet`](crate::kubelet); and the group members the operator derives.

use crate::kubelet::{self, ContainerPlan, Sandbox, container_command, wait_started};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_api::consts::{INJECT_ANNOTATION, SIDECAR_CONTAINER};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::Child;

use super::{CONVERGE, E2e};
use crate::netns::{NetPod, Zone};
use crate::wait_for_value;

/// The service account of the world's pods (the one the API server would default to).
pub const SERVICE_ACCOUNT: &str = "default";
/// The image of the pods' app container (the harness starts `ferry-e2e-app` itself).
pub const APP_IMAGE: &str = "ferry-e2e-app:e2e";

/// A pod of the world: its namespace, its resolved sidecar container, the pod's volumes,
/// and its sidecar process while one runs.
#[derive(Debug)]
pub struct E2ePod {
    pub name: String,
    pub net: NetPod,
    pub labels: BTreeMap<String, String>,
    /// The sidecar container as the kubelet resolved it from the mutated pod.
    pub plan: ContainerPlan,
    pub(super) sidecar: Option<Child>,
    sandbox: Sandbox,
}

impl E2ePod {
    /// The pid of its sidecar process, while one runs.
    pub fn sidecar_pid(&self) -> Option<u32> {
        self.sidecar.as_ref()?.id()
    }

    /// The host folder of one of its volumes.
    pub fn volume_dir(&self, volume: &str) -> Option<&std::path::Path> {
        self.sandbox.volume_dir(volume)
    }
}

impl E2e {
    /// Creates pod `name` in `zone` with `labels`, as a cluster would: a Pod asking for
    /// injection through the API server, bound to the zone's Node, a network namespace with
    /// a new IP set as the pod's IP, the injected sidecar container resolved from the pod
    /// read back and started (waited on until its startup and readiness probes pass), and
    /// the pod Running and Ready.
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
            "metadata": {"name": name, "labels": labels, "annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {
                "serviceAccountName": SERVICE_ACCOUNT,
                "containers": [{"name": "app", "image": APP_IMAGE}],
            }
        }))?;
        let pods = self.api::<Pod>();
        pods.create(&PostParams::default(), &manifest)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        let node = format!("{}-{}", self.ns, zone.label());
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        pods.create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
        .with_context(|| format!("binding pod {name} to {node}"))?;
        // The sandbox is up: the pod has its IP, its containers do not run yet.
        let gateway = self.fabric.gateway(zone).to_string();
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": gateway,
            "hostIPs": [{"ip": gateway}],
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
        }});
        let pod = pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting the IP of pod {name}"))?;
        let plan = kubelet::plan(&pod, SIDECAR_CONTAINER, &self.images)
            .with_context(|| format!("pod {name} as the API server returned it"))?;
        let dir = self
            .dir
            .path()
            .join("pods")
            .join(format!("{name}-{}", plan.uid));
        let sandbox = Sandbox::prepare(&self.client, &plan, &dir)
            .await
            .with_context(|| format!("the volumes of pod {name}"))?;
        self.pods.insert(
            name.to_owned(),
            E2ePod {
                name: name.to_owned(),
                net,
                labels: labels.clone(),
                plan,
                sidecar: None,
                sandbox,
            },
        );
        self.start_sidecar(name).await?;
        self.set_ready(name, true).await?;
        Ok(ip)
    }

    /// Starts the pod's sidecar container (again, on the same volumes, as the kubelet
    /// restarts a container) and waits until its startup and readiness probes pass.
    pub async fn start_sidecar(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let log_path = self.dir.path().join(format!("sidecar-{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = container_command(&pod.plan, &pod.sandbox, &pod.net.netns)?
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the sidecar of {name}"))?;
        let ip = IpAddr::V4(pod.net.ip);
        let (startup, readiness) = (pod.plan.startup.clone(), pod.plan.readiness.clone());
        let started = tokio::time::timeout(
            CONVERGE,
            wait_started(startup.as_ref(), readiness.as_ref(), ip, &mut child),
        )
        .await;
        if let Some(pod) = self.pods.get_mut(name) {
            pod.sidecar = Some(child);
        }
        let what = || format!("the sidecar of {name} is ready ({})", log_path.display());
        started
            .with_context(|| format!("waited {CONVERGE:?}"))
            .with_context(what)?
            .with_context(what)
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
