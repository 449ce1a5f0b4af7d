//! `bench-compare`: NATS JetStream and Redis Streams under the scenarios of `ferryctl bench`,
//! so their figures can stand beside Ferry's. It starts every server itself on loopback with
//! its data in a temporary folder, stops it after its scenarios, repeats the whole round
//! `--repeat` times, prints a markdown table and writes it to `BENCHMARKS-others.md`.
//!
//! - [`servers`]: starting and stopping the brokers; [`drive`]: the scenarios;
//!   [`nats`], [`redis_streams`]: the clients; [`report`]: the markdown.

mod drive;
mod nats;
mod redis_streams;
mod report;
mod servers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use ferryctl::bench::stats::{Report, header};
use ferryctl::proc_stat;

use crate::drive::{Mode, Scenario};
use crate::servers::{Kind, Server};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Measures NATS JetStream and Redis Streams the way `ferryctl bench` measures Ferry.
#[derive(Debug, Parser)]
struct Args {
    /// Messages per throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "256,4096")]
    sizes: Vec<usize>,
    /// Servers to measure (nats-always, nats-default, redis-always, redis-everysec, redis-none).
    #[arg(long, value_delimiter = ',', default_value = "nats-always,nats-default,redis-always,redis-everysec,redis-none", value_parser = Kind::parse)]
    servers: Vec<Kind>,
    /// Concurrent publishes in per-message mode.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Messages per batch in batched mode.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Batches unanswered at most in batched mode.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Rate of the fixed-rate latency scenario, on the fsync-per-write servers (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// How long the fixed-rate scenario publishes (Go duration).
    #[arg(long, default_value = "5s", value_parser = ferryctl::cli::duration)]
    rate_duration: Duration,
    /// Longest a scenario may take, publish and drain together (Go duration).
    #[arg(long, default_value = "60s", value_parser = ferryctl::cli::duration)]
    scenario_timeout: Duration,
    /// Rounds: each server is started afresh and runs all its scenarios once per round.
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// The nats-server binary (default: PATH, then target/bench-compare/pip/bin).
    #[arg(long, env = "NATS_SERVER")]
    nats_server: Option<PathBuf>,
    /// The redis-server binary (default: PATH).
    #[arg(long, env = "REDIS_SERVER")]
    redis_server: Option<PathBuf>,
    /// Where to write the markdown ("-" writes nothing).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS-others.md"))]
    out: PathBuf,
}

impl Args {
    fn scenarios(&self, kind: Kind) -> Vec<Scenario> {
        let mut out = Vec::new();
        for &size in &self.sizes {
            for (label, mode) in [
                (
                    "unary",
                    Mode::PerMessage {
                        concurrency: self.concurrency,
                    },
                ),
                (
                    "batch",
                    Mode::Batched {
                        batch: self.batch,
                        window: self.window,
                    },
                ),
            ] {
                out.push(Scenario {
                    id: format!("{}-{size}-{label}", kind.id()),
                    tag: 0,
                    payload_bytes: size,
                    mode,
                    count: self.count,
                    deadline: self.scenario_timeout,
                });
            }
        }
        if self.rate > 0 && kind.ferry_peer() == "Disk" {
            out.push(Scenario {
                id: format!("{}-256-fixed-{}/s", kind.id(), self.rate),
                tag: 0,
                payload_bytes: 256,
                mode: Mode::FixedRate {
                    per_sec: self.rate,
                    max_outstanding: 1024,
                },
                count: (f64::from(self.rate) * self.rate_duration.as_secs_f64()) as u64,
                deadline: self
                    .scenario_timeout
                    .max(self.rate_duration + Duration::from_secs(10)),
            });
        }
        out
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats_bin = servers::locate(
        args.nats_server.clone(),
        "nats-server",
        &[std::fs::canonicalize(WORKSPACE)
            .unwrap_or_else(|_| PathBuf::from(WORKSPACE))
            .join("target/bench-compare/pip/bin/nats-server")],
    )?;
    let redis_bin = servers::locate(args.redis_server.clone(), "redis-server", &[])?;
    let data = tempfile::Builder::new()
        .prefix("bench-compare-")
        .tempdir()
        .context("creating the data folder")?;
    let mut ctx = report::Context::probe(data.path());
    ctx.command = command_line();
    ctx.repeats = args.repeat;
    ctx.started = utc_now();
    for (name, kind, bin) in [
        ("NATS server", Kind::NatsAlways, &nats_bin),
        ("Redis", Kind::RedisNone, &redis_bin),
    ] {
        if args.servers.iter().any(|k| k.is_nats() == kind.is_nats()) {
            let v = servers::version(kind, bin)?;
            println!("{name} {v} ({})", bin.display());
            ctx.versions
                .push((name.into(), v, bin.display().to_string()));
        }
    }
    for k in &args.servers {
        ctx.servers
            .push((k.id().into(), k.ferry_peer().into(), k.setting().into()));
    }
    println!(
        "machine: {} CPUs, {}, Linux {}; data in {} ({})",
        ctx.nproc,
        ctx.cpu_model,
        ctx.kernel,
        data.path().display(),
        ctx.data_fs
    );
    let began = Instant::now();
    let clock = Instant::now();
    let mut rows: Vec<(String, Vec<Report>)> = Vec::new();
    let mut failures = 0;
    let mut tag = 0u64;
    for round in 1..=args.repeat {
        println!("\nround {round}/{}\n{}", args.repeat, header());
        for &kind in &args.servers {
            let bin = if kind.is_nats() {
                &nats_bin
            } else {
                &redis_bin
            };
            let dir = data.path().join(format!("{}-{round}", kind.id()));
            let server = servers::start(kind, bin, &dir)
                .await
                .with_context(|| format!("starting {}", kind.id()))?;
            for mut s in args.scenarios(kind) {
                tag += 1;
                s.tag = tag;
                match measure(&server, &s, clock).await {
                    Ok(r) => {
                        println!("{}", r.row());
                        match rows.iter_mut().find(|(id, _)| *id == s.id) {
                            Some((_, reports)) => reports.push(r),
                            None => rows.push((s.id.clone(), vec![r])),
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        println!("{:<28} failed: {e:#}", s.id);
                    }
                }
            }
            server.stop().await?;
        }
    }
    ctx.minutes = began.elapsed().as_secs_f64() / 60.0;
    let doc = report::document(&ctx, &rows);
    println!("\n{}", report::table(&rows));
    if args.out.as_os_str() != "-" {
        std::fs::write(&args.out, &doc)
            .with_context(|| format!("writing {}", args.out.display()))?;
        println!("wrote {}", args.out.display());
    }
    if failures > 0 {
        anyhow::bail!("{failures} scenario runs failed");
    }
    Ok(())
}

/// Runs one scenario on a fresh stream and reports it with the server's CPU and RSS.
async fn measure(server: &Server, s: &Scenario, clock: Instant) -> anyhow::Result<Report> {
    let cpu = || proc_stat::cpu_seconds(server.pid).context("the server is gone");
    let cpu0 = cpu()?;
    let (mut o, cpu1, rss, teardown) = if server.kind.is_nats() {
        let (p, r) = nats::setup(server.addr, s.tag).await?;
        let o = drive::run(p.clone(), r, s, clock).await;
        let (cpu1, rss) = (cpu()?, proc_stat::rss_bytes(server.pid));
        (o, cpu1, rss, nats::teardown(&p).await)
    } else {
        let (p, r) = redis_streams::setup(server.addr, s.tag).await?;
        let o = drive::run(p.clone(), r, s, clock).await;
        let (cpu1, rss) = (cpu()?, proc_stat::rss_bytes(server.pid));
        (o, cpu1, rss, redis_streams::teardown(&p).await)
    };
    teardown?;
    let e2e = o.last_delivery.as_secs_f64().max(1e-9);
    Ok(Report {
        name: s.id.clone(),
        sent: o.sent,
        delivered: o.delivered,
        publish_rate: o.sent as f64 / o.publish_elapsed.as_secs_f64().max(1e-9),
        end_to_end_rate: o.delivered as f64 / e2e,
        p50: o.latencies.quantile(0.5),
        p99: o.latencies.quantile(0.99),
        p999: o.latencies.quantile(0.999),
        fsyncs_per_sec: None,
        cpu_secs_per_million: (cpu1 - cpu0) / (o.delivered.max(1) as f64) * 1e6,
        max_rss_bytes: rss.unwrap_or(0),
        errors: o.errors,
    })
}

/// This process's command line, the binary shown relative to the workspace when inside it.
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let (Some(first), Ok(root)) = (args.first_mut(), std::fs::canonicalize(WORKSPACE))
        && let Ok(bin) = std::fs::canonicalize(&*first)
        && let Ok(rel) = bin.strip_prefix(&root)
    {
        *first = rel.display().to_string();
    }
    args.join(" ")
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
