//! The Ferry sidecar.
//!
//! Layout: `log` is the durable local log (one per topic).
#![doc = ""]

pub mod log;
