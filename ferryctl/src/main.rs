//! The Ferry CLI; everything but argument parsing lives in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferryctl::cli::run(ferryctl::cli::Cli::parse()).await
}
