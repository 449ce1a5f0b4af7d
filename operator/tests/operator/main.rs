//! The operator against a real etcd and kube-apiserver (the shared control plane of
//! `ferry-kind-tests`), run in process, each test in its own namespace with its own Lease
//! and fencing key. Every wait is a condition with a deadline.
//!
//! - `resources`: CRs → etcd keys and Ready statuses, missing references, finalizers;
//! - `membership`: pods and nodes → members, within the design's 2 s;
//! - `pod_records`: a record per sidecar pod with its node's zone, for its sidecar;
//! - `leadership`: restart idempotency, fencing of a stale leader;
//! - `webhook`: sidecar injection through the real API server;
//! - `identity`: workload certificates issued after a TokenReview of the pod's token;
//! - `identity_service`: the same over `ferry.v1.Identity`, and a real sidecar that gets its
//!   certificate from it and presents it to peers;
//! - `examples`: every example under `examples/` turns Ready (`kubectl wait`);
//! - `outages`: docs/reliability.md rows 15 and 17, etcd and API server paused (SIGSTOP);
//! - `zombie`: row 18, a `ferry-operator` process frozen past its lease and resumed;
//! - `faults`: signals, a routing etcd of a test's own, a private control plane.

mod examples;
mod faults;
mod identity;
mod identity_service;
mod leadership;
mod membership;
mod outages;
mod pod_records;
mod resources;
mod routing_service;
mod support;
mod webhook;
mod zombie;
