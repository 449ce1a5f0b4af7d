//! docs/reliability.md row 13, `flaky_peer_network`: every peer link (sidecar to sidecar, both
//! ways) goes through a userspace delay proxy (100 ms ± 50 ms; netem is absent here) and
//! loses 20 % of its packets (iptables `statistic` in every pod's namespace), while a
//! producer publishes keyed messages of an ordered topic. Then the faults stop and the
//! backlog must drain within the deadline: lost = 0, per-key order kept.

use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_kind_tests::e2e::{CONVERGE, E2e};
use ferry_kind_tests::netns::{PEER_PORT, Zone};
use ferry_kind_tests::toxic_proxy::ToxicProxy;

use crate::support::*;

const LOAD: u64 = 100;
const LOSS: f64 = 0.2;
const DELAY: Duration = Duration::from_millis(100);
const JITTER: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_peer_network() -> Result<()> {
    let mut w = E2e::new("row13").await?;
    let mut yaml = topic_yaml(
        "ledger",
        serde_json::json!({"durability": "Disk", "ordering": "Key"}),
    );
    yaml += &group_yaml("accounts", "accounts", "Any");
    yaml += &subscription_yaml("ledger", "accounts");
    w.apply_yaml("row13", &yaml).await?;
    w.wait_all_ready().await?;
    let app = labels(&[("app", "accounts")]);
    w.add_pod("acc-a", Zone::A, &app).await?;
    w.add_pod("acc-b", Zone::B, &app).await?;
    w.add_pod("producer", Zone::A, &labels(&[("role", "producer")]))
        .await?;
    w.wait_members("accounts", &["acc-a", "acc-b"], CONVERGE)
        .await?;

    // Every pod's new peer connections to every other pod go through a delay proxy on the
    // host, before any peer connection exists.
    let pods = w.fabric.pods();
    let mut proxies = Vec::new();
    for from in &pods {
        for to in pods.iter().filter(|p| p.netns != from.netns) {
            let listen = std::net::SocketAddr::from((w.fabric.gateway(from.zone), 0));
            let target = std::net::SocketAddr::from((to.ip, PEER_PORT));
            let proxy = ToxicProxy::start(listen, target).await?;
            proxy.toxics.set(DELAY, JITTER);
            w.fabric.redirect_peer(from, to.ip, proxy.listen)?;
            proxies.push(proxy);
        }
    }
    w.fabric.add_peer_loss(LOSS)?;
    println!(
        "row13: {} peer links through delay proxies ({DELAY:?} ± {JITTER:?}), {}% loss (kernel random, no seed)",
        proxies.len(),
        LOSS * 100.0
    );

    let _consumers = [
        w.consumer("acc-a", "accounts-ledger", "accounts").await?,
        w.consumer("acc-b", "accounts-ledger", "accounts").await?,
    ];
    let topic = format!("{}/ledger", w.ns);
    let count = LOAD.to_string();
    #[rustfmt::skip]
    let args = ["publish", "--topic", &topic, "--prefix", "tx", "--count", &count, "--keys", "5", "--interval-ms", "10"];
    let publisher = w.app("producer", &args).await?;
    publisher.wait_done().await?;
    w.wait_events("messages flow over the flaky links", |e| {
        delivered_to_group(e, "accounts").len() >= 20
    })
    .await?;
    let under_faults = delivered_to_group(&w.events()?, "accounts").len();
    println!("row13: {under_faults} of {LOAD} delivered under faults; stopping the faults");

    let (connections, bytes) = proxies.iter().fold((0, 0), |(c, b), p| {
        (c + p.toxics.connections(), b + p.toxics.bytes())
    });
    println!("row13: the delay proxies carried {connections} connections, {bytes} bytes");
    ensure!(
        connections > 0 && bytes > 0,
        "peer traffic goes through the proxies"
    );
    let drops = w.fabric.peer_loss_drops()?;
    println!("row13: iptables dropped {drops} peer packets");
    ensure!(drops > 0, "the random loss dropped peer packets");
    w.fabric.clear_peer_loss()?;
    for proxy in &proxies {
        proxy.toxics.set(Duration::ZERO, Duration::ZERO);
    }
    w.wait_events("the backlog drains after the faults stop", |e| {
        delivered_to_group(e, "accounts").len() as u64 == LOAD
    })
    .await?;
    let events = w.events()?;
    let c = counts(
        "row13 flaky_peer_network",
        &events,
        &[any_member("accounts", &topic, true)],
    );
    ensure!(c.acked == LOAD && c.lost == 0 && c.unexpected == 0, "{c}");
    ensure!(c.reordered == 0, "per-key order kept: {c}");
    ensure!(c.unexplained_duplicates == 0, "{c}");
    Ok(())
}
