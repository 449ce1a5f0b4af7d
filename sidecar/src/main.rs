//! `ferry-sidecar`: parses flags, starts the sidecar library, prints the ready line, and
//! drains on SIGTERM. Everything else lives in the library.

use anyhow::Context;
use clap::Parser;
use ferry_sidecar::Config;
use ferry_sidecar::routing::etcd::{EtcdOptions, EtcdSource};
use ferry_sidecar::routing::operator::OperatorSource;
use ferry_sidecar::routing::{FileSource, RoutingSource, StaticSource};
use ferry_sidecar::runtime::Sidecar;

/// mimalloc: the sidecar allocates and frees a few small buffers per message (protobuf
/// fields, headers, delivery ids) across threads, where glibc's malloc spent about a third of
/// the producer's instructions (measured with callgrind on `ferryctl bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal (and not with NO_COLOR): a container's log is a file.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let config = Config::parse();
    // Watch SIGTERM before anything else: one that comes right after the ready line must
    // drain, not kill.
    let stop = ferry_sidecar::shutdown::requested(config.drain_on_stdin_eof);
    // Test builds: failpoints named in FAILPOINTS (e.g. `consumer::acked_persisted=return`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // Test builds: drop the un-fsynced writes of the data dir first, as a power loss would.
    #[cfg(feature = "powerloss")]
    if std::env::var_os(ferry_sidecar::log::powerloss::SIMULATE_ENV).is_some_and(|v| v == "1") {
        ferry_sidecar::log::powerloss::simulate(&config.data_dir)
            .context("simulating a power loss")?;
    }
    let mut status = None;
    let routing_url = config.routing_url.clone();
    let source: Box<dyn RoutingSource> = match &config.routing_file {
        Some(path) => Box::new(FileSource::new(path.clone())),
        // Needs the workload certificate: made once the sidecar is bound, below.
        None if routing_url.is_some() => Box::new(StaticSource::new(Default::default())),
        None if !config.etcd_endpoints.is_empty() => {
            let options = EtcdOptions::new(config.etcd_endpoints.clone())
                .for_pod(&config.namespace, &config.pod_name);
            let etcd = EtcdSource::new(options).context("starting the sidecar")?;
            status = Some(etcd.status());
            Box::new(etcd)
        }
        None => {
            tracing::warn!(
                "neither --routing-file nor --etcd-endpoints: starting with an empty routing table"
            );
            Box::new(StaticSource::new(Default::default()))
        }
    };
    let identity_server = config.identity_server.clone().unwrap_or_default();
    let pod = config.pod_name.clone();
    let mut sidecar = Sidecar::bind(config)
        .await
        .context("starting the sidecar")?;
    let source = match routing_url {
        Some(url) => {
            let tls = sidecar.peer_tls().context(
                "--routing-url needs this pod's workload certificate (--identity-url or --tls-dir)",
            )?;
            let server = identity_server
                .parse()
                .map_err(|e| anyhow::anyhow!("--identity-server: {e}"))?;
            let operator =
                OperatorSource::new(&url, server, tls, &pod).context("starting the sidecar")?;
            status = Some(operator.status());
            Box::new(operator) as Box<dyn RoutingSource>
        }
        None => source,
    };
    if let Some(status) = status {
        sidecar = sidecar.with_routing_status(status);
    }
    let running = sidecar
        .start(source)
        .await
        .context("starting the sidecar")?;
    println!("{}", running.ready_line());
    stop.await;
    running.shutdown();
    running.wait().await.context("shutting down")?;
    Ok(())
}
