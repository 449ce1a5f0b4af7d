//! The routing service as sidecars use it: `ferry.v1.Routing/Watch` on the identity
//! service's port, against the real etcd the operator follows. A sidecar identity of one
//! namespace streams its scoped table and never another tenant's entries; a caller without
//! a certificate, or with one of another service account, is refused; a change in etcd
//! reaches the stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use ferry_api::consts::OPERATOR_SERVICE_ACCOUNT;
use ferry_api::identity::SpiffeId;
use ferry_api::identity::ca::Ca;
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::{
    Credentials, Expect, PeerTls, TrustBundle, anonymous_client_config, provider,
};
use ferry_api::proto::v1::routing_client::RoutingClient;
use ferry_api::proto::v1::{RoutingUpdate, WatchRoutingRequest};
use ferry_api::routing::{PREFIX, RoutingTable};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::PostParams;
use rustls::ClientConfig;
use serde_json::json;
use tonic::Code;
use tonic::transport::Endpoint;

use super::identity::create_pod;
use super::support::{CONVERGE, Operator, World, topic};

async fn stored_ca(world: &World) -> Result<Ca> {
    let secret = world.api::<Secret>().get("ferry-identity-ca").await?;
    let data = secret.data.context("the CA Secret has no data")?;
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .with_context(|| format!("the CA Secret has no {k}"))
    };
    Ok(Ca::from_pem(&text("tls.crt")?, &text("tls.key")?)?)
}

/// A client config presenting a certificate of `ca` for `sa` of `ns`.
fn as_identity(ca: &Ca, ns: &str, sa: &str, server: &SpiffeId) -> Result<Arc<ClientConfig>> {
    let me = ca.issue_with_key(
        &SpiffeId::new("cluster.local", ns, sa)?,
        SystemTime::now(),
        Duration::from_secs(600),
    )?;
    let tls = PeerTls {
        credentials: Arc::new(Credentials::from_pem(
            &me.cert_pem,
            &me.key_pem,
            provider(),
        )?),
        bundle: Arc::new(TrustBundle::from_pem(ca.cert_pem(), provider())?),
    };
    Ok(tls.client_config(Expect::Exactly(server.clone()))?)
}

async fn watch(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    pod: &str,
) -> std::result::Result<tonic::Streaming<RoutingUpdate>, tonic::Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect_with_connector(connector(config))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    Ok(RoutingClient::new(channel)
        .watch(WatchRoutingRequest { pod: pod.into() })
        .await?
        .into_inner())
}

/// Applies one update to `table` as a sidecar does.
fn apply(table: &mut RoutingTable, update: &RoutingUpdate) -> Result<()> {
    if update.snapshot {
        *table = RoutingTable::default();
    }
    for entry in &update.put {
        table.apply_kv(&entry.key, Some(&entry.value))?;
    }
    for key in &update.deleted {
        table.apply_kv(key, None)?;
    }
    table.revision = update.revision;
    Ok(())
}

#[tokio::test]
async fn a_sidecar_streams_its_scope_and_never_another_tenants() -> Result<()> {
    let world = World::new("routing-svc").await?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "orders"}}))?;
    world
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    create_pod(&world, "orders-0", "orders", true).await?;
    world
        .apply::<ferry_api::crd::Topic>(topic("orders", "Disk"))
        .await?;

    // Another tenant's entries, straight into etcd (outside this operator's namespace).
    let other = format!("{}-b", world.ns);
    let mut etcd = etcd_client::Client::connect([world.cp.etcd_endpoints()], None).await?;
    let mut theirs = RoutingTable::default();
    let mut secret: ferry_api::routing::TopicEntry = serde_json::from_value(json!({
        "schemaVersion": 1, "namespace": other, "name": "ledger", "durability": "Disk",
        "replicas": 1, "ordering": "None", "retentionMaxAgeMs": 1, "retentionMaxBytes": 1,
        "maxMessageBytes": 1, "dedupWindowMs": 1, "allowedPublishers": null,
        "allowedSubscriberNamespaces": [],
    }))?;
    theirs
        .topics
        .insert(format!("{other}/ledger"), secret.clone());
    for (key, value) in theirs.to_kv() {
        etcd.put(key, value, None).await?;
    }

    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut config = world.config("routing-svc");
    config.workload_identity.identity_addr = Some(listen);
    config.workload_identity.identity_url = Some(format!("https://{listen}"));
    config.workload_identity.trust_domain = "cluster.local".into();
    // The image of `support::pod`'s sidecar: the identity service checks it.
    config.sidecar_image = "ferry/sidecar".into();
    let operator = Operator::start(config).await?;
    let addr = operator
        .running
        .identity_addr
        .context("the identity service is served")?;
    let ca = stored_ca(&world).await?;
    let server = SpiffeId::new("cluster.local", &world.ns, OPERATOR_SERVICE_ACCOUNT)?;

    // No certificate: UNAUTHENTICATED.
    let bundle = Arc::new(TrustBundle::from_pem(ca.cert_pem(), provider())?);
    let anonymous = anonymous_client_config(bundle, Expect::Exactly(server.clone()))?;
    let status = watch(addr, anonymous, "orders-0")
        .await
        .err()
        .ok_or_else(|| anyhow!("a caller without a certificate got a stream"))?;
    println!(
        "routing service: no certificate -> {:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    // A certificate of another service account of the namespace: not that pod.
    let wrong = as_identity(&ca, &world.ns, "someone-else", &server)?;
    let status = watch(addr, wrong, "orders-0")
        .await
        .err()
        .ok_or_else(|| anyhow!("another service account got the pod's stream"))?;
    println!(
        "routing service: another service account -> {:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");

    // The pod's own identity: a snapshot with its namespace's entries and none of B's.
    let mine = as_identity(&ca, &world.ns, "orders", &server)?;
    let mut stream = tokio::time::timeout(CONVERGE, async {
        loop {
            match watch(addr, mine.clone(), "orders-0").await {
                Ok(stream) => return Ok(stream),
                // The pod record may not be written yet.
                Err(s) if s.code() == Code::NotFound || s.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(anyhow!("watch: {s}")),
            }
        }
    })
    .await
    .context("the pod's stream opens")??;
    let mut table = RoutingTable::default();
    let first = stream.message().await?.context("a first update")?;
    assert!(first.snapshot, "the first update is a snapshot");
    apply(&mut table, &first)?;
    let leaked = |t: &RoutingTable| {
        t.to_kv()
            .into_keys()
            .filter(|k| {
                !k.starts_with(&format!("{PREFIX}topics/{}/", world.ns))
                    && !k.starts_with(&format!("{PREFIX}pods/{}/orders-0", world.ns))
            })
            .collect::<Vec<_>>()
    };
    // Wait for its topic (the operator may still be writing it).
    let want = format!("{}/orders", world.ns);
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !table.topics.contains_key(&want) {
        let update = tokio::time::timeout_at(deadline, stream.message())
            .await
            .context("its topic reaches the stream")??
            .context("the stream ended")?;
        apply(&mut table, &update)?;
    }
    println!(
        "routing service: snapshot at revision {} with {} entries, foreign: {:?}",
        table.revision,
        table.to_kv().len(),
        leaked(&table)
    );
    assert!(table.pods.contains_key(&format!("{}/orders-0", world.ns)));
    assert_eq!(leaked(&table), Vec::<String>::new(), "only its own entries");

    // A change in etcd reaches the stream; B's change does not.
    secret.replicas = 2;
    etcd.put(
        format!("{PREFIX}topics/{other}/ledger"),
        serde_json::to_string(&secret)?,
        None,
    )
    .await?;
    world
        .apply::<ferry_api::crd::Topic>(topic("payments", "Memory"))
        .await?;
    let want = format!("{}/payments", world.ns);
    let before = table.revision;
    while !table.topics.contains_key(&want) {
        let update = tokio::time::timeout(CONVERGE, stream.message())
            .await
            .context("the new topic reaches the stream")??
            .context("the stream ended")?;
        assert!(!update.snapshot && update.revision > before, "a newer diff");
        apply(&mut table, &update)?;
    }
    println!(
        "routing service: the new topic arrived at revision {}",
        table.revision
    );
    assert_eq!(
        leaked(&table),
        Vec::<String>::new(),
        "still only its own entries"
    );
    etcd.delete(format!("{PREFIX}topics/{other}/ledger"), None)
        .await?;
    operator.stop().await
}
