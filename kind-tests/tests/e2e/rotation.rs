//! Workload certificates rotate under load: the operator issues one-minute certificates, so
//! every sidecar renews at half-life (30 s) while a producer publishes to two consumers in
//! the other pods, over mutual TLS. Established peer streams carry on through a renewal and
//! new handshakes present the new certificate, so no message is lost, none is delivered
//! twice beyond the documented redelivery bound, and no peer handshake is refused.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_kind_tests::e2e::{CONVERGE, E2e, Options, http_get};
use ferry_kind_tests::netns::Zone;

use crate::support::*;

const LOAD: u64 = 400;
const TTL: Duration = Duration::from_secs(60);
const PODS: [&str; 3] = ["rot-a", "rot-b", "producer"];

/// The value of a counter of a sidecar's `/metrics`, 0 if absent.
async fn counter(admin: SocketAddr, name: &str) -> Result<f64> {
    let (status, body) = http_get(admin, "/metrics").await?;
    ensure!(status == 200, "GET /metrics on {admin}: {status}");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load() -> Result<()> {
    let options = Options {
        workload_cert_ttl: Some(TTL),
    };
    let mut w = E2e::with("rotation", options).await?;
    let mut yaml = topic_yaml("payments", serde_json::json!({"durability": "Disk"}));
    yaml += &group_yaml("settlers", "settlers", "Any");
    yaml += &subscription_yaml("payments", "settlers");
    w.apply_yaml("rotation", &yaml).await?;
    w.wait_all_ready().await?;
    let app = labels(&[("app", "settlers")]);
    w.add_pod("rot-a", Zone::A, &app).await?;
    w.add_pod("rot-b", Zone::B, &app).await?;
    w.add_pod("producer", Zone::A, &labels(&[("role", "producer")]))
        .await?;
    w.wait_members("settlers", &["rot-a", "rot-b"], CONVERGE)
        .await?;
    let _consumers = [
        w.consumer("rot-a", "settlers-payments", "settlers").await?,
        w.consumer("rot-b", "settlers-payments", "settlers").await?,
    ];
    let admins: Vec<SocketAddr> = PODS
        .iter()
        .map(|p| Ok(SocketAddr::from((w.pod(p)?.net.ip, 7790))))
        .collect::<Result<_>>()?;

    // 400 messages over about 40 s, which starts within seconds of the first pod: every
    // sidecar's renewal, 30 s after its start, falls inside it.
    let topic = format!("{}/payments", w.ns);
    let count = LOAD.to_string();
    #[rustfmt::skip]
    let args = ["publish", "--topic", &topic, "--prefix", "pay", "--count", &count, "--interval-ms", "100"];
    let publisher = w.app("producer", &args).await?;
    publisher.wait_done().await?;
    let mut renewals = Vec::new();
    for (pod, admin) in PODS.iter().zip(&admins) {
        let n = counter(*admin, "ferry_sidecar_certificate_renewals_total").await?;
        println!("rotation: {pod} renewed its certificate {n} times while the load ran");
        renewals.push(n);
    }
    ensure!(
        renewals.iter().all(|n| *n >= 1.0),
        "every sidecar renewed under load: {renewals:?}"
    );
    w.wait_events("every message is delivered", |e| {
        delivered_to_group(e, "settlers").len() as u64 == LOAD
    })
    .await?;
    let mut refused = 0.0;
    let mut failed = 0.0;
    for admin in &admins {
        refused += counter(*admin, "ferry_sidecar_peer_refused_total").await?;
        failed += counter(*admin, "ferry_sidecar_tls_reload_failed_total").await?;
    }
    println!("rotation: peer handshakes refused {refused}, renewals failed {failed}");
    let c = counts(
        "rotation certificates_rotate_under_load",
        &w.events()?,
        &[any_member("settlers", &topic, false)],
    );
    ensure!(c.acked == LOAD && c.lost == 0 && c.unexpected == 0, "{c}");
    ensure!(c.unexplained_duplicates == 0, "{c}");
    ensure!(
        refused == 0.0,
        "a peer handshake was refused during rotation"
    );
    ensure!(failed == 0.0, "a renewal failed");
    Ok(())
}
