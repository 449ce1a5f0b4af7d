//! The operator against a real etcd and kube-apiserver (the shared control plane of
//! `ferry-kind-tests`), run in process, each test in its own namespace with its own Lease
//! and fencing key. Every wait is a condition with a deadline.
//!
//! - `resources`: CRs → etcd keys and Ready statuses, missing references, finalizers;
//! - `membership`: pods and nodes → members, within the design's 2 s;
//! - `leadership`: restart idempotency, fencing of a stale leader;
//! - `webhook`: sidecar injection through the real API server;
//! - `identity`: workload certificates issued after a TokenReview of the pod's token;
//! - `examples`: every example under `examples/` turns Ready (`kubectl wait`);
//! - `outages`: docs/reliability.md rows 15 and 17, etcd and API server paused (SIGSTOP);
//! - `zombie`: row 18, a `ferry-operator` process frozen past its lease and resumed;
//! - `faults`: signals, a routing etcd of a test's own, a private control plane.

mod examples;
mod faults;
mod identity;
mod leadership;
mod membership;
mod outages;
mod resources;
mod support;
mod webhook;
mod zombie;
