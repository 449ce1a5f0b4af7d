//! Workload certificates through the real API server: a sidecar presenting its pod's
//! projected service-account token (audience `ferry.dev/identity`, bound to the pod) is
//! issued a certificate for the pod's namespace and service account, whatever its CSR asks;
//! a garbage token, one for another audience, one bound to no pod, a pod that was not
//! injected (a container merely named like the sidecar), and a pod that asks for injection
//! but brings its own `ferry-sidecar` (another image, or a plain container) get nothing. The CA itself lives
//! in a Secret, made once however many replicas start at once.

use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use ferry_api::consts::IDENTITY_AUDIENCE;
use ferry_api::identity::ca::{Ca, new_csr};
use ferry_api::identity::spiffe_id_of;
use ferry_api::identity::tls::certs_from_pem;
use ferry_operator::identity::{Certifier, CertifyError, load_or_create};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use serde_json::json;

use super::support::{World, pod};

pub async fn token(world: &World, sa: &str, audience: &str, pod: Option<&Pod>) -> Result<String> {
    let bound = pod.map(|p| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
    });
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            bound_object_ref: bound,
            expiration_seconds: Some(600),
        }),
        ..TokenRequest::default()
    };
    let answer = world
        .api::<ServiceAccount>()
        .create_token_request(sa, &PostParams::default(), &request)
        .await?;
    answer
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("the token request returned no token"))
}

pub async fn create_pod(world: &World, name: &str, sa: &str, injected: bool) -> Result<Pod> {
    let sidecar = if injected { "native" } else { "named" };
    let mut spec = pod(name, "orders", "node-a", sidecar);
    spec["spec"]["serviceAccountName"] = json!(sa);
    Ok(world
        .api::<Pod>()
        .create(&PostParams::default(), &serde_json::from_value(spec)?)
        .await?)
}

#[tokio::test]
async fn a_pods_token_buys_its_identity_and_nothing_else() -> Result<()> {
    let world = World::new("identity").await?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "orders"}}))?;
    world
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    let injected = create_pod(&world, "orders-0", "orders", true).await?;
    let spoofing = create_pod(&world, "spoofer-0", "orders", false).await?;
    // Asks for injection and brings its own `ferry-sidecar` (created directly, as a namespace
    // the webhook does not select allows): another image, or not a native sidecar.
    let mut own = pod("own-0", "orders", "node-a", "native");
    own["spec"]["serviceAccountName"] = json!("orders");
    own["spec"]["initContainers"][0]["image"] = json!("evil:latest");
    let own: Pod = world
        .api::<Pod>()
        .create(&PostParams::default(), &serde_json::from_value(own)?)
        .await?;
    let mut plain = pod("plain-0", "orders", "node-a", "plain");
    plain["spec"]["serviceAccountName"] = json!("orders");
    let plain: Pod = world
        .api::<Pod>()
        .create(&PostParams::default(), &serde_json::from_value(plain)?)
        .await?;
    let ca = Ca::generate(
        "cluster.local",
        SystemTime::now(),
        Duration::from_secs(86_400),
    )?;
    let certifier = Certifier::new(
        world.client.clone(),
        ca,
        "cluster.local",
        Duration::from_secs(3600),
        "ferry/sidecar",
    );
    let (csr, _key) = new_csr()?;

    let good = token(&world, "orders", IDENTITY_AUDIENCE, Some(&injected)).await?;
    let issued = certifier.certify(&good, &csr).await?;
    let leaf = certs_from_pem(&issued.chain_pem, "leaf")?;
    let id = spiffe_id_of(&leaf[0])?;
    println!("identity: issued {id}, valid until {:?}", issued.not_after);
    assert_eq!(
        id.to_string(),
        format!("spiffe://cluster.local/ns/{}/sa/orders", world.ns)
    );
    assert_eq!(issued.identity, id);

    let refusals = [
        ("garbage token", "not-a-token".to_owned()),
        (
            "another audience",
            token(
                &world,
                "orders",
                "https://kubernetes.default.svc",
                Some(&injected),
            )
            .await?,
        ),
        (
            "no pod bound",
            token(&world, "orders", IDENTITY_AUDIENCE, None).await?,
        ),
        (
            "a pod that was not injected",
            token(&world, "orders", IDENTITY_AUDIENCE, Some(&spoofing)).await?,
        ),
        (
            "a pod with its own ferry-sidecar of another image",
            token(&world, "orders", IDENTITY_AUDIENCE, Some(&own)).await?,
        ),
        (
            "a pod whose ferry-sidecar is a plain container",
            token(&world, "orders", IDENTITY_AUDIENCE, Some(&plain)).await?,
        ),
    ];
    for (what, token) in refusals {
        let err = certifier
            .certify(&token, &csr)
            .await
            .err()
            .ok_or_else(|| anyhow!("{what}: a certificate was issued"))?;
        println!("identity: {what} -> refused: {err}");
        assert!(!matches!(err, CertifyError::Kube(_)), "{what}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn the_ca_is_made_once_and_shared() -> Result<()> {
    let world = World::new("identity-ca").await?;
    let year = Duration::from_secs(365 * 86_400);
    // Two replicas starting at once: one CA.
    let (a, b) = tokio::join!(
        load_or_create(
            world.client.clone(),
            &world.ns,
            "ferry-identity-ca",
            "cluster.local",
            year
        ),
        load_or_create(
            world.client.clone(),
            &world.ns,
            "ferry-identity-ca",
            "cluster.local",
            year
        ),
    );
    let (a, b) = (a?.ca, b?.ca);
    assert_eq!(a.cert_pem(), b.cert_pem(), "two CAs were made");
    let again = load_or_create(
        world.client.clone(),
        &world.ns,
        "ferry-identity-ca",
        "cluster.local",
        year,
    )
    .await?
    .ca;
    assert_eq!(again.cert_pem(), a.cert_pem(), "a restart made a new CA");

    // A Secret that holds no CA (a leaf, as a mistaken cert-manager Certificate would):
    // a clear error naming the Secret.
    let id = ferry_api::identity::SpiffeId::new("cluster.local", "x", "y")?;
    let leaf = a.issue_with_key(&id, SystemTime::now(), Duration::from_secs(60))?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "not-a-ca"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem},
    }))?;
    world
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    let err = load_or_create(
        world.client.clone(),
        &world.ns,
        "not-a-ca",
        "cluster.local",
        year,
    )
    .await
    .err()
    .ok_or_else(|| anyhow!("a leaf was taken for a CA"))?;
    println!("identity: a Secret holding a leaf -> {err}");
    let text = err.to_string();
    assert!(
        text.contains("not-a-ca") && text.contains("not a CA"),
        "{text}"
    );
    Ok(())
}
