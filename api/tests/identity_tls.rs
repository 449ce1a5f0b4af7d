//! Mutual TLS between two peers over real loopback sockets: who gets in, who is refused,
//! and rotation of keys and roots (the next handshake uses the new ones).

// Helpers of a test binary panic on setup failures, as the tests themselves do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_api::identity::SpiffeId;
use ferry_api::identity::ca::Ca;
use ferry_api::identity::tls::{
    Credentials, Expect, PeerTls, TrustBundle, anonymous_client_config, peer_identity, provider,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);
const TD: &str = "ferry.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn tls_for(ca: &Ca, bundle: &str, who: &SpiffeId, now: SystemTime, ttl: Duration) -> PeerTls {
    let issued = ca.issue_with_key(who, now, ttl).unwrap();
    PeerTls {
        credentials: Arc::new(
            Credentials::from_pem(&issued.cert_pem, &issued.key_pem, provider()).unwrap(),
        ),
        bundle: Arc::new(TrustBundle::from_pem(bundle, provider()).unwrap()),
    }
}

/// Outcome of one connection: what the server saw, and whether the client could exchange
/// a byte with it.
struct Outcome {
    server: Result<SpiffeId, String>,
    client: Result<SpiffeId, String>,
}

async fn connect(server: &PeerTls, client: Arc<rustls::ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config().unwrap());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let who = peer_identity(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(who)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("peer.ferry").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let who = peer_identity(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(who)
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .map(|r| r.unwrap())
        .unwrap_or_else(|_| Err("server timed out".into()));
    Outcome { server, client }
}

fn td() -> Expect {
    Expect::TrustDomain(TD.into())
}

#[tokio::test]
async fn peers_of_one_ca_see_each_others_identity() {
    let now = SystemTime::now();
    let ca = Ca::generate(TD, now, HOUR).unwrap();
    let server = tls_for(&ca, ca.cert_pem(), &id("shop", "orders"), now, HOUR);
    let client = tls_for(&ca, ca.cert_pem(), &id("shop", "billing"), now, HOUR);
    let out = connect(&server, client.client_config(td()).unwrap()).await;
    assert_eq!(out.server.unwrap(), id("shop", "billing"));
    assert_eq!(out.client.unwrap(), id("shop", "orders"));

    let exact = Expect::Exactly(id("shop", "orders"));
    let out = connect(&server, client.client_config(exact).unwrap()).await;
    assert!(out.server.is_ok() && out.client.is_ok());
}

#[tokio::test]
async fn a_client_without_a_certificate_gets_nothing() {
    let now = SystemTime::now();
    let ca = Ca::generate(TD, now, HOUR).unwrap();
    let server = tls_for(&ca, ca.cert_pem(), &id("shop", "orders"), now, HOUR);
    let anonymous = anonymous_client_config(server.bundle.clone(), td()).unwrap();
    let out = connect(&server, anonymous).await;
    let err = out.server.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn another_cas_expired_and_wrong_identities_are_refused() {
    let now = SystemTime::now();
    let ca = Ca::generate(TD, now, HOUR).unwrap();
    let server = tls_for(&ca, ca.cert_pem(), &id("shop", "orders"), now, HOUR);

    // A certificate from a CA the server does not trust.
    let rogue = Ca::generate(TD, now, HOUR).unwrap();
    let intruder = tls_for(&rogue, ca.cert_pem(), &id("shop", "billing"), now, HOUR);
    let out = connect(&server, intruder.client_config(td()).unwrap()).await;
    assert!(
        out.server.is_err() && out.client.is_err(),
        "another CA got in"
    );

    // A certificate of the right CA that expired an hour ago.
    let past = now - 3 * HOUR;
    let expired = tls_for(&ca, ca.cert_pem(), &id("shop", "billing"), past, HOUR);
    let out = connect(&server, expired.client_config(td()).unwrap()).await;
    let err = out.server.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // Another trust domain's identity, signed by the right CA.
    let foreign = SpiffeId::new("other.mesh", "shop", "billing").unwrap();
    let stranger = tls_for(&ca, ca.cert_pem(), &foreign, now, HOUR);
    let out = connect(&server, stranger.client_config(td()).unwrap()).await;
    assert!(out.server.is_err(), "another trust domain got in");

    // A client that dials `orders` refuses a server proving another identity.
    let client = tls_for(&ca, ca.cert_pem(), &id("shop", "billing"), now, HOUR);
    let wrong = Expect::Exactly(id("shop", "payments"));
    let out = connect(&server, client.client_config(wrong).unwrap()).await;
    assert!(
        out.client.is_err(),
        "client accepted the wrong server identity"
    );
}

#[tokio::test]
async fn rotating_keys_and_roots_keeps_peers_talking() {
    let now = SystemTime::now();
    let old = Ca::generate(TD, now, HOUR).unwrap();
    let new = Ca::generate(TD, now, HOUR).unwrap();
    let server = tls_for(&old, old.cert_pem(), &id("shop", "orders"), now, HOUR);
    let client = tls_for(&old, old.cert_pem(), &id("shop", "billing"), now, HOUR);

    // Overlap window: both sides trust both roots; the server moves to the new CA first.
    let both = format!("{}{}", old.cert_pem(), new.cert_pem());
    assert!(server.bundle.replace(&both).unwrap());
    assert!(client.bundle.replace(&both).unwrap());
    assert!(
        !client.bundle.replace(&both).unwrap(),
        "same bundle twice is no change"
    );
    let renewed = new
        .issue_with_key(&id("shop", "orders"), now, HOUR)
        .unwrap();
    server
        .credentials
        .replace(&renewed.cert_pem, &renewed.key_pem)
        .unwrap();
    let out = connect(&server, client.client_config(td()).unwrap()).await;
    assert!(out.server.is_ok() && out.client.is_ok(), "overlap window");

    // The old root leaves; a client still holding an old-CA certificate is refused.
    server.bundle.replace(new.cert_pem()).unwrap();
    let out = connect(&server, client.client_config(td()).unwrap()).await;
    assert!(
        out.server.is_err(),
        "old CA's certificate accepted after the root left"
    );

    // A pair that does not match changes nothing.
    let other = new
        .issue_with_key(&id("shop", "billing"), now, HOUR)
        .unwrap();
    assert!(
        client
            .credentials
            .replace(&other.cert_pem, &renewed.key_pem)
            .is_err()
    );
    assert_eq!(client.credentials.identity(), id("shop", "billing"));
}
