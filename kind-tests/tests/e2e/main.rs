//! The end-to-end suite on the local control plane: a real `ferry-operator` process, real
//! `ferry-sidecar` processes each in a network namespace of its own with its pod's IP in
//! one of two zones, Pods and Nodes created through the API server, and a small app
//! (`ferry-e2e-app`) next to each sidecar that records what it published and received.
//! Every scenario prints its history counts and asserts that no acked message was lost.
//!
//! Needs root (network namespaces, iptables); fails with a clear message otherwise.
//!
//! - `examples`: every example under `examples/`, its messages flowing as its README says;
//! - `zones`: docs/reliability.md row 12, every same-zone member of a group gone;
//! - `churn`: row 21, pods flip Ready, get deleted and recreated with new IPs under load;
//! - `partition`: row 11, zone-a cut from zone-b;
//! - `flaky`: row 13, random loss and a delay proxy on the peer links;
//! - `kubelet`: the sidecar process is what the injected container says, and nothing else;
//! - `rotation`: workload certificates renewed by every sidecar under load (one-minute
//!   certificates), over mutual TLS, nothing lost and no handshake refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod churn;
mod examples;
mod flaky;
mod kubelet;
mod partition;
mod rotation;
mod support;
mod zones;
