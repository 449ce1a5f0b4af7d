//! What a newcomer runs: `ferryctl dev examples/quickstart`, then `ferryctl consume` and
//! `ferryctl publish` against the printed addresses, then Ctrl-C. Real binaries throughout.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_sidecar_tests::harness::{ferryctl_bin, next_subnet, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_quickstart_publish_consume_ctrl_c() -> anyhow::Result<()> {
    let ferryctl = ferryctl_bin()?;
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let data = tempfile::tempdir()?;
    let [a, b, c] = next_subnet();
    let subnet = format!("{a}.{b}.{c}");
    let mut dev = Command::new(&ferryctl)
        .arg("dev")
        .arg(&quickstart)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--subnet",
            &subnet,
            "--interval",
            "1s",
            "--exit-after",
            "120s",
            // This test counts its own messages; the demo traffic has a test of its own.
            "--no-demo",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut lines = BufReader::new(dev.stdout.take().expect("piped")).lines();
    let sink = output.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("dev| {line}");
            sink.lock().unwrap().push(line);
        }
    });
    let printed = |needle: &str| output.lock().unwrap().iter().any(|l| l.contains(needle));
    wait_for(
        Duration::from_secs(60),
        "dev prints that the mesh is up",
        || printed("Ctrl-C stops every sidecar"),
    )
    .await?;
    for needle in [
        "billing-a  zone-a",
        "billing-b  zone-b",
        "default/producer",
        &format!("{subnet}.1:7700"),
    ] {
        assert!(printed(needle), "dev output lacks {needle:?}");
    }

    let consumer = format!("{subnet}.1:7700");
    let producer = format!("{subnet}.3:7700");
    let consume = Command::new(&ferryctl)
        .args([
            "consume",
            "--to",
            &consumer,
            "default/billing-orders",
            "--count",
            "3",
            "--idle-timeout",
            "30s",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // `consume` prints to stderr once subscribed; publishing before that is fine too: the
    // messages wait on disk.
    let publish = Command::new(&ferryctl)
        .args([
            "publish",
            "--to",
            &producer,
            "default/orders",
            "order {i}",
            "--count",
            "3",
        ])
        .output()
        .await?;
    let published = String::from_utf8_lossy(&publish.stdout);
    println!("publish| {published}");
    assert!(
        publish.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&publish.stderr)
    );
    assert_eq!(
        published
            .lines()
            .filter(|l| l.starts_with("published default/orders id="))
            .count(),
        3
    );

    let consumed =
        tokio::time::timeout(Duration::from_secs(60), consume.wait_with_output()).await??;
    let consumed = String::from_utf8_lossy(&consumed.stdout);
    println!("consume| {consumed}");
    for i in 1..=3 {
        assert!(
            consumed.contains(&format!("payload=order {i}")),
            "order {i} not consumed"
        );
    }
    wait_for(Duration::from_secs(30), "dev counts the deliveries", || {
        printed("delivered=3")
    })
    .await?;

    // Ctrl-C.
    let pid = i32::try_from(dev.id().expect("running"))?;
    kill(Pid::from_raw(pid), Signal::SIGINT)?;
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait()).await??;
    assert!(status.success(), "dev exited with {status}");
    assert!(printed("all sidecars stopped cleanly"));
    assert!(data.path().join("routing.json").is_file());
    Ok(())
}

/// The README's main job with nothing else typed: the demo traffic shows messages published
/// by the producer pod and delivered, preferring the member in the producer's zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_shows_messages_flowing() -> anyhow::Result<()> {
    let ferryctl = ferryctl_bin()?;
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let data = tempfile::tempdir()?;
    let [a, b, c] = next_subnet();
    let subnet = format!("{a}.{b}.{c}");
    let mut dev = Command::new(&ferryctl)
        .arg("dev")
        .arg(&quickstart)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--subnet",
            &subnet,
            "--demo-interval",
            "200ms",
            "--exit-after",
            "120s",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut lines = BufReader::new(dev.stdout.take().expect("piped")).lines();
    let sink = output.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("dev| {line}");
            sink.lock().unwrap().push(line);
        }
    });
    let count = |needle: &str| {
        output
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    wait_for(
        Duration::from_secs(60),
        "three demo messages delivered and acked",
        || count("got \"demo message") >= 3,
    )
    .await?;
    // The producer pod is in zone-a and billing has a live member there: PreferSameZone.
    let lines = output.lock().unwrap().clone();
    let delivered: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("got \"demo message"))
        .collect();
    assert!(
        delivered.iter().all(|l| l.contains("billing-a (zone-a)")),
        "deliveries left the producer's zone: {delivered:?}"
    );
    assert!(count("published demo message 1 to default/orders") == 1);
    if let Some(pid) = dev.id() {
        kill(Pid::from_raw(pid as i32), Signal::SIGINT)?;
    }
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait()).await??;
    assert!(status.success(), "ferryctl dev exited with {status}");
    Ok(())
}
