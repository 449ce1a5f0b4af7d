//! `ferryctl dev`: a working mesh on a laptop from a folder of CR YAML files.
//!
//! Reads the folder, makes (or reads) the local pods, starts one sidecar per pod on its own
//! loopback address, prints who is where, then every `--interval` prints what the sidecars
//! count (from their metrics) and picks up edits to the CR files, until Ctrl-C, SIGTERM or
//! SIGHUP ([`stop`]) or `--exit-after`; then it drains and stops every sidecar. Data (logs, the routing file, each sidecar's message log) lives in
//! `<dir>/.ferry-dev/` unless `--data-dir` says otherwise, so a restarted `dev` finds its
//! backlog again; `--fresh` starts empty.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_api::local::{LocalPod, PodsSource, Problem, load_pods};
use ferry_api::manifest::Manifests;

use crate::mesh::{Mesh, MeshConfig, Planned};
use crate::{metrics, sidecar_bin};

mod demo;
pub mod stop;

use stop::{StopSignals, say};

/// Folder under the CR folder where `dev` keeps its data by default.
pub const DATA_DIR: &str = ".ferry-dev";

/// Arguments of `ferryctl dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Folder of Topic, ConsumerGroup and Subscription YAML files, and optionally a
    /// `pods.yaml` listing the local pods (default: two per group, one per zone, plus a
    /// producer per namespace).
    pub dir: PathBuf,
    /// Where the sidecars keep their data and logs (default: `<dir>/.ferry-dev`).
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Delete the data folder first: start with no backlog.
    #[arg(long)]
    pub fresh: bool,
    /// First three octets of the sidecars' loopback addresses: sidecar N gets `<subnet>.N`.
    #[arg(long, default_value = "127.0.1", value_parser = subnet)]
    pub subnet: [u8; 3],
    /// How often to print the counters and re-read the CR files (Go duration).
    #[arg(long, default_value = "5s", value_parser = crate::cli::duration)]
    pub interval: Duration,
    /// Stop by itself after this long (Go duration; `0s`: as soon as every sidecar is
    /// ready), for scripts and tests. Default: run until Ctrl-C, SIGTERM or SIGHUP.
    #[arg(long, value_parser = crate::cli::duration)]
    pub exit_after: Option<Duration>,
    /// How long each sidecar may take to print its ready line.
    #[arg(long, default_value = "20s", value_parser = crate::cli::duration)]
    pub ready_timeout: Duration,
    /// Do not run the demo traffic (by default a consumer app acks at every group member and
    /// the producer pod publishes one message per topic every `--demo-interval`, each
    /// delivery printed with the pod and zone that got it).
    #[arg(long)]
    pub no_demo: bool,
    /// How often the demo producer publishes (Go duration).
    #[arg(long, default_value = "2s", value_parser = crate::cli::duration)]
    pub demo_interval: Duration,
    /// Grace period each sidecar gets to drain after SIGTERM.
    #[arg(long, default_value = "5s", value_parser = crate::cli::duration)]
    pub shutdown_grace: Duration,
}

/// Parses `a.b.c` into three octets.
pub fn subnet(text: &str) -> Result<[u8; 3], String> {
    let octets: Vec<u8> = text
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{text:?}: {e}"))?;
    match octets.as_slice() {
        [127, b, c] => Ok([127, *b, *c]),
        [_, _, _] => Err(format!("{text:?}: must be a loopback prefix (127.x.y)")),
        _ => Err(format!("{text:?}: expected three octets such as 127.0.1")),
    }
}

/// Runs `ferryctl dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let manifests = Manifests::read_dir(&args.dir)?;
    let (pods, source) = load_pods(&args.dir, &manifests)?;
    let data_root = args
        .data_dir
        .clone()
        .unwrap_or_else(|| args.dir.join(DATA_DIR));
    if args.fresh && data_root.exists() {
        std::fs::remove_dir_all(&data_root)
            .with_context(|| format!("removing {}", data_root.display()))?;
    }
    let mut config = MeshConfig::new(sidecar_bin::locate()?, data_root.clone());
    config.subnet = args.subnet;
    config.ready_timeout = args.ready_timeout;
    config.shutdown_grace = args.shutdown_grace;

    println!(
        "ferryctl dev: {} topics, {} groups, {} subscriptions from {}",
        manifests.topics.len(),
        manifests.groups.len(),
        manifests.subscriptions.len(),
        args.dir.display()
    );
    println!("pods from {source}:");
    print!("{}", pods_table(&pods));
    if source == PodsSource::Default {
        println!(
            "(write a {} beside the CRs to choose pods, zones and labels)",
            ferry_api::local::PODS_FILE
        );
    }
    let planned = Planned::new(&config, &manifests, &pods)?;
    print_problems(&planned.problems);
    println!(
        "data: {} (sidecar logs in {}/logs)",
        data_root.display(),
        data_root.display()
    );
    println!(
        "starting {} sidecars ({})...",
        pods.len(),
        config.sidecar_bin.display()
    );

    let mut signals = StopSignals::install().context("watching SIGINT, SIGTERM and SIGHUP")?;
    let mut mesh = Mesh::start_planned(&config, planned).await?;
    print!("{}", sidecars_table(&mesh));
    print_hints(&mesh);
    let stop_demo = tokio_util::sync::CancellationToken::new();
    let mut demo = if args.no_demo {
        tokio::task::JoinSet::new()
    } else {
        println!("demo traffic on (--no-demo turns it off):");
        demo::start(&mesh, args.demo_interval, &stop_demo)
    };
    let outcome = watch(&mut mesh, &args, &mut signals).await;
    stop_demo.cancel();
    while demo.join_next().await.is_some() {}
    say(format_args!(
        "stopping: SIGTERM to every sidecar (grace {:?})...",
        args.shutdown_grace
    ));
    // A second signal does not wait for the drain: dropping the shutdown kills the
    // sidecars still running (SIGKILL; `Disk` topics keep what they acked).
    let unclean = tokio::select! {
        unclean = mesh.shutdown() => unclean,
        name = signals.next() => {
            say(format_args!("{name} again: SIGKILL to the sidecars still draining"));
            anyhow::bail!("stopped by a second {name} before the sidecars drained");
        }
    };
    if unclean.is_empty() {
        say(format_args!("all sidecars stopped cleanly"));
    } else {
        say(format_args!("did not stop cleanly: {}", unclean.join(", ")));
    }
    outcome
}

/// The loop after start-up: counters, reloads and crashed sidecars, until told to stop.
async fn watch(mesh: &mut Mesh, args: &DevArgs, signals: &mut StopSignals) -> anyhow::Result<()> {
    let start = Instant::now();
    let stop_at = args.exit_after.map(|d| start + d);
    let mut last: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut ticker = tokio::time::interval(args.interval);
    ticker.tick().await;
    loop {
        let until_stop = stop_at.map(|at| at.saturating_duration_since(Instant::now()));
        if until_stop == Some(Duration::ZERO) {
            return Ok(());
        }
        tokio::select! {
            name = signals.next() => {
                say(format_args!("{name}: stopping"));
                return Ok(());
            }
            () = tokio::time::sleep(until_stop.unwrap_or(Duration::MAX)) => return Ok(()),
            _ = ticker.tick() => {}
        }
        for gone in mesh.reap_exited() {
            println!(
                "sidecar {} exited unexpectedly; last output:\n{}",
                gone.spec.pod.id(),
                gone.output.tail(20)
            );
        }
        match Manifests::read_dir(&args.dir).map(|m| mesh.reload(&m)) {
            Ok(Ok(Some(problems))) => {
                println!(
                    "CRs changed: routing table revision {} written",
                    mesh.table.revision
                );
                print_problems(&problems);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => println!("writing the new routing table failed: {e}"),
            Err(e) => println!("CR files not reloaded: {e}"),
        }
        let totals = scrape_totals(mesh).await;
        if totals != last {
            let line: Vec<String> = totals
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={v} (+{})",
                        v - last.get(k).copied().unwrap_or_default()
                    )
                })
                .collect();
            println!("[{:>4}s] {}", start.elapsed().as_secs(), line.join(" "));
            last = totals;
        }
    }
}

/// The summary counters summed over every sidecar that answers.
async fn scrape_totals(mesh: &Mesh) -> BTreeMap<&'static str, f64> {
    let mut totals = BTreeMap::new();
    for process in mesh.processes() {
        if let Ok(samples) = metrics::scrape(process.spec.endpoints.admin).await {
            for (k, v) in metrics::summary(&samples) {
                *totals.entry(k).or_insert(0.0) += v;
            }
        }
    }
    totals
}

/// The pods as a table.
pub fn pods_table(pods: &[LocalPod]) -> String {
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.zone.clone(),
                p.node_name(),
                p.ready.to_string(),
                labels.join(","),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "POD", "ZONE", "NODE", "READY", "LABELS"],
        &rows,
    )
}

/// The running sidecars, their endpoints and the groups they are members of.
pub fn sidecars_table(mesh: &Mesh) -> String {
    let rows: Vec<Vec<String>> = mesh
        .specs
        .iter()
        .map(|s| {
            let groups: Vec<String> = mesh
                .table
                .members
                .iter()
                .filter(|(_, members)| {
                    members
                        .values()
                        .any(|m| m.namespace == s.pod.namespace && m.pod == s.pod.name)
                })
                .map(|(group, _)| group.clone())
                .collect();
            let pid = mesh
                .process(&s.pod.id())
                .map(|p| p.pid.to_string())
                .unwrap_or_else(|_| "-".into());
            let e = &s.endpoints;
            vec![
                s.pod.id(),
                s.pod.zone.clone(),
                e.app_grpc.to_string(),
                e.app_http.to_string(),
                e.peer.to_string(),
                e.admin.to_string(),
                pid,
                if groups.is_empty() {
                    "-".into()
                } else {
                    groups.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "SIDECAR", "ZONE", "APP-GRPC", "APP-HTTP", "PEER", "ADMIN", "PID", "GROUPS",
        ],
        &rows,
    )
}

fn print_hints(mesh: &Mesh) {
    let Some(sub) = mesh.table.subscriptions.values().next() else {
        println!("no subscriptions: nothing will be delivered");
        return;
    };
    let member = mesh.table.ready_members(&sub.group).next();
    let producer = mesh
        .specs
        .iter()
        .find(|s| s.pod.name == ferry_api::local::PRODUCER_POD)
        .or(mesh.specs.first());
    if let (Some(producer), Some(member)) = (producer, member)
        && let Some(consumer) = mesh
            .specs
            .iter()
            .find(|s| s.pod.namespace == member.namespace && s.pod.name == member.pod)
    {
        println!("try, in another terminal:");
        println!(
            "  ferryctl consume --to {} {}/{}",
            consumer.endpoints.app_grpc, sub.namespace, sub.name
        );
        println!(
            "  ferryctl publish --to {} {} 'hello {{i}}' --count 3",
            producer.endpoints.app_grpc, sub.topic
        );
    }
    println!("Ctrl-C stops every sidecar (so do SIGTERM and SIGHUP).");
}

fn print_problems(problems: &[Problem]) {
    for p in problems {
        println!("warning: {p}");
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn subnet_must_be_loopback() {
        assert_eq!(subnet("127.0.1"), Ok([127, 0, 1]));
        assert!(subnet("10.0.1").is_err());
        assert!(subnet("127.0").is_err());
        assert!(subnet("127.0.300").is_err());
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}
