//! The etcd routing source against a real etcd (docs/reliability.md rows 15 and 16).
//!
//! Tests of this binary share one etcd (`ControlPlane::shared()`) and its fixed
//! `/ferry/v1/` prefix, so each writes its own namespace and compares only that
//! namespace; the outage test pauses etcd and so gets a private control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod etcd_support;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::Client;
use etcd_support::*;
use ferry_api::routing::*;
use ferry_kind_tests::{ControlPlane, wait_for};
use ferry_sidecar::routing::etcd::{EtcdOptions, EtcdSource};
use ferry_sidecar::{Config, Sidecar};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deadline of every convergence.
const CONVERGE: Duration = Duration::from_secs(20);

async fn converged(f: &Follower, client: &Client, ns: &str) -> bool {
    let mut client = client.clone();
    match etcd_kv(&mut client, ns).await {
        Ok((want, _)) => f.kv(ns) == want,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_puts_updates_and_deletes() -> Result<()> {
    let ns = "follow";
    let cp = ControlPlane::shared().await?;
    let mut etcd = Client::connect([cp.etcd_endpoints()], None).await?;
    put(
        &mut etcd,
        &topic_key(&object_ref(ns, "orders")),
        &topic(ns, "orders"),
    )
    .await?;
    let f = Follower::start(cp.etcd_endpoints())?;
    wait_for(CONVERGE, || async {
        f.status.connected() && f.kv(ns).len() == 1
    })
    .await
    .context("the first list has the topic")?;

    put(
        &mut etcd,
        &group_key(&object_ref(ns, "billing")),
        &group(ns, "billing"),
    )
    .await?;
    put(
        &mut etcd,
        &subscription_key(&object_ref(ns, "billing-orders")),
        &subscription(ns, "billing-orders", "orders", "billing"),
    )
    .await?;
    put(
        &mut etcd,
        &member_key(ns, "billing", "pod-a"),
        &member(ns, "billing", "pod-a", true),
    )
    .await?;
    put(
        &mut etcd,
        &member_key(ns, "billing", "pod-b"),
        &member(ns, "billing", "pod-b", true),
    )
    .await?;
    wait_for(CONVERGE, || async {
        f.kv(ns).len() == 5 && converged(&f, &etcd, ns).await
    })
    .await
    .context("puts converge")?;
    assert_eq!(
        f.rx.borrow()
            .ready_members(&object_ref(ns, "billing"))
            .count(),
        2
    );

    // An update, a member leaving, a topic deleted.
    put(
        &mut etcd,
        &member_key(ns, "billing", "pod-a"),
        &member(ns, "billing", "pod-a", false),
    )
    .await?;
    delete(&mut etcd, &member_key(ns, "billing", "pod-b")).await?;
    let last = delete(&mut etcd, &topic_key(&object_ref(ns, "orders"))).await?;
    wait_for(CONVERGE, || async {
        f.kv(ns).len() == 3 && converged(&f, &etcd, ns).await
    })
    .await
    .context("updates and deletes converge")?;
    let table = f.rx.borrow().clone();
    assert!(!table.topics.contains_key(&object_ref(ns, "orders")));
    assert_eq!(table.ready_members(&object_ref(ns, "billing")).count(), 0);
    assert!(
        table.revision >= last,
        "table at {} after a write at {last}",
        table.revision
    );
    assert!(non_decreasing(&f.published()), "{:?}", f.published());
    // No `bad_values() == 0` here: the bad-values test writes into the same etcd.
    f.stop().await;
    Ok(())
}

/// Row 16: the source's connection is cut while the table changes and etcd compacts past
/// its revision; after the heal it must notice the compaction, list again and converge,
/// never publishing an older revision. It also starts while etcd is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_compaction_behind_a_cut_connection() -> Result<()> {
    let ns = "compact";
    let cp = ControlPlane::shared().await?;
    let mut etcd = Client::connect([cp.etcd_endpoints()], None).await?;
    let proxy = Proxy::start(socket_addr(cp.etcd_endpoints())?).await?;
    for i in 0..3 {
        let name = format!("t{i}");
        put(
            &mut etcd,
            &topic_key(&object_ref(ns, &name)),
            &topic(ns, &name),
        )
        .await?;
    }

    // Start with etcd unreachable: an empty table, not connected, not ready.
    proxy.cut();
    let f = Follower::start(&proxy.endpoint())?;
    wait_for(CONVERGE, || async { f.status.last_error().is_some() })
        .await
        .context("the source reports the unreachable etcd")?;
    assert!(!f.status.connected() && !f.status.loaded());
    assert_eq!(f.rx.borrow().revision, 0);
    assert!(!f.status.readiness().0, "{}", f.status.readiness().1);

    proxy.heal();
    wait_for(CONVERGE, || async {
        f.status.connected() && converged(&f, &etcd, ns).await
    })
    .await
    .context("the first list after the heal")?;
    let before = f.status.revision();
    let relists = f.status.relists();

    proxy.cut();
    wait_for(CONVERGE, || async { !f.status.connected() })
        .await
        .context("the cut is noticed")?;
    // Changes the source cannot see, then a compaction past its revision.
    delete(&mut etcd, &topic_key(&object_ref(ns, "t0"))).await?;
    let mut changed = topic(ns, "t1");
    changed.replicas = 3;
    put(&mut etcd, &topic_key(&object_ref(ns, "t1")), &changed).await?;
    put(&mut etcd, &group_key(&object_ref(ns, "g")), &group(ns, "g")).await?;
    let (want, revision) = etcd_kv(&mut etcd, ns).await?;
    assert!(revision > before + 1);
    let out = cp.etcdctl(["compact", &revision.to_string()]).await?;
    if !out.status.success() {
        bail!("etcdctl compact: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        f.rx.borrow().revision < revision,
        "the cut source cannot be current"
    );

    proxy.heal();
    wait_for(CONVERGE, || async {
        f.status.connected() && f.status.relists() > relists && converged(&f, &etcd, ns).await
    })
    .await
    .context("the source lists again after the compaction and converges")?;
    assert_eq!(f.kv(ns), want, "digest of the namespace equals etcd's");
    assert!(f.rx.borrow().revision >= revision);
    let published = f.published();
    assert!(non_decreasing(&published), "back in time: {published:?}");
    f.stop().await;
    Ok(())
}

/// Row 15: etcd paused (SIGSTOP) under a running sidecar: the last table stays, the gauge
/// says 0 and `/readyz` stays ready with the reason; after SIGCONT it converges again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_the_last_table() -> Result<()> {
    let ns = "outage";
    init_logs();
    let cp = ControlPlane::start().await?;
    let mut etcd = Client::connect([cp.etcd_endpoints()], None).await?;
    put(
        &mut etcd,
        &topic_key(&object_ref(ns, "orders")),
        &topic(ns, "orders"),
    )
    .await?;

    let mut options = EtcdOptions::new(vec![cp.etcd_endpoints().to_owned()]);
    options.keep_alive = (Duration::from_secs(6), Duration::from_secs(2));
    options.backoff = (Duration::from_millis(50), Duration::from_millis(500));
    options.request_timeout = Duration::from_secs(2);
    let source = EtcdSource::new(options)?;
    let status = source.status();
    let data = tempfile::tempdir()?;
    let sidecar = Sidecar::bind(Config::local("p", ns, "z1", data.path().into()))
        .await?
        .with_routing_status(status.clone());
    let running = sidecar.start(Box::new(source)).await?;
    let admin = running.addrs().admin;
    let engine = running.engine().clone();
    wait_for(CONVERGE, || async {
        engine
            .table()
            .topics
            .contains_key(&object_ref(ns, "orders"))
            && metric(admin, "ferry_sidecar_routing_source_connected").await == Some(1.0)
    })
    .await
    .context("the sidecar loads the table")?;
    let (code, body) = get(admin, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("etcd connected"), "{body}");
    let last = engine.table();

    let pid = etcd_pid(&cp)?;
    let paused = Paused::stop(pid)?;
    wait_for(CONVERGE, || async {
        metric(admin, "ferry_sidecar_routing_source_connected").await == Some(0.0)
    })
    .await
    .context("the paused etcd is noticed")?;
    // The fault lasts a few seconds; the sidecar keeps routing with its last table.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(engine.table(), last, "the last table stays in force");
    let (code, body) = get(admin, "/readyz").await?;
    assert_eq!(code, 200, "still ready with a loaded table: {body}");
    assert!(body.contains("unreachable"), "{body}");
    assert!(!status.connected());
    drop(paused);

    wait_for(CONVERGE, || async {
        metric(admin, "ferry_sidecar_routing_source_connected").await == Some(1.0)
    })
    .await
    .context("reconnects after SIGCONT")?;
    let rev = put(&mut etcd, &group_key(&object_ref(ns, "g")), &group(ns, "g")).await?;
    wait_for(CONVERGE, || async {
        let t = engine.table();
        t.groups.contains_key(&object_ref(ns, "g")) && t.revision >= rev
    })
    .await
    .context("changes after the outage arrive")?;
    assert_eq!(
        metric(admin, "ferry_sidecar_routing_revision").await,
        Some(engine.table().revision as f64)
    );
    running.shutdown();
    running.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_counted_and_skipped() -> Result<()> {
    let ns = "bad";
    let cp = ControlPlane::shared().await?;
    let mut etcd = Client::connect([cp.etcd_endpoints()], None).await?;
    let good = topic_key(&object_ref(ns, "good"));
    put(&mut etcd, &good, &topic(ns, "good")).await?;
    // Garbage in the first list, and a value of a future schema.
    etcd.put(topic_key(&object_ref(ns, "garbage")), "{not json", None)
        .await?;
    let mut future = group(ns, "future");
    future.schema_version = SCHEMA_VERSION + 1;
    put(&mut etcd, &group_key(&object_ref(ns, "future")), &future).await?;

    let f = Follower::start(cp.etcd_endpoints())?;
    wait_for(CONVERGE, || async {
        f.status.loaded() && f.status.bad_values() >= 2
    })
    .await
    .context("the bad values of the list are counted")?;
    assert_eq!(
        f.kv(ns).keys().collect::<Vec<_>>(),
        [&good],
        "the rest applies"
    );

    // Through the watch: a bad update keeps the key's last good value, and the rest of the
    // same burst still applies.
    let counted = f.status.bad_values();
    etcd.put(good.as_str(), "\u{0}", None).await?;
    etcd.put(format!("{PREFIX}unknown-kind/{ns}/x"), "{}", None)
        .await?;
    let rev = put(&mut etcd, &group_key(&object_ref(ns, "g")), &group(ns, "g")).await?;
    wait_for(CONVERGE, || async { f.rx.borrow().revision >= rev })
        .await
        .context("the watch goes on past the bad values")?;
    assert!(
        f.status.bad_values() >= counted + 2,
        "{}",
        f.status.bad_values()
    );
    let table = f.rx.borrow().clone();
    assert_eq!(
        table.topics.get(&object_ref(ns, "good")),
        Some(&topic(ns, "good"))
    );
    assert!(table.groups.contains_key(&object_ref(ns, "g")));
    assert!(!table.groups.contains_key(&object_ref(ns, "future")));
    assert!(f.status.connected());
    f.stop().await;
    Ok(())
}

/// The pid of the control plane's etcd, checked to be etcd (not a reused pid).
fn etcd_pid(cp: &ControlPlane) -> Result<Pid> {
    let text = std::fs::read_to_string(cp.dir().join("etcd.pid"))?;
    let pid: i32 = text.trim().parse()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    if comm.trim() != "etcd" {
        bail!("pid {pid} is {comm:?}, not etcd");
    }
    Ok(Pid::from_raw(pid))
}

/// A process stopped with SIGSTOP until dropped (SIGCONT), even when the test fails.
struct Paused(Pid);

impl Paused {
    fn stop(pid: Pid) -> Result<Self> {
        kill(pid, Signal::SIGSTOP)?;
        Ok(Self(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// A GET on the admin port: status code and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_owned()))
}

/// The value of an unlabelled metric in `/metrics`, if the scrape works.
async fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = get(addr, "/metrics").await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
