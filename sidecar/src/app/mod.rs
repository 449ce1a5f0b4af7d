//! The app API on loopback: gRPC (`grpc.rs`, service `ferry.v1.App` with server reflection)
//! and HTTP/JSON (`http.rs`) for curl and languages without gRPC. Both are thin layers over
//! the `Engine` (publishing) and the `Consumer` (consume sessions, acks and nacks).

pub mod grpc;
pub mod http;

/// Largest app gRPC message: a maximal 4 MiB payload plus its envelope.
pub const APP_MAX_MESSAGE: usize = (4 << 20) + (64 << 10);
