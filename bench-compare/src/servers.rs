//! Private broker processes on loopback: NATS with JetStream, Redis; data in a temp dir.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A broker and the durability setting it runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// JetStream file storage, `sync_interval: always` (fsync per write).
    NatsAlways,
    /// JetStream file storage, default sync interval (2 min background sync).
    NatsDefault,
    /// `appendonly yes`, `appendfsync always`.
    RedisAlways,
    /// `appendonly yes`, `appendfsync everysec`.
    RedisEverysec,
    /// No AOF, no RDB snapshots.
    RedisNone,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::NatsAlways,
        Kind::NatsDefault,
        Kind::RedisAlways,
        Kind::RedisEverysec,
        Kind::RedisNone,
    ];

    /// Prefix of this server's scenario ids, and its name on the command line.
    pub fn id(self) -> &'static str {
        match self {
            Kind::NatsAlways => "nats-always",
            Kind::NatsDefault => "nats-default",
            Kind::RedisAlways => "redis-always",
            Kind::RedisEverysec => "redis-everysec",
            Kind::RedisNone => "redis-none",
        }
    }

    /// The Ferry durability it stands beside.
    pub fn ferry_peer(self) -> &'static str {
        match self {
            Kind::NatsAlways | Kind::RedisAlways => "Disk",
            Kind::NatsDefault | Kind::RedisEverysec => "DiskAsync",
            Kind::RedisNone => "Memory",
        }
    }

    /// How the server is configured, for the report.
    pub fn setting(self) -> &'static str {
        match self {
            Kind::NatsAlways => "JetStream file store, `sync_interval: always`",
            Kind::NatsDefault => "JetStream file store, default `sync_interval` (2m)",
            Kind::RedisAlways => "`--appendonly yes --appendfsync always --save ''`",
            Kind::RedisEverysec => "`--appendonly yes --appendfsync everysec --save ''`",
            Kind::RedisNone => "`--appendonly no --save ''`",
        }
    }

    pub fn is_nats(self) -> bool {
        matches!(self, Kind::NatsAlways | Kind::NatsDefault)
    }

    pub fn parse(text: &str) -> anyhow::Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.id() == text)
            .with_context(|| format!("unknown server {text:?}"))
    }
}

/// A running broker.
#[derive(Debug)]
pub struct Server {
    pub kind: Kind,
    pub pid: u32,
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

/// Starts `kind` from `binary`, with its data and log under `dir` (created).
pub async fn start(kind: Kind, binary: &Path, dir: &Path) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(binary);
    if kind.is_nats() {
        let store = dir.join("jetstream");
        let sync = if kind == Kind::NatsAlways {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: bench\nlog_file: {:?}\njetstream {{\n  store_dir: {:?}{sync}\n}}\n",
            dir.join("nats.log").display().to_string(),
            store.display().to_string(),
        );
        let path = dir.join("nats.conf");
        std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        cmd.arg("-c").arg(path);
    } else {
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(["--daemonize", "no", "--protected-mode", "yes"]);
        match kind {
            Kind::RedisAlways => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
            Kind::RedisEverysec => cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]),
            _ => cmd.args(["--appendonly", "no"]),
        };
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("server exited at once")?;
    let ready_by = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited with {status}; see logs in {}",
                kind.id(),
                dir.display()
            );
        }
        if Instant::now() > ready_by {
            bail!("{} did not listen on {addr} within 15s", kind.id());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Server {
        kind,
        pid,
        addr,
        child,
        dir: dir.to_owned(),
    })
}

impl Server {
    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and removes its data.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The version a server binary reports, e.g. `v2.15.1` or `7.0.15`.
pub fn version(kind: Kind, binary: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(kind, &text).with_context(|| format!("no version in {text:?}"))
}

/// Picks the version out of `nats-server --version` or `redis-server --version`.
pub fn parse_version(kind: Kind, text: &str) -> Option<String> {
    if kind.is_nats() {
        text.split_whitespace()
            .find(|w| w.starts_with('v'))
            .map(str::to_owned)
    } else {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .map(str::to_owned)
    }
}

/// Finds a server binary: `given`, else `name` on PATH, else any of `fallbacks`.
pub fn locate(
    given: Option<PathBuf>,
    name: &str,
    fallbacks: &[PathBuf],
) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(fallbacks.iter().cloned())
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found on PATH nor in {fallbacks:?}: run bench-compare/setup.sh")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version(Kind::NatsAlways, "nats-server: v2.15.1\n").as_deref(),
            Some("v2.15.1")
        );
        assert_eq!(
            parse_version(
                Kind::RedisNone,
                "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64"
            )
            .as_deref(),
            Some("7.0.15")
        );
        assert_eq!(parse_version(Kind::RedisNone, "nothing"), None);
    }

    #[test]
    fn kinds_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.id()).ok(), Some(k));
        }
        assert!(Kind::parse("kafka").is_err());
    }
}
