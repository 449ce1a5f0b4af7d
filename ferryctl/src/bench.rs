//! `ferryctl bench`: a load generator through real sidecar processes on loopback.
//!
//! It starts its own two-sidecar mesh (a producer pod and a consumer pod in one zone, so
//! every message takes the real forwarding path between two processes), with one topic per
//! durability (`Memory`, `DiskAsync`, `Disk`) and a Unicast group subscribed to each. Then
//! for each durability, payload size (256 B and 4 KiB by default) and publish mode
//! (unary per message, streamed batches) it publishes a bounded number of messages,
//! consumes and acks them all, and prints throughput, publish-to-deliver latency
//! percentiles, fsyncs per second (when the sidecar's metrics count them), sidecar CPU
//! seconds per million messages and RSS. Last, latency at a fixed rate (10k msg/s by
//! default) on the `Disk` topic. Every scenario is bounded in count and time.

pub mod pace;
pub mod scenario;
pub mod stats;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_api::local::{LocalPod, parse_pods};
use ferry_api::manifest::Manifests;

use self::scenario::{Mode, Scenario};
use self::stats::{Report, header};
use crate::mesh::{Mesh, MeshConfig};
use crate::{metrics, proc_stat, sidecar_bin};

/// Arguments of `ferryctl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages per throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "256,4096")]
    pub sizes: Vec<usize>,
    /// Durabilities to measure.
    #[arg(long, value_delimiter = ',', default_value = "Memory,DiskAsync,Disk")]
    pub durabilities: Vec<String>,
    /// Publish modes to measure: `unary` (one call per message), `stream` (batches on one
    /// `PublishStream`, consumed meanwhile) and `drain` (streamed with nobody consuming, then
    /// the backlog drained: its end-to-end rate is delivery alone).
    #[arg(long, value_delimiter = ',', default_value = "unary,stream,drain")]
    pub modes: Vec<String>,
    /// Concurrent unary publishes in per-message mode.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Messages per batch in streamed mode.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Rate of the fixed-rate latency scenario (messages per second; 0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// How long the fixed-rate scenario publishes (Go duration).
    #[arg(long, default_value = "5s", value_parser = crate::cli::duration)]
    pub rate_duration: Duration,
    /// Longest a scenario may take, publish and drain together (Go duration).
    #[arg(long, default_value = "60s", value_parser = crate::cli::duration)]
    pub scenario_timeout: Duration,
    /// Where the sidecars keep their data (default: a temporary folder, deleted after).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// First three octets of the sidecars' loopback addresses.
    #[arg(long, default_value = "127.0.2", value_parser = crate::dev::subnet)]
    pub subnet: [u8; 3],
}

/// The bench's resources: one topic per durability, one group, one subscription each. The
/// topics take 8 GiB of backlog: a `drain` scenario holds all of its messages before the
/// consumer comes, and the previous scenario's last settlements may still be on their way.
fn manifests(durabilities: &[String]) -> anyhow::Result<Manifests> {
    let mut yaml = String::from(
        "apiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {name: bench}\nspec:\n  selector: {matchLabels: {app: bench}}\n",
    );
    for d in durabilities {
        let name = topic_name(d);
        yaml.push_str(&format!(
            "---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {{name: {name}}}\nspec: {{durability: {d}, maxMessageBytes: 1048576, dedupWindow: 0s, retention: {{maxBytes: 8Gi}}}}\n\
             ---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec: {{topic: {name}, group: bench, maxInFlight: 16384, ackWait: 60s}}\n"
        ));
    }
    let mut m = Manifests::default();
    m.add_str(Path::new("<bench>"), &yaml)?;
    Ok(m)
}

fn topic_name(durability: &str) -> String {
    format!("bench-{}", durability.to_ascii_lowercase())
}

const PODS: &str =
    "- {name: producer, zone: zone-a}\n- {name: consumer, zone: zone-a, labels: {app: bench}}\n";

/// Runs `ferryctl bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let manifests = manifests(&args.durabilities)?;
    let pods: Vec<LocalPod> = parse_pods(Path::new("<bench>"), PODS)?;
    let temp = tempfile_dir(&args)?;
    let mut config = MeshConfig::new(sidecar_bin::locate()?, temp.path().to_owned());
    config.subnet = args.subnet;
    println!(
        "bench: data in {} ({})",
        temp.path().display(),
        if temp.keep {
            "kept"
        } else {
            "deleted afterwards"
        }
    );
    let mut mesh = Mesh::start(&config, &manifests, &pods).await?;
    for p in &mesh.problems {
        println!("warning: {p}");
    }
    let producer = mesh.endpoints("producer")?.app_grpc.to_string();
    let consumer = mesh.endpoints("consumer")?.app_grpc.to_string();
    // Idle memory: every sidecar up, its topics open, nothing published yet.
    let idle: Vec<String> = mesh
        .processes()
        .map(|p| {
            let rss = proc_stat::rss_bytes(p.pid).unwrap_or(0);
            format!(
                "{} {:.1} MiB",
                p.spec.pod.name,
                rss as f64 / f64::from(1u32 << 20)
            )
        })
        .collect();
    println!("idle RSS: {}", idle.join(", "));
    let clock = Instant::now();
    println!("{}", header());
    let mut scenarios = Vec::new();
    for d in &args.durabilities {
        for &size in &args.sizes {
            for (label, mode) in [
                (
                    "unary",
                    Mode::PerMessage {
                        concurrency: args.concurrency,
                    },
                ),
                (
                    "stream",
                    Mode::Streamed {
                        batch: args.batch,
                        window: 16,
                    },
                ),
                (
                    "drain",
                    Mode::Drain {
                        batch: args.batch,
                        window: 16,
                    },
                ),
            ] {
                if !args.modes.iter().any(|m| m == label) {
                    continue;
                }
                scenarios.push(Scenario {
                    id: format!("{}-{size}-{label}", d.to_ascii_lowercase()),
                    topic: format!("default/{}", topic_name(d)),
                    subscription: format!("default/{}", topic_name(d)),
                    payload_bytes: size,
                    mode,
                    count: args.count,
                    deadline: args.scenario_timeout,
                });
            }
        }
    }
    if args.rate > 0
        && let Some(d) = args
            .durabilities
            .iter()
            .find(|d| d.as_str() == "Disk")
            .or(args.durabilities.last())
    {
        scenarios.push(Scenario {
            id: format!("{}-256-fixed-{}/s", d.to_ascii_lowercase(), args.rate),
            topic: format!("default/{}", topic_name(d)),
            subscription: format!("default/{}", topic_name(d)),
            payload_bytes: 256,
            mode: Mode::FixedRate {
                per_sec: args.rate,
                max_outstanding: 1024,
            },
            count: (f64::from(args.rate) * args.rate_duration.as_secs_f64()) as u64,
            deadline: args
                .scenario_timeout
                .max(args.rate_duration + Duration::from_secs(10)),
        });
        scenarios.push(Scenario {
            id: format!(
                "{}-256-fixed-stream-{}/s",
                d.to_ascii_lowercase(),
                args.rate
            ),
            topic: format!("default/{}", topic_name(d)),
            subscription: format!("default/{}", topic_name(d)),
            payload_bytes: 256,
            mode: Mode::FixedRateStream { per_sec: args.rate },
            count: (f64::from(args.rate) * args.rate_duration.as_secs_f64()) as u64,
            deadline: args
                .scenario_timeout
                .max(args.rate_duration + Duration::from_secs(10)),
        });
    }
    let mut outcome = Ok(());
    for s in &scenarios {
        match measure(&mesh, &producer, &consumer, s, clock).await {
            Ok(report) => println!("{}", report.row()),
            Err(e) => {
                println!("{:<28} failed: {e:#}", s.id);
                outcome = Err(e);
            }
        }
    }
    let unclean = mesh.shutdown().await;
    if !unclean.is_empty() {
        println!("did not stop cleanly: {}", unclean.join(", "));
    }
    outcome
}

/// Runs one scenario and turns what it saw, plus CPU, RSS and fsync counters, into a report.
async fn measure(
    mesh: &Mesh,
    producer: &str,
    consumer: &str,
    s: &Scenario,
    clock: Instant,
) -> anyhow::Result<Report> {
    let pids: Vec<u32> = mesh.processes().map(|p| p.pid).collect();
    let cpu = || {
        pids.iter()
            .filter_map(|pid| proc_stat::cpu_seconds(*pid))
            .sum::<f64>()
    };
    let fsyncs = || async {
        let mut total = None;
        for p in mesh.processes() {
            // A log that never synced has no sample yet: that counts as 0.
            if let Ok(samples) = metrics::scrape(p.spec.endpoints.admin).await {
                *total.get_or_insert(0.0) += metrics::counter(&samples, "fsync");
            }
        }
        total
    };
    let (cpu0, fsync0) = (cpu(), fsyncs().await);
    let started = Instant::now();
    let mut o = scenario::run(producer, consumer, s, clock)
        .await
        .with_context(|| format!("scenario {}", s.id))?;
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let (cpu1, fsync1) = (cpu(), fsyncs().await);
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
        fsyncs_per_sec: fsync0.zip(fsync1).map(|(a, b)| (b - a) / elapsed),
        cpu_secs_per_million: (cpu1 - cpu0) / (o.delivered.max(1) as f64) * 1e6,
        max_rss_bytes: pids
            .iter()
            .filter_map(|pid| proc_stat::rss_bytes(*pid))
            .max()
            .unwrap_or(0),
        errors: o.errors,
    })
}

/// The bench's data folder: the one asked for (kept), or a temporary one (deleted).
struct DataDir {
    path: std::path::PathBuf,
    keep: bool,
}

impl DataDir {
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn tempfile_dir(args: &BenchArgs) -> anyhow::Result<DataDir> {
    if let Some(path) = &args.data_dir {
        return Ok(DataDir {
            path: path.clone(),
            keep: true,
        });
    }
    let path = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(DataDir { path, keep: false })
}
