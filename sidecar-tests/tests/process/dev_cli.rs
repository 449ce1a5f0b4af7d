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

/// `ferryctl dev examples/quickstart` on a fresh subnet and data folder, with extra
/// arguments; its stdout lines are echoed and collected.
struct Dev {
    child: tokio::process::Child,
    output: Arc<Mutex<Vec<String>>>,
    subnet: String,
    data: tempfile::TempDir,
}

impl Dev {
    async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let data = tempfile::tempdir()?;
        let [a, b, c] = next_subnet();
        let subnet = format!("{a}.{b}.{c}");
        let mut child = Command::new(ferryctl_bin()?)
            .arg("dev")
            .arg(&quickstart)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--subnet", &subnet, "--exit-after", "120s"])
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let output = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let sink = output.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                println!("dev| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Self {
            child,
            output,
            subnet,
            data,
        })
    }

    /// The printed lines that contain `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let output = self.output.lock().unwrap();
        output
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    fn printed(&self, needle: &str) -> bool {
        !self.lines_with(needle).is_empty()
    }

    /// Ctrl-C, then a clean exit.
    async fn interrupt(&mut self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id().expect("running"))?;
        kill(Pid::from_raw(pid), Signal::SIGINT)?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        assert!(status.success(), "dev exited with {status}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_quickstart_publish_consume_ctrl_c() -> anyhow::Result<()> {
    let ferryctl = ferryctl_bin()?;
    // This test counts its own messages; the demo traffic has a test of its own.
    let mut dev = Dev::start(&["--interval", "1s", "--no-demo"]).await?;
    let subnet = dev.subnet.clone();
    let printed = |needle: &str| dev.printed(needle);
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

    dev.interrupt().await?;
    assert!(dev.printed("all sidecars stopped cleanly"));
    assert!(dev.data.path().join("routing.json").is_file());
    Ok(())
}

/// The README's main job with nothing else typed: the demo traffic shows messages published
/// by the producer pod and delivered, preferring the member in the producer's zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_shows_messages_flowing() -> anyhow::Result<()> {
    let mut dev = Dev::start(&["--demo-interval", "200ms"]).await?;
    wait_for(
        Duration::from_secs(60),
        "three demo messages delivered and acked",
        || dev.lines_with("got \"demo message").len() >= 3,
    )
    .await?;
    // The producer pod is in zone-a and billing has a live member there: PreferSameZone.
    let delivered = dev.lines_with("got \"demo message");
    assert!(
        delivered.iter().all(|l| l.contains("billing-a (zone-a)")),
        "deliveries left the producer's zone: {delivered:?}"
    );
    assert_eq!(
        dev.lines_with("published demo message 1 to default/orders")
            .len(),
        1
    );
    dev.interrupt().await?;
    Ok(())
}
