//! The command line: one subcommand per file, dispatched here.

use clap::{Parser, Subcommand};

use crate::{bench, consume, dev, publish};

/// Ferry's command line: a local mesh, publishing and consuming, and a load generator.
#[derive(Debug, Parser)]
#[command(name = "ferryctl", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local mesh from a folder of Topic/ConsumerGroup/Subscription YAML: one sidecar
    /// per local pod on 127.0.1.N, until Ctrl-C.
    Dev(dev::DevArgs),
    /// Publish messages to a topic through a sidecar.
    Publish(publish::PublishArgs),
    /// Consume a subscription through a sidecar, printing and acking each delivery.
    Consume(consume::ConsumeArgs),
    /// Measure throughput and latency through real sidecar processes on loopback.
    Bench(bench::BenchArgs),
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Consume(args) => consume::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

/// Parses a Go-style duration (`500ms`, `5s`, `1m30s`) for clap.
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    ferry_api::duration::parse(text).map_err(|e| e.to_string())
}
