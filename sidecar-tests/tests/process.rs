//! Process-level tests: real `ferry-sidecar` processes on loopback, one mesh per test.
//! Every wait is a condition with a deadline; history counts are printed by every test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process {
    pub mod at_most_once;
    pub mod backlog_limit;
    pub mod bad_input;
    pub mod clock_skew;
    pub mod common;
    pub mod dead_letter;
    pub mod dedup_restart;
    pub mod delivered_outcomes;
    pub mod delivery_counts;
    pub mod dev_cli;
    pub mod dev_signals;
    pub mod disk_full;
    pub mod durable_app;
    pub mod durable_only;
    pub mod exactly_once_restart;
    pub mod exactly_once_takeover;
    pub mod fake_peer;
    pub mod grpcurl;
    pub mod handoff;
    pub mod handoff_groups;
    pub mod io_errors;
    pub mod key_sequence_restart;
    pub mod kill9;
    pub mod late_ack;
    pub mod load_baseline;
    pub mod nack_delay;
    pub mod ordering;
    pub mod peer_authz;
    pub mod peer_forged_acks;
    pub mod peer_holding;
    pub mod peer_mtls;
    pub mod peer_replica_limit;
    pub mod peer_settlements;
    pub mod pod_zone;
    pub mod power_loss;
    pub mod power_loss_replicated;
    pub mod replicated;
    pub mod reused_offsets;
    pub mod sigterm;
    pub mod slow_clients;
    pub mod soak_bounds;
    pub mod stuck_message;
    pub mod torn_tail;
    pub mod ttl_delay;
    pub mod zones;
}
