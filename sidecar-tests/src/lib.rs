//! Process-level tests of the sidecar: real `ferry-sidecar` processes on loopback
//! addresses, started through `ferryctl`'s mesh code, checked with [`history`].
//!
//! The tests are in `tests/process/`; run them with `cargo test -p ferry-sidecar-tests`.
//! They build the sidecar themselves (see [`harness::sidecar_bin`]).

pub mod harness;
pub mod history;
