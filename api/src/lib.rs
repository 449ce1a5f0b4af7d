//! Ferry's shared contracts, used by the operator, the sidecar and `ferryctl` alike.
//!
//! Layout:
//! - [`crd`]: the custom resources (`Topic`, `ConsumerGroup`, `Subscription`) in API group
//!   `ferry.dev/v1alpha1`, with their schemas, defaults and CEL rules;
//! - [`duration`]: the Go-style durations (`30s`, `1m30s`) that the CRDs use, parsed the way
//!   the API server's CEL `duration()` parses them;
//! - [`quantity`]: byte sizes written as Kubernetes quantities (`512Mi`, `1G`);
//! - [`consts`]: default ports, names and environment prefixes;
//! - [`flags`]: the convention every binary's flags follow (help text, `FERRY_` variable);
//! - [`routing`]: the routing table in etcd (keys, versioned values) and in memory;
//! - [`manifest`]: reading CR YAML files (the same files `kubectl apply` takes);
//! - [`identity`]: workload identity (SPIFFE IDs in certificates), the CA that issues them
//!   and the mutual-TLS configurations of peer connections;
//! - [`proto`]: the gRPC contracts (app API `ferry.v1.App`, sidecar-to-sidecar `ferry.v1.Peer`).

pub mod consts;
pub mod crd;
pub mod duration;
pub mod flags;
pub mod identity;
pub mod local;
pub mod manifest;
pub mod proto;
pub mod quantity;
pub mod routing;

pub use crd::{ConsumerGroup, Subscription, Topic};
