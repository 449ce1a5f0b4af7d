//! `ferryctl`, the Ferry CLI, as a library so that tests drive the same code.
//!
//! - [`cli`]: the command line; one module per subcommand: [`dev`], [`publish`],
//!   [`consume`], [`bench`]. Subcommands return `anyhow` errors: they are the program's
//!   top level and only report.
//! - [`mesh`]: starting and stopping local `ferry-sidecar` processes (used by `dev`,
//!   `bench` and the process-level tests); [`sidecar_bin`] finds the binary.
//! - [`client`] (gRPC app API), [`http`] (admin and HTTP/JSON API), [`metrics`]
//!   (Prometheus text), [`proc_stat`] (CPU and RSS of a process): typed errors.

pub mod bench;
pub mod cli;
pub mod client;
pub mod consume;
pub mod dev;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod proc_stat;
pub mod publish;
pub mod sidecar_bin;
