//! docs/reliability.md row 24: the peer port speaks only mutual TLS. A caller with no
//! certificate, a plaintext one, one whose certificate another CA signed, one whose
//! certificate expired and one of another trust domain are each refused at the handshake;
//! none of their forged deliveries reaches the app, each refusal is counted, and the mesh's
//! own traffic flows throughout (lost = 0).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_api::identity::ca::Ca;
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::{
    Credentials, Expect, PeerTls, TrustBundle, anonymous_client_config, provider,
};
use ferry_api::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{Deliver, ForwardRequest, PeerMessage};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Counts, Expect as Want, History};
use ferryctl::client::App;
use ferryctl::metrics::{counter, scrape};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::common::{group, pod, subscription, topic};

pub(super) const HOUR: Duration = Duration::from_secs(3600);

/// One forged delivery into `default/workers-orders`, claiming to come from the producer.
pub(super) fn forged(n: u32) -> ForwardRequest {
    ForwardRequest {
        deliveries: vec![Deliver {
            subscription: "default/workers-orders".into(),
            producer: "default/producer".into(),
            offset: 1_000_000 + u64::from(n),
            attempt: 1,
            topic: "default/orders".into(),
            ack_wait_ms: 5_000,
            incarnation: 7,
            message: Some(PeerMessage {
                id: format!("forged-{n}"),
                payload: b"forged".to_vec().into(),
                ..PeerMessage::default()
            }),
        }],
    }
}

/// Tries to push a forged delivery on `channel`; returns how it failed (it must).
async fn try_forge(channel: Channel, n: u32) -> Result<String, String> {
    let mut client = PeerClient::new(channel);
    let call = async {
        let mut responses = client
            .forward(tokio_stream::iter(vec![forged(n)]))
            .await?
            .into_inner();
        // Accepted: whatever settlement comes back proves the delivery got in.
        responses.message().await
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Err(status)) => Ok(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(answer)) => Err(format!("forged delivery {n} accepted: {answer:?}")),
        Err(_) => Err(format!(
            "forged delivery {n}: neither refused nor answered in 10 s"
        )),
    }
}

/// Publishes `count` real messages numbered from `from`; returns the next number.
pub(super) async fn publish_batch(
    app: &mut App,
    history: &History,
    from: u32,
    count: u32,
) -> anyhow::Result<u32> {
    for n in from..from + count {
        let id = format!("real-{n}");
        publish(
            app,
            history,
            "producer",
            "default/orders",
            &id,
            None,
            b"real".to_vec(),
        )
        .await?;
    }
    Ok(from + count)
}

/// Waits until every acked real message was delivered to `workers`; returns the history's
/// counts and how many forged messages (ids starting with `forged`) reached the app.
pub(super) async fn delivered_without_forgeries(
    history: &History,
) -> anyhow::Result<(Counts, usize)> {
    let want = history.acked_ids().len();
    wait_for(
        Duration::from_secs(60),
        "every real message delivered",
        || history.deliveries_to("workers").len() >= want,
    )
    .await?;
    let forged = history
        .deliveries()
        .iter()
        .filter(|d| d.message_id.starts_with("forged"))
        .count();
    let counts = history.check(&[Want::AnyMember {
        group: "workers".into(),
        topic: "default/orders".into(),
        check_order: false,
    }]);
    Ok((counts, forged))
}

pub(super) fn tls_channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("peer address")
        .connect_with_connector_lazy(connector(config))
}

pub(super) fn client_with(ca: &Ca, bundle: &str, id: &SpiffeId, from: SystemTime) -> PeerTls {
    let issued = ca.issue_with_key(id, from, HOUR).expect("issue");
    PeerTls {
        credentials: Arc::new(
            Credentials::from_pem(&issued.cert_pem, &issued.key_pem, provider()).expect("creds"),
        ),
        bundle: Arc::new(TrustBundle::from_pem(bundle, provider()).expect("bundle")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_valid_certificate_get_nothing() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Disk"),
        group("workers", "worker", ""),
        subscription("workers-orders", "orders", "workers", "ackWait: 5s"),
    ]
    .concat();
    let pods = [
        pod("worker-a", "zone-a", "worker"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let worker = mesh.mesh.endpoints("worker-a")?;
    let peer = worker.peer.to_string();
    let history = History::default();
    let stop_at = Instant::now() + Duration::from_secs(90);
    let consumer = spawn_consumer(
        &mesh.app_addr("worker-a")?,
        "default/workers-orders",
        "workers",
        "worker-a",
        &history,
        Behavior::Ack,
        stop_at,
    )
    .await?;

    let mesh_ca = ferryctl::mesh::identity::ca(mesh.dir.path())?;
    let now = SystemTime::now();
    let producer_id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "default")?;
    let td = || Expect::TrustDomain(DEFAULT_TRUST_DOMAIN.into());
    let rogue = Ca::generate(DEFAULT_TRUST_DOMAIN, now, HOUR)?;
    let attempts: Vec<(&str, Channel)> = vec![
        (
            "plaintext",
            Endpoint::from_shared(format!("http://{peer}"))?.connect_lazy(),
        ),
        (
            "no certificate",
            tls_channel(
                &peer,
                anonymous_client_config(
                    Arc::new(TrustBundle::from_pem(mesh_ca.cert_pem(), provider())?),
                    td(),
                )?,
            ),
        ),
        (
            "another CA's certificate",
            tls_channel(
                &peer,
                client_with(&rogue, mesh_ca.cert_pem(), &producer_id, now).client_config(td())?,
            ),
        ),
        (
            "an expired certificate",
            tls_channel(
                &peer,
                client_with(&mesh_ca, mesh_ca.cert_pem(), &producer_id, now - 3 * HOUR)
                    .client_config(td())?,
            ),
        ),
        (
            "another trust domain's certificate",
            tls_channel(
                &peer,
                client_with(
                    &mesh_ca,
                    mesh_ca.cert_pem(),
                    &SpiffeId::new("other.mesh", "default", "default")?,
                    now,
                )
                .client_config(td())?,
            ),
        ),
    ];

    // The mesh's own traffic, before, between and after the forgeries.
    let mut app = mesh.app("producer").await?;
    let mut n = 0;
    n = publish_batch(&mut app, &history, n, 20).await?;
    let refused_before = counter(&scrape(worker.admin).await?, "peer_refused");
    for (i, (what, channel)) in attempts.into_iter().enumerate() {
        let how = try_forge(channel, i as u32)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        println!("peer_mtls: {what} -> refused ({how})");
        n = publish_batch(&mut app, &history, n, 10).await?;
    }

    let admin = worker.admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&scrape(admin).await?, "peer_refused") - refused_before < 5.0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every refusal was counted within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (counts, forged_seen) = delivered_without_forgeries(&history).await?;
    let refused = counter(&scrape(admin).await?, "peer_refused") - refused_before;
    println!(
        "peer_mtls: {counts}; refused connections {refused}; forged deliveries seen {forged_seen}"
    );
    assert_eq!(forged_seen, 0, "a forged delivery reached the app");
    assert_eq!(counts.lost, 0);
    assert_eq!(counts.unexpected, 0);
    consumer.abort();
    Ok(())
}

/// No plaintext fallback: the sidecar binary refuses to start without a certificate source,
/// and says which settings give it one.
#[tokio::test]
async fn a_sidecar_without_credentials_does_not_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let any = "127.0.0.1:0";
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(ferry_sidecar_tests::harness::sidecar_bin()?)
            .args(["--pod-name", "p", "--namespace", "default"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--app-grpc-addr", any, "--app-http-addr", any])
            .args(["--peer-addr", any, "--admin-addr", any])
            .args(["--etcd-endpoints", "http://127.0.0.1:9"])
            .env_remove("FERRY_TLS_DIR")
            .env_remove("FERRY_IDENTITY_URL")
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "peer_mtls: no credentials -> exit {:?}: {}",
        out.status.code(),
        stderr.trim()
    );
    assert!(!out.status.success(), "it started without credentials");
    assert!(
        stderr.contains("--tls-dir or --identity-url is required"),
        "{stderr}"
    );
    Ok(())
}
