//! The Ferry sidecar, as a library (`main.rs` is a thin wrapper) so that tests and
//! `ferryctl dev` can run several sidecars in one process.
//!
//! Layout: `clock` (wall time read once, then monotonic), `config` (flags and `FERRY_` environment), `error` (typed errors and their one
//! mapping to gRPC and HTTP statuses), `routing` (where the routing table comes from and
//! name resolution), `log` (the durable local log), `store` (a thread per topic around its
//! log: group commit, dedup, backlog limit), `delivery` (producer side: a dispatcher per
//! subscription choosing members, retrying, dead-lettering), `peer` (sidecar-to-sidecar
//! gRPC: server and batched client streams), `consumer` (consuming side: deliveries held
//! for the app, credits, delivery ids), `app` (the app's gRPC and HTTP APIs), `admin`
//! (metrics and health), `identity` (the workload certificate from the operator's identity
//! service, renewed at half-life), `placement` (the zone and node it routes by: its pod
//! record in a cluster), `http_server` (the limits of the HTTP ports: header timeout,
//! header size, connections), `engine` (the shared state handed to every layer), `runtime`
//! (starting and stopping it all) and `shutdown` (signals and the drain).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod http_server;
pub mod identity;
pub mod log;
pub mod metrics;
pub mod peer;
pub mod placement;
pub mod replica;
pub mod routing;
pub mod runtime;
pub mod shutdown;
pub mod store;

pub use config::Config;
pub use engine::Engine;
pub use error::Error;
pub use runtime::{Addrs, Running, Sidecar};
