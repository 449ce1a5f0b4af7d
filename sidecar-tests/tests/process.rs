//! Process-level tests: real `ferry-sidecar` processes on loopback, one mesh per test.
//! Every wait is a condition with a deadline; history counts are printed by every test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process {
    pub mod bad_input;
    pub mod common;
    pub mod dead_letter;
    pub mod delivery_counts;
    pub mod dev_cli;
    pub mod grpcurl;
    pub mod handoff;
    pub mod kill9;
    pub mod load_baseline;
    pub mod replicated;
    pub mod sigterm;
    pub mod torn_tail;
    pub mod zones;
}
