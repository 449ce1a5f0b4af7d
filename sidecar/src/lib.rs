//! The Ferry sidecar, as a library (`main.rs` is a thin wrapper) so that tests and
//! `ferryctl dev` can run several sidecars in one process.
//!
//! Layout:
//! - `config`: flags and `FERRY_` environment, validated at start.
//! - `error`: typed errors and their single mapping to gRPC and HTTP statuses.
//! - `routing`: where the routing table comes from (`RoutingSource`) and name resolution.
//! - `log`: the durable local log (one per topic).
//! - `store`: per-topic store thread around a log: group commit, dedup, backlog limit.
//! - `metrics`: Prometheus metrics.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod error;
pub mod log;
pub mod metrics;
pub mod routing;
pub mod store;

pub use config::Config;
pub use error::Error;
