//! The identity service as sidecars use it: `ferry.v1.Identity/Certify` over TLS from an
//! operator with `--identity-addr`, against the real API server's TokenReview, and a real
//! `ferry-sidecar` process that gets its certificate from it and presents it on its peer
//! port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, ensure};
use ferry_api::consts::{IDENTITY_AUDIENCE, OPERATOR_SERVICE_ACCOUNT};
use ferry_api::identity::ca::{Ca, new_csr};
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::certs_from_pem;
use ferry_api::identity::tls::{
    Credentials, Expect, PeerTls, TrustBundle, anonymous_client_config, provider,
};
use ferry_api::identity::{SpiffeId, spiffe_id_of};
use ferry_api::proto::v1::identity_client::IdentityClient;
use ferry_api::proto::v1::{CertifyRequest, CertifyResponse};
use ferry_kind_tests::binaries::binaries;
use ferry_kind_tests::http::http_get;
use ferry_kind_tests::wait_for_value;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::PostParams;
use rustls::pki_types::ServerName;
use serde_json::json;
use tonic::Code;
use tonic::transport::Endpoint;

use super::identity::{create_pod, token};
use super::support::{CONVERGE, Operator, World};

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The mesh's CA as the operator stored it in the world's namespace.
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

async fn certify(
    addr: SocketAddr,
    anchors: &str,
    server: &SpiffeId,
    token: String,
) -> std::result::Result<CertifyResponse, tonic::Status> {
    let bundle = Arc::new(TrustBundle::from_pem(anchors, provider()).map_err(internal)?);
    let config =
        anonymous_client_config(bundle, Expect::Exactly(server.clone())).map_err(internal)?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(internal)?
        .connect_with_connector(connector(config))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let (csr_pem, _key) = new_csr().map_err(internal)?;
    let answer = IdentityClient::new(channel)
        .certify(CertifyRequest { token, csr_pem })
        .await?
        .into_inner();
    Ok(answer)
}

fn internal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(e.to_string())
}

#[tokio::test]
async fn sidecars_get_their_pods_identity_from_the_operator() -> Result<()> {
    let world = World::new("identity-svc").await?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "orders"}}))?;
    world
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    let injected = create_pod(&world, "orders-0", "orders", true).await?;
    let spoofing = create_pod(&world, "spoofer-0", "orders", false).await?;

    let listen = free_addr()?;
    let mut config = world.config("identity-svc");
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
    let anchors = ca.cert_pem().to_owned();
    let server = SpiffeId::new("cluster.local", &world.ns, OPERATOR_SERVICE_ACCOUNT)?;

    // A good token buys the pod's identity.
    let good = token(&world, "orders", IDENTITY_AUDIENCE, Some(&injected)).await?;
    let chain = certify(addr, &anchors, &server, good.clone())
        .await
        .map_err(|s| anyhow!("certify: {s}"))?
        .certificate_pem;
    let id = spiffe_id_of(&certs_from_pem(&chain, "leaf")?[0])?;
    let want = format!("spiffe://cluster.local/ns/{}/sa/orders", world.ns);
    println!("identity service: issued {id}");
    assert_eq!(id.to_string(), want);

    // Refusals, each with the status a client acts on.
    let other_audience = token(
        &world,
        "orders",
        "https://kubernetes.default.svc",
        Some(&injected),
    )
    .await?;
    let not_injected = token(&world, "orders", IDENTITY_AUDIENCE, Some(&spoofing)).await?;
    let cases = [
        ("no token", String::new(), Code::Unauthenticated),
        (
            "garbage token",
            "not-a-token".to_owned(),
            Code::Unauthenticated,
        ),
        ("another audience", other_audience, Code::Unauthenticated),
        (
            "a pod that was not injected",
            not_injected,
            Code::PermissionDenied,
        ),
    ];
    for (what, token, code) in cases {
        let status = certify(addr, &anchors, &server, token)
            .await
            .err()
            .ok_or_else(|| anyhow!("{what}: a certificate was issued"))?;
        println!(
            "identity service: {what} -> {:?}: {}",
            status.code(),
            status.message()
        );
        assert_eq!(status.code(), code, "{what}: {status}");
    }
    // A client that expects another server identity does not talk to this one.
    let impostor = SpiffeId::new("cluster.local", &world.ns, "someone-else")?;
    let status = certify(addr, &anchors, &impostor, good.clone())
        .await
        .err()
        .ok_or_else(|| anyhow!("a client accepted the wrong server identity"))?;
    assert_eq!(status.code(), Code::Unavailable, "{status}");

    // A real sidecar: certificate from the service, presented on its peer port.
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &good)?;
    let (peer, admin) = (free_addr()?, free_addr()?);
    let log = std::fs::File::create(dir.path().join("sidecar.log"))?;
    let bins = tokio::task::spawn_blocking(binaries).await??;
    let mut sidecar = tokio::process::Command::new(&bins.sidecar)
        .env("FERRY_POD_NAME", "orders-0")
        .env("FERRY_NAMESPACE", &world.ns)
        .env("FERRY_SERVICE_ACCOUNT", "orders")
        .env("FERRY_DATA_DIR", dir.path().join("data"))
        .env("FERRY_ETCD_ENDPOINTS", world.cp.etcd_endpoints())
        .env("FERRY_APP_GRPC_ADDR", free_addr()?.to_string())
        .env("FERRY_APP_HTTP_ADDR", free_addr()?.to_string())
        .env("FERRY_PEER_ADDR", peer.to_string())
        .env("FERRY_ADMIN_ADDR", admin.to_string())
        .env("FERRY_IDENTITY_URL", format!("https://{addr}"))
        .env("FERRY_IDENTITY_SERVER", server.to_string())
        .env("FERRY_IDENTITY_TRUST_ANCHORS", &anchors)
        .env("FERRY_IDENTITY_TOKEN_FILE", &token_file)
        .env("NO_COLOR", "1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let ready = wait_for_value(CONVERGE, || async {
        let (status, _) = http_get(admin, "/readyz").await?;
        Ok((status == 200).then_some(()))
    })
    .await;
    let log_text = std::fs::read_to_string(dir.path().join("sidecar.log")).unwrap_or_default();
    ready.with_context(|| format!("the sidecar is ready; its log:\n{log_text}"))?;

    // A peer with a certificate of the mesh's CA sees the pod's identity on that port.
    let me = ca.issue_with_key(
        &SpiffeId::new("cluster.local", &world.ns, "peer")?,
        SystemTime::now(),
        Duration::from_secs(600),
    )?;
    let tls = PeerTls {
        credentials: Arc::new(Credentials::from_pem(
            &me.cert_pem,
            &me.key_pem,
            provider(),
        )?),
        bundle: Arc::new(TrustBundle::from_pem(&anchors, provider())?),
    };
    let pod_id: SpiffeId = want.parse()?;
    let config = tls.client_config(Expect::Exactly(pod_id.clone()))?;
    let tcp = tokio::net::TcpStream::connect(peer).await?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("peer.ferry.invalid")?, tcp)
        .await
        .context("a mutual TLS handshake with the sidecar, expecting the pod's identity")?;
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the sidecar presented no certificate")?;
    let presented = spiffe_id_of(presented)?;
    println!("identity service: the sidecar presents {presented}");
    ensure!(
        presented == pod_id,
        "the sidecar presents {presented}, not {pod_id}"
    );
    sidecar.start_kill()?;
    sidecar.wait().await?;

    // CA rotation: a new CA signs, the bundle holds the old and the new root.
    let new_ca = Ca::generate(
        "cluster.local",
        SystemTime::now(),
        Duration::from_secs(86_400),
    )?;
    let bundle = format!("{}{}", ca.cert_pem(), new_ca.cert_pem());
    let rotated = json!({"stringData": {
        "tls.crt": new_ca.cert_pem(), "tls.key": new_ca.key_pem(), "ca.crt": bundle,
    }});
    world
        .api::<Secret>()
        .patch(
            "ferry-identity-ca",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&rotated),
        )
        .await?;
    // Once the operator has followed, the service proves itself with the new CA alone, and
    // hands out both roots with the certificates it signs.
    let answer = wait_for_value(Duration::from_secs(90), || async {
        Ok(certify(addr, new_ca.cert_pem(), &server, good.clone())
            .await
            .ok())
    })
    .await
    .context("the identity service follows the rotated CA")?;
    let roots = certs_from_pem(&answer.trust_bundle_pem, "bundle")?;
    println!(
        "identity service: after the rotation the bundle holds {} roots",
        roots.len()
    );
    assert_eq!(roots.len(), 2, "old and new root during the overlap");
    operator.stop().await
}
