//! `ferryctl dev` stops what it started whatever stops it: SIGTERM (`kill`, `timeout`,
//! systemd) and SIGHUP (the terminal closed) drain and stop every sidecar as Ctrl-C does, and
//! even a `kill -9` of `ferryctl dev` leaves no sidecar behind. Each case then starts a
//! second `ferryctl dev` on the same addresses and data: it must find the ports free.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_sidecar_tests::harness::{ferryctl_bin, next_subnet, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `ferryctl dev examples/quickstart` with its printed lines.
struct Dev {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Dev {
    fn start(subnet: &str, data: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let mut child = Command::new(ferryctl_bin()?)
            .arg("dev")
            .arg(&quickstart)
            .arg("--data-dir")
            .arg(data)
            .args(["--subnet", subnet, "--no-demo", "--shutdown-grace", "2s"])
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let output = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let sink = output.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                println!("dev| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Self {
            child,
            output,
            reader,
        })
    }

    /// Waits up to `timeout` for the process to exit and for the last of its output.
    async fn exited(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("ferryctl dev still running after {timeout:?}"))??;
        tokio::time::timeout(Duration::from_secs(10), &mut self.reader).await??;
        Ok(status)
    }

    fn printed(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The PIDs in the sidecars table (rows `namespace/pod  zone  app-grpc ... pid groups`
    /// whose addresses are on `subnet`).
    fn sidecar_pids(&self, subnet: &str) -> Vec<i32> {
        self.output
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split_whitespace().collect();
                let is_row = cells.len() >= 7
                    && cells[0].contains('/')
                    && cells[2].starts_with(&format!("{subnet}."));
                is_row.then(|| cells[6].parse().ok()).flatten()
            })
            .collect()
    }

    fn pid(&self) -> anyhow::Result<Pid> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("already reaped"))?;
        Ok(Pid::from_raw(i32::try_from(pid)?))
    }
}

/// Whether `pid` is a live (not zombie) `ferry-sidecar` process.
fn sidecar_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim().chars().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    matches!(state, Some(s) if s != 'Z' && s != 'X')
        && String::from_utf8_lossy(&cmdline).contains("ferry-sidecar")
}

/// SIGKILLs the sidecars of a failed run when dropped, so that a red test leaves no
/// orphans holding loopback ports.
struct Orphans(Vec<i32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if sidecar_alive(pid) {
                println!("killing orphaned sidecar pid {pid}");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Starts `ferryctl dev`, sends it `signal` once the mesh is up, and checks that its
/// sidecars are gone and that a second `ferryctl dev` can take their addresses. Returns
/// the first one's exit status.
async fn stop_with(signal: Signal) -> anyhow::Result<(std::process::ExitStatus, Dev)> {
    let [a, b, c] = next_subnet();
    let subnet = format!("{a}.{b}.{c}");
    let data = tempfile::tempdir()?;
    let mut dev = Dev::start(&subnet, data.path(), &["--exit-after", "120s"])?;
    wait_for(
        Duration::from_secs(60),
        "dev prints that the mesh is up",
        || dev.printed("Ctrl-C stops every sidecar"),
    )
    .await?;
    let pids = dev.sidecar_pids(&subnet);
    println!(
        "{signal}: ferryctl dev pid {}, sidecars {pids:?}",
        dev.pid()?
    );
    assert_eq!(pids.len(), 3, "the sidecars table lists three sidecars");
    assert!(pids.iter().all(|&p| sidecar_alive(p)));
    let orphans = Orphans(pids.clone());

    kill(dev.pid()?, signal)?;
    let status = dev.exited(Duration::from_secs(30)).await?;
    println!("{signal}: ferryctl dev exited: {status}");
    wait_for(
        Duration::from_secs(30),
        "every sidecar of the first ferryctl dev gone",
        || pids.iter().all(|&p| !sidecar_alive(p)),
    )
    .await?;

    // The same addresses and data folder again: the ports are free, the log is readable.
    let mut second = Dev::start(&subnet, data.path(), &["--exit-after", "0s"])?;
    let second_status = second.exited(Duration::from_secs(60)).await?;
    if !second.printed("all sidecars stopped cleanly") {
        // Say why: the end of each sidecar's log.
        for entry in std::fs::read_dir(data.path().join("logs"))?.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            println!("--- {}:\n{}", entry.path().display(), tail.join("\n"));
        }
    }
    assert!(
        second.printed("all sidecars stopped cleanly"),
        "the second ferryctl dev did not start and stop its sidecars"
    );
    assert!(second_status.success(), "second dev: {second_status}");
    drop(orphans);
    Ok((status, dev))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sigterm_stops_every_sidecar() -> anyhow::Result<()> {
    let (status, dev) = stop_with(Signal::SIGTERM).await?;
    assert!(status.success(), "ferryctl dev exited with {status}");
    assert!(dev.printed("all sidecars stopped cleanly"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sighup_stops_every_sidecar() -> anyhow::Result<()> {
    let (status, dev) = stop_with(Signal::SIGHUP).await?;
    assert!(status.success(), "ferryctl dev exited with {status}");
    assert!(dev.printed("all sidecars stopped cleanly"));
    Ok(())
}

/// A `kill -9` of `ferryctl dev` cannot drain anything itself; its sidecars notice (their
/// stdin, a pipe from `ferryctl dev`, closes) and drain and exit on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_kill9_leaves_no_sidecar_behind() -> anyhow::Result<()> {
    let (status, _dev) = stop_with(Signal::SIGKILL).await?;
    assert!(!status.success());
    Ok(())
}
