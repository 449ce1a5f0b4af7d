//! Workload identity, the operator's side: it is the mesh's certificate authority, and it
//! issues a sidecar its certificate only after checking, through the API server, which pod
//! the sidecar speaks for.
//!
//! Layout: [`ca_secret`] (the CA in a Secret: read, or made and created once), [`certify`]
//! (verify a projected service-account token with a TokenReview, check
//! the pod it is bound to, sign the sidecar's CSR for that pod's namespace and service
//! account), [`service`] (`ferry.v1.Identity` over TLS, which sidecars call for their
//! certificate and its renewals).

pub mod ca_secret;
pub mod certify;
pub mod service;

pub use ca_secret::{CaMaterial, CaSecretError, load_or_create};
pub use certify::{Certified, Certifier, CertifyError};
