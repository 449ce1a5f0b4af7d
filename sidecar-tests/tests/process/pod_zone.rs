//! Cluster mode: a sidecar started without `FERRY_ZONE` learns its zone from its pod's
//! record in the routing table (`/ferry/v1/pods/<namespace>/<pod>`, written by the
//! operator), routes same-zone-first by it, and re-learns when the record changes.
//!
//! Real sidecars follow a real etcd (the shared control plane of `ferry-kind-tests`); the
//! test writes the routing table there as the operator would. A zone-a producer delivers
//! every message of a `PreferSameZone` group to the zone-a member and none to a
//! `SameZoneOnly` group whose only member is in zone-b; once its record says zone-b, the
//! next messages go to the zone-b member, and the strict group receives what waited for it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_api::local::{LocalPod, build_table, parse_pods};
use ferry_api::manifest::Manifests;
use ferry_kind_tests::ControlPlane;
use ferry_kind_tests::http::http_get;
use ferry_sidecar_tests::harness::{
    Behavior, next_subnet, publish, sidecar_bin, spawn_consumer, wait_for,
};
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::client;
use ferryctl::mesh::plan::{SidecarSpec, peer_address, plan};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::common::RUN_LIMIT;

const MESSAGES: usize = 40;
/// How long a sidecar may take to follow a change of its record.
const FOLLOW: Duration = Duration::from_secs(30);

/// A sidecar process following etcd, with its output kept.
struct EtcdSidecar {
    spec: SidecarSpec,
    lines: Arc<Mutex<Vec<String>>>,
    _child: Child,
}

impl EtcdSidecar {
    /// Starts the sidecar of `spec` on `etcd` with no `--zone` or `--node` (what the webhook
    /// injects) and waits for its ready line.
    async fn start(spec: &SidecarSpec, etcd: &str) -> Result<Self> {
        std::fs::create_dir_all(&spec.data_dir)?;
        let e = &spec.endpoints;
        let mut child = Command::new(sidecar_bin()?)
            .args(["--pod-name", &spec.pod.name])
            .args(["--namespace", &spec.pod.namespace])
            .args(["--service-account", &spec.pod.service_account])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--app-grpc-addr", &e.app_grpc.to_string()])
            .args(["--app-http-addr", &e.app_http.to_string()])
            .args(["--peer-addr", &e.peer.to_string()])
            .args(["--advertise-addr", &e.peer.to_string()])
            .args(["--admin-addr", &e.admin.to_string()])
            .args(["--etcd-endpoints", etcd])
            .arg("--tls-dir")
            .arg(&spec.tls_dir)
            .args(["--shutdown-grace", "2s"])
            .arg("--drain-on-stdin-eof")
            .env_remove("FERRY_ZONE")
            .env_remove("FERRY_NODE")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting ferry-sidecar")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(keep(out, lines.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(keep(err, lines.clone()));
        }
        let sidecar = Self {
            spec: spec.clone(),
            lines,
            _child: child,
        };
        wait_for(Duration::from_secs(30), "the sidecar's ready line", || {
            !sidecar.lines_with("ferry-sidecar ready").is_empty()
        })
        .await
        .with_context(|| sidecar.tail())?;
        Ok(sidecar)
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
        lines.into_iter().filter(|l| l.contains(needle)).collect()
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn admin(&self) -> SocketAddr {
        self.spec.endpoints.admin
    }

    fn app(&self) -> String {
        self.spec.endpoints.app_grpc.to_string()
    }

    /// Waits until `/metrics` has a line that starts with `sample`.
    async fn wait_metric(&self, sample: &str) -> Result<()> {
        let deadline = Instant::now() + FOLLOW;
        loop {
            let (_, body) = http_get(self.admin(), "/metrics").await?;
            if body.lines().any(|l| l.starts_with(sample)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let zone: Vec<&str> = body.lines().filter(|l| l.contains("zone")).collect();
                bail!(
                    "no {sample} within {FOLLOW:?}; zone lines: {zone:?}\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    async fn wait_ready(&self) -> Result<String> {
        let deadline = Instant::now() + FOLLOW;
        loop {
            let (status, body) = http_get(self.admin(), "/readyz").await?;
            if status == 200 {
                return Ok(body);
            }
            if Instant::now() >= deadline {
                bail!("not ready within {FOLLOW:?}: {body}\n{}", self.tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn keep(pipe: impl AsyncRead + Unpin, lines: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if let Ok(mut l) = lines.lock() {
            l.push(line);
        }
    }
}

fn crs(ns: &str) -> String {
    let meta = |name: &str| format!("{{name: {name}, namespace: {ns}}}");
    [
        format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {}\nspec: {{durability: Disk}}\n",
            meta("events")
        ),
        format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {}\nspec: {{selector: {{matchLabels: {{app: nearby}}}}, zonePolicy: PreferSameZone}}\n",
            meta("nearby")
        ),
        format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {}\nspec: {{selector: {{matchLabels: {{app: strict}}}}, zonePolicy: SameZoneOnly}}\n",
            meta("strict")
        ),
        format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {}\nspec: {{topic: events, group: nearby}}\n",
            meta("nearby-events")
        ),
        format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {}\nspec: {{topic: events, group: strict}}\n",
            meta("strict-events")
        ),
    ]
    .concat()
}

fn pods(ns: &str) -> String {
    [
        ("nearby-a", "zone-a", "{app: nearby}"),
        ("nearby-b", "zone-b", "{app: nearby}"),
        ("strict-b", "zone-b", "{app: strict}"),
        ("producer", "zone-a", "{}"),
    ]
    .iter()
    .map(|(name, zone, labels)| {
        format!("- {{name: {name}, namespace: {ns}, zone: {zone}, labels: {labels}}}\n")
    })
    .collect()
}

/// The record the operator writes for `pod` on `node` in `zone`.
fn pod_record(pod: &LocalPod, zone: &str, node: &str) -> String {
    serde_json::json!({
        "schemaVersion": 1,
        "namespace": pod.namespace,
        "pod": pod.name,
        "uid": format!("uid-{}", pod.name),
        "node": node,
        "zone": zone,
        "podIP": "",
        "serviceAccount": pod.service_account,
    })
    .to_string()
}

async fn put(cp: &ControlPlane, key: &str, value: &str) -> Result<()> {
    let out = cp.etcdctl(["put", key, value]).await?;
    if !out.status.success() {
        bail!(
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn members_of(history: &History, group: &str, prefix: &str) -> Vec<String> {
    let mut members: Vec<String> = history
        .deliveries_to(group)
        .into_iter()
        .filter(|d| d.message_id.starts_with(prefix))
        .map(|d| d.member)
        .collect();
    members.sort();
    members.dedup();
    members
}

async fn publish_batch(
    app: &str,
    history: &History,
    ns: &str,
    prefix: &str,
) -> Result<(), tonic::Status> {
    let mut app = client::connect(app)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    for i in 0..MESSAGES {
        publish(
            &mut app,
            history,
            "producer",
            &format!("{ns}/events"),
            &format!("{prefix}{i}"),
            None,
            b"z".to_vec(),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_without_a_zone_setting_learns_it_from_its_pod_record() -> Result<()> {
    let test = "a_sidecar_without_a_zone_setting_learns_it_from_its_pod_record";
    let cp = ControlPlane::shared().await?;
    let ns = format!("pz-{}", std::process::id());
    let mut manifests = Manifests::default();
    manifests.add_str(Path::new("<test>"), &crs(&ns))?;
    let local_pods = parse_pods(Path::new("<test pods>"), &pods(&ns))?;
    let dir = tempfile::tempdir()?;
    let specs = plan(&local_pods, next_subnet(), dir.path())?;
    ferryctl::mesh::identity::issue_all(dir.path(), &specs)?;
    let (table, problems) = build_table(&manifests, &local_pods, |p| peer_address(&specs, p), 1);
    anyhow::ensure!(problems.is_empty(), "{problems:?}");
    // The table as the operator writes it, without the pod records.
    for (key, value) in table.to_kv() {
        put(cp, &key, &value).await?;
    }
    let record_key = |pod: &LocalPod| format!("/ferry/v1/pods/{}/{}", pod.namespace, pod.name);
    // The consumers' records, as the operator writes them once they are scheduled.
    for pod in local_pods.iter().filter(|p| p.name != "producer") {
        put(
            cp,
            &record_key(pod),
            &pod_record(pod, &pod.zone, &pod.node_name()),
        )
        .await?;
    }
    let producer_pod = local_pods
        .iter()
        .find(|p| p.name == "producer")
        .context("producer")?;
    put(
        cp,
        &record_key(producer_pod),
        &pod_record(producer_pod, "zone-a", "node-1"),
    )
    .await?;

    let mut sidecars = Vec::new();
    for spec in &specs {
        sidecars.push(EtcdSidecar::start(spec, cp.etcd_endpoints()).await?);
    }
    let by_name = |name: &str| {
        sidecars
            .iter()
            .find(|s| s.spec.pod.name == name)
            .context("sidecar")
    };
    let producer = by_name("producer")?;
    let readyz = producer.wait_ready().await?;
    println!("producer /readyz: {readyz}");

    let history = History::default();
    let stop_at = Instant::now() + RUN_LIMIT;
    let mut consumers = Vec::new();
    for (member, group) in [
        ("nearby-a", "nearby"),
        ("nearby-b", "nearby"),
        ("strict-b", "strict"),
    ] {
        consumers.push(
            spawn_consumer(
                &by_name(member)?.app(),
                &format!("{ns}/{group}-events"),
                group,
                member,
                &history,
                Behavior::Ack,
                stop_at,
            )
            .await?,
        );
    }

    // Zone a, as its record says.
    publish_batch(&producer.app(), &history, &ns, "a-").await?;
    let nearby = [Expect::AnyMember {
        group: "nearby".into(),
        topic: format!("{ns}/events"),
        check_order: false,
    }];
    let c = super::common::drain(&history, &nearby, Duration::from_secs(60), test).await?;
    assert_eq!((c.lost, c.duplicated, c.unexpected), (0, 0, 0), "{c}");
    assert_eq!(
        members_of(&history, "nearby", "a-"),
        ["nearby-a"],
        "every delivery to the member in the producer's zone (zone-a, from its pod record)"
    );
    assert!(
        history.deliveries_to("strict").is_empty(),
        "SameZoneOnly crossed a zone"
    );
    producer
        .wait_metric(r#"ferry_sidecar_zone{zone="zone-a",node="node-1"} 1"#)
        .await
        .context("the zone in the metrics")?;
    let learned = producer.lines_with("zone-a");
    println!("producer log: {learned:?}");

    // The record moves the pod to zone-b: the sidecar re-learns it.
    put(
        cp,
        &record_key(producer_pod),
        &pod_record(producer_pod, "zone-b", "node-2"),
    )
    .await?;
    producer
        .wait_metric(r#"ferry_sidecar_zone{zone="zone-b",node="node-2"} 1"#)
        .await
        .context("the new zone in the metrics")?;
    anyhow::ensure!(
        !producer.lines_with("zone-b").is_empty(),
        "no log line names the new zone:\n{}",
        producer.tail()
    );
    publish_batch(&producer.app(), &history, &ns, "b-").await?;
    let both = [
        nearby[0].clone(),
        Expect::AnyMember {
            group: "strict".into(),
            topic: format!("{ns}/events"),
            check_order: false,
        },
    ];
    let c = super::common::drain(&history, &both, Duration::from_secs(60), test).await?;
    assert_eq!((c.lost, c.duplicated, c.unexpected), (0, 0, 0), "{c}");
    assert_eq!(
        members_of(&history, "nearby", "b-"),
        ["nearby-b"],
        "after the move every delivery to the zone-b member"
    );
    println!(
        "{test}: strict received {} (the zone-a messages waited for a same-zone member)",
        history.deliveries_to("strict").len()
    );
    for c in consumers {
        c.abort();
    }
    Ok(())
}
