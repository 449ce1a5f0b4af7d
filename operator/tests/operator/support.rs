//! What the operator's integration tests share: a namespace of their own on the shared
//! real control plane, an in-process operator, and reads of etcd and of objects.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use ferry_api::crd::Condition;
use ferry_api::routing::MemberEntry;
use ferry_api::{ConsumerGroup, Subscription, Topic};
use ferry_kind_tests::{CRDS_DIR, ControlPlane, wait_for_value};
use ferry_operator::Config;
use ferry_operator::etcd::EtcdStore;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Deadline of waits for the operator to converge.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// Field manager of what the tests apply (not the operator's).
const TEST_MANAGER: &str = "ferry-operator-tests";

/// One test's world: the shared control plane, a client and a namespace of its own.
pub struct World {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub etcd: EtcdStore,
}

impl World {
    /// Starts (or joins) the shared control plane, installs the CRDs and creates a fresh
    /// namespace `op-<name>-<random>`.
    pub async fn new(name: &str) -> Result<Self> {
        // `FERRY_TEST_LOG=ferry_operator=debug` shows the operators' logs (`--nocapture`).
        if let Ok(filter) = std::env::var("FERRY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let cp = ControlPlane::shared().await?;
        cp.install_crds(CRDS_DIR).await?;
        let client = cp.client().await?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("op-{name}-{}", &suffix[..6]);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": ns}
        }))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
        let etcd =
            EtcdStore::connect(&[cp.etcd_endpoints().to_owned()], Duration::from_secs(5)).await?;
        Ok(Self {
            cp,
            client,
            ns,
            etcd,
        })
    }

    /// An operator configuration for this world: its own Lease and fencing key, this
    /// namespace only, metrics on a free loopback port, short lease timings.
    pub fn config(&self, identity: &str) -> Config {
        let mut config = Config::new(vec![self.cp.etcd_endpoints().to_owned()]);
        config.kubeconfig = Some(self.cp.kubeconfig_path().to_owned());
        config.lease_namespace = self.ns.clone();
        config.lease_name = "ferry-operator".into();
        config.fence_key = self.fence_key();
        config.watch_namespace = Some(self.ns.clone());
        config.metrics_addr = "127.0.0.1:0".parse().unwrap_or(config.metrics_addr);
        config.identity = Some(identity.into());
        config.lease_duration = Duration::from_secs(4);
        config.renew_deadline = Duration::from_secs(3);
        config.retry_period = Duration::from_millis(500);
        config
    }

    /// This world's fencing key (outside `/ferry/v1/`).
    pub fn fence_key(&self) -> String {
        format!("/ferry/test/{}/leader", self.ns)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Server-side applies `object` (a JSON manifest without the namespace) as the test's
    /// own field manager.
    pub async fn apply<K>(&self, object: serde_json::Value) -> Result<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("manifest without metadata.name"))?
            .to_owned();
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .with_context(|| format!("applying {} {name}", K::kind(&())))
    }

    /// The routing-table keys of this namespace (every kind), with their values.
    pub async fn table(&self) -> Result<BTreeMap<String, String>> {
        let mut kv = BTreeMap::new();
        for kind in ["topics", "groups", "subscriptions", "members", "pods"] {
            let prefix = format!("/ferry/v1/{kind}/{}/", self.ns);
            kv.extend(self.etcd.get_prefix(&prefix).await?.kvs);
        }
        Ok(kv)
    }

    /// The highest `mod_revision` among this namespace's routing keys, and their count:
    /// unchanged exactly when none of them was written.
    pub async fn table_revision(&self) -> Result<(i64, usize)> {
        let mut max = 0;
        let mut count = 0;
        for kind in ["topics", "groups", "subscriptions", "members", "pods"] {
            let prefix = format!("/ferry/v1/{kind}/{}/", self.ns);
            let snapshot = self.etcd.get_prefix(&prefix).await?;
            max = max.max(snapshot.max_mod_revision);
            count += snapshot.kvs.len();
        }
        Ok((max, count))
    }

    /// The key of an entry of this namespace.
    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("/ferry/v1/{kind}/{}/{name}", self.ns)
    }

    /// Waits until `key` holds a value that satisfies `check`, and returns it.
    pub async fn wait_key(
        &self,
        key: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        wait_for_value(CONVERGE, || async {
            let found = self.etcd.get_keys(&[key.to_owned()]).await?;
            let Some(value) = found.get(key) else {
                return Ok(None);
            };
            let value: serde_json::Value = serde_json::from_str(value)?;
            Ok(check(&value).then_some(value))
        })
        .await
        .with_context(|| format!("etcd key {key}"))
    }

    /// Waits until `key` is absent.
    pub async fn wait_no_key(&self, key: &str, timeout: Duration) -> Result<()> {
        wait_for_value(timeout, || async {
            let found = self.etcd.get_keys(&[key.to_owned()]).await?;
            Ok(found.is_empty().then_some(()))
        })
        .await
        .with_context(|| format!("etcd key {key} is deleted"))
    }
}

/// The `Ready` condition among `conditions`.
pub fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == "Ready")
}

/// An operator running in this process.
pub struct Operator {
    pub running: ferry_operator::Running,
    shutdown: CancellationToken,
}

impl Operator {
    pub async fn start(config: Config) -> Result<Self> {
        let shutdown = CancellationToken::new();
        let running = ferry_operator::spawn(config, shutdown.clone()).await?;
        Ok(Self { running, shutdown })
    }

    /// Shuts it down (releasing the Lease) and waits for it, with a deadline.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        match tokio::time::timeout(CONVERGE, self.running.task).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(join)) => bail!("the operator task failed: {join}"),
            Err(_) => bail!("the operator did not stop within {CONVERGE:?}"),
        }
    }

    /// Ends it the way `kill -9` would: no release of the Lease, no goodbye. (Only the
    /// HTTP server is stopped afterwards, so that its port is freed.)
    pub async fn kill(self) -> Result<()> {
        self.running.task.abort();
        let _ = self.running.task.await;
        self.shutdown.cancel();
        Ok(())
    }

    /// `GET path` on the metrics address: (status code, body).
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        ferry_kind_tests::http::http_get(self.running.metrics_addr, path).await
    }

    /// The value of a metric sample (`name{labels}` exactly as exposed), 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.running.metrics.encode();
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// Waits until this operator has completed at least one reconcile of every kind (and a
    /// pass of the pod records).
    pub async fn wait_reconciled_all(&self) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            let done = ["Topic", "ConsumerGroup", "Subscription", "Pod"]
                .iter()
                .all(|kind| {
                    self.metric(&format!(
                        "ferry_operator_reconcile_duration_seconds_count{{kind=\"{kind}\"}}"
                    )) >= 1.0
                });
            Ok(done.then_some(()))
        })
        .await
        .context("the operator reconciles every kind")
    }

    /// Asserts that this operator sent no status patch and changed no etcd key.
    pub fn assert_wrote_nothing(&self) -> Result<()> {
        for kind in ["Topic", "ConsumerGroup", "Subscription"] {
            let patches = self.metric(&format!(
                "ferry_operator_status_patches_total{{kind=\"{kind}\"}}"
            ));
            anyhow::ensure!(patches == 0.0, "{kind}: {patches} status patches");
        }
        let changes = self.metric("ferry_operator_etcd_changes_total");
        anyhow::ensure!(changes == 0.0, "{changes} etcd keys changed");
        Ok(())
    }

    /// Waits until this operator leads.
    pub async fn wait_leading(&self) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            Ok((self.metric("ferry_operator_leader") == 1.0).then_some(()))
        })
        .await
        .context("the operator becomes the leader")
    }
}

// Manifests and waits the test modules share.

pub fn topic(name: &str, durability: &str) -> serde_json::Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Topic",
        "metadata": {"name": name},
        "spec": {"durability": durability}
    })
}

pub fn group(name: &str, app: &str) -> serde_json::Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "ConsumerGroup",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": app}}, "delivery": "Unicast"}
    })
}

pub fn subscription(name: &str, topic: &str, group: &str) -> serde_json::Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Subscription",
        "metadata": {"name": name},
        "spec": {"topic": topic, "group": group}
    })
}

/// Waits until the object's Ready condition has `status` and `observedGeneration ==
/// generation`, and returns the object.
pub async fn wait_ready<K>(
    world: &World,
    name: &str,
    status: &str,
    conditions: impl Fn(&K) -> Vec<ferry_api::crd::Condition>,
    observed: impl Fn(&K) -> Option<i64>,
) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = world.api::<K>();
    wait_for_value(CONVERGE, || async {
        let object = api.get(name).await?;
        let conds = conditions(&object);
        let ok = ready(&conds).is_some_and(|c| {
            c.status == status && c.observed_generation == object.meta().generation
        }) && observed(&object) == object.meta().generation;
        Ok(ok.then_some(object))
    })
    .await
    .with_context(|| {
        format!(
            "{} {name} has Ready={status} for its generation",
            K::kind(&())
        )
    })
}

pub async fn topic_ready(world: &World, name: &str, status: &str) -> Result<Topic> {
    wait_ready::<Topic>(
        world,
        name,
        status,
        |t| t.status.clone().map(|s| s.conditions).unwrap_or_default(),
        |t| t.status.as_ref().and_then(|s| s.observed_generation),
    )
    .await
}

pub async fn group_ready(world: &World, name: &str) -> Result<ConsumerGroup> {
    wait_ready::<ConsumerGroup>(
        world,
        name,
        "True",
        |g| g.status.clone().map(|s| s.conditions).unwrap_or_default(),
        |g| g.status.as_ref().and_then(|s| s.observed_generation),
    )
    .await
}

pub async fn subscription_ready(world: &World, name: &str, status: &str) -> Result<Subscription> {
    wait_ready::<Subscription>(
        world,
        name,
        status,
        |s| s.status.clone().map(|s| s.conditions).unwrap_or_default(),
        |s| s.status.as_ref().and_then(|s| s.observed_generation),
    )
    .await
}

/// Waits until the object is gone from the API server (its finalizer removed).
pub async fn wait_gone<K>(world: &World, name: &str) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = world.api::<K>();
    wait_for_value(CONVERGE, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
    .with_context(|| format!("{} {name} is deleted", K::kind(&())))
}

/// A pod manifest; `sidecar` is `native` (the sidecar as an init container), `plain` (as a
/// plain container), `named` (a native one but no injection annotation: a container merely
/// named like the sidecar, which is not trusted) or anything else for none.
pub fn pod(name: &str, app: &str, node: &str, sidecar: &str) -> serde_json::Value {
    let sidecar_container =
        json!({"name": "ferry-sidecar", "image": "ferry/sidecar", "restartPolicy": "Always"});
    let app_container = json!({"name": "app", "image": "app"});
    let spec = match sidecar {
        "native" | "named" => {
            json!({"nodeName": node, "initContainers": [sidecar_container], "containers": [app_container]})
        }
        "plain" => {
            json!({"nodeName": node, "containers": [app_container, {"name": "ferry-sidecar", "image": "ferry/sidecar"}]})
        }
        _ => json!({"nodeName": node, "containers": [app_container]}),
    };
    let mut metadata = json!({"name": name, "labels": {"app": app}});
    if matches!(sidecar, "native" | "plain") {
        metadata["annotations"] = json!({"ferry.dev/inject": "true"});
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// Sets a pod's status as a kubelet would.
pub async fn set_pod_status(world: &World, name: &str, ip: &str, ready: bool) -> Result<()> {
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    }});
    world
        .api::<Pod>()
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting the status of pod {name}"))?;
    Ok(())
}

pub async fn members(
    world: &World,
    group: &str,
) -> Result<std::collections::BTreeMap<String, MemberEntry>> {
    let prefix = format!("/ferry/v1/members/{}/{group}/", world.ns);
    let snapshot = world.etcd.get_prefix(&prefix).await?;
    snapshot
        .kvs
        .iter()
        .map(|(k, v)| {
            Ok((
                k.trim_start_matches(&prefix).to_owned(),
                serde_json::from_str(v)?,
            ))
        })
        .collect()
}

/// Waits until the member set is exactly `expected` (pod names), timing the wait.
pub async fn wait_members(
    world: &World,
    group: &str,
    expected: &[&str],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    wait_for_value(timeout, || async {
        let found = members(world, group).await?;
        Ok(found
            .keys()
            .map(String::as_str)
            .eq(expected.iter().copied())
            .then_some(()))
    })
    .await
    .with_context(|| format!("members of {group} become {expected:?}"))?;
    Ok(start.elapsed())
}
