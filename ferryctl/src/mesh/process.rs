//! One `ferry-sidecar` process: start it, wait for its ready line, signal it.
//!
//! The sidecar prints `ferry-sidecar ready pod=.. zone=.. app_grpc=.. app_http=.. peer=..
//! admin=..` once it listens; that line, not a sleep or a port probe, is what "up" means.
//! Everything the process prints goes to its log file and to an in-memory copy that tests
//! search (for example for the "truncated" line after a torn tail).
//!
//! A sidecar never outlives the process that started it. It runs in a process group of
//! its own, so a terminal's signals (Ctrl-C, SIGHUP when it closes) reach only its parent,
//! which stops its sidecars in order, and it drains and exits when its stdin, a pipe its
//! parent holds, closes (`--drain-on-stdin-eof`): that also covers a parent killed by
//! `kill -9`. (`PR_SET_PDEATHSIG` would need `unsafe` in a `pre_exec` hook, fires when the
//! parent *thread* ends rather than the process, and is Linux-only; the pipe is none of
//! these.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

use super::plan::SidecarSpec;

/// Start of the line a sidecar prints once it listens.
pub const READY_PREFIX: &str = "ferry-sidecar ready";
/// Lines of output kept in memory per process.
const KEPT_LINES: usize = 20_000;

/// Why a sidecar did not start or stop as asked.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("starting {bin} for pod {pod}: {source}")]
    Spawn {
        bin: PathBuf,
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sidecar {pod} exited ({status}) before it was ready; last output:\n{tail}")]
    ExitedEarly {
        pod: String,
        status: String,
        tail: String,
    },
    #[error("sidecar {pod} printed no ready line within {timeout:?}; last output:\n{tail}")]
    NotReady {
        pod: String,
        timeout: Duration,
        tail: String,
    },
    #[error("signalling sidecar {pod} (pid {pid}): {source}")]
    Signal {
        pod: String,
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("waiting for sidecar {pod}: {source}")]
    Wait {
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a sidecar said in its ready line: `key=value` fields (`pod`, `zone`, `app_grpc`, ...).
pub type ReadyLine = BTreeMap<String, String>;

/// Parses a ready line, or `None` for any other line.
pub fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let rest = line.trim().strip_prefix(READY_PREFIX)?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// Everything a sidecar printed, shared with the tasks that read its pipes.
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() >= KEPT_LINES {
                lines.drain(..KEPT_LINES / 2);
            }
            lines.push(line);
        }
    }

    /// Every kept line.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The last `n` lines, joined, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A running (or exited) sidecar process.
#[derive(Debug)]
pub struct SidecarProcess {
    pub spec: SidecarSpec,
    pub pid: u32,
    pub ready: ReadyLine,
    pub output: Output,
    child: Child,
    /// The write end of the sidecar's stdin, never written: closing it (this process
    /// exiting, however it exits) tells the sidecar to drain and exit.
    _lifeline: Option<ChildStdin>,
}

/// What every sidecar of a mesh shares.
#[derive(Debug, Clone)]
pub struct Launch {
    pub bin: PathBuf,
    pub routing_file: PathBuf,
    pub log_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub ready_timeout: Duration,
    /// Extra `KEY=value` environment for every sidecar (for example `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

impl SidecarProcess {
    /// Starts the sidecar of `spec` and waits for its ready line.
    pub async fn start(spec: &SidecarSpec, launch: &Launch) -> Result<Self, ProcessError> {
        let pod = spec.pod.id();
        for dir in [&spec.data_dir, &launch.log_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ProcessError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let log_path = launch
            .log_dir
            .join(format!("{}.{}.log", spec.pod.namespace, spec.pod.name));
        let e = &spec.endpoints;
        let mut cmd = Command::new(&launch.bin);
        cmd.arg("--pod-name")
            .arg(&spec.pod.name)
            .arg("--namespace")
            .arg(&spec.pod.namespace)
            .arg("--zone")
            .arg(&spec.pod.zone)
            .arg("--node")
            .arg(spec.pod.node_name())
            .arg("--service-account")
            .arg(&spec.pod.service_account)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--app-grpc-addr")
            .arg(e.app_grpc.to_string())
            .arg("--app-http-addr")
            .arg(e.app_http.to_string())
            .arg("--peer-addr")
            .arg(e.peer.to_string())
            .arg("--advertise-addr")
            .arg(e.peer.to_string())
            .arg("--admin-addr")
            .arg(e.admin.to_string())
            .arg("--routing-file")
            .arg(&launch.routing_file)
            .arg("--shutdown-grace")
            .arg(format!("{}ms", launch.shutdown_grace.as_millis()))
            .arg("--tls-dir")
            .arg(&spec.tls_dir)
            .arg("--drain-on-stdin-eof")
            .envs(launch.env.iter().cloned())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            bin: launch.bin.clone(),
            pod: pod.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        let lifeline = child.stdin.take();
        let output = Output::default();
        let (ready_tx, mut ready_rx) = watch::channel(None);
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pump(
                stdout,
                output.clone(),
                log_path.clone(),
                Some(ready_tx),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pump(stderr, output.clone(), log_path, None));
        }
        let ready = tokio::select! {
            line = ready_rx.wait_for(Option::is_some) => line.ok().and_then(|l| l.clone()),
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                // Let the pipes drain so the tail shows why.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(ProcessError::ExitedEarly { pod, status, tail: output.tail(30) });
            }
            () = tokio::time::sleep(launch.ready_timeout) => None,
        };
        match ready {
            Some(ready) => Ok(Self {
                spec: spec.clone(),
                pid,
                ready,
                output,
                child,
                _lifeline: lifeline,
            }),
            None => {
                let _ = child.start_kill();
                Err(ProcessError::NotReady {
                    pod,
                    timeout: launch.ready_timeout,
                    tail: output.tail(30),
                })
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        let raw = i32::try_from(self.pid).unwrap_or(i32::MAX);
        kill(Pid::from_raw(raw), signal).map_err(|source| ProcessError::Signal {
            pod: self.spec.pod.id(),
            pid: self.pid,
            source,
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.map(Some).map_err(|source| ProcessError::Wait {
                pod: self.spec.pod.id(),
                source,
            }),
            Err(_) => Ok(None),
        }
    }

    /// `kill -9`, then reaps the process.
    pub async fn kill9(&mut self) -> Result<ExitStatus, ProcessError> {
        self.signal(Signal::SIGKILL)?;
        self.child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait {
                pod: self.spec.pod.id(),
                source,
            })
    }

    /// SIGTERM, then waits up to `timeout`; SIGKILLs a process that is still there.
    /// Returns the exit status and whether the SIGTERM alone was enough.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> Result<(ExitStatus, bool), ProcessError> {
        if !self.is_running() {
            let status = self
                .child
                .wait()
                .await
                .map_err(|source| ProcessError::Wait {
                    pod: self.spec.pod.id(),
                    source,
                })?;
            return Ok((status, true));
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_exit(timeout).await? {
            return Ok((status, true));
        }
        Ok((self.kill9().await?, false))
    }
}

/// Copies a pipe, line by line, to the log file and the in-memory output; reports the
/// ready line on `ready`.
async fn pump(
    pipe: impl AsyncRead + Unpin,
    output: Output,
    log_path: PathBuf,
    ready: Option<watch::Sender<Option<ReadyLine>>>,
) {
    let mut file = open_log(&log_path).await;
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = file.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
        if let Some(tx) = &ready
            && let Some(parsed) = parse_ready_line(&line)
        {
            let _ = tx.send(Some(parsed));
        }
        output.push(line);
    }
}

async fn open_log(path: &Path) -> Option<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let line = "ferry-sidecar ready pod=a zone=zone-a app_grpc=127.0.1.1:7700 app_http=127.0.1.1:7701 peer=127.0.1.1:7710 admin=127.0.1.1:7790";
        let parsed = parse_ready_line(line).expect("ready line");
        assert_eq!(parsed["pod"], "a");
        assert_eq!(parsed["admin"], "127.0.1.1:7790");
        assert!(parse_ready_line("INFO something else").is_none());
    }
}
