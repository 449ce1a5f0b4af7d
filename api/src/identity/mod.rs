//! Workload identity: which pod a sidecar speaks for, proven by a certificate.
//!
//! A sidecar's identity is its pod's namespace and service account, written as a
//! SPIFFE ID (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) in the URI
//! subject-alternative name of a short-lived certificate. Only that certificate, verified
//! against the mesh's trust bundle, says who a peer is; nothing a sidecar reads from its own
//! environment does.
//!
//! Layout:
//! - this file: [`SpiffeId`] and the errors;
//! - [`ca`]: an issuing certificate authority (generate, load, issue a leaf for a verified
//!   identity, from a CSR or with a fresh key);
//! - [`tls`]: the rustls configurations both ends of a peer connection use, reading the
//!   current key pair and trust bundle at every handshake, so that rotating either needs no
//!   restart and drops no established connection;
//! - [`dial`]: a tonic connector that dials a peer over mutual TLS;
//! - [`files`]: the on-disk layout of a sidecar's credentials (`tls.crt`, `tls.key`,
//!   `ca.crt`, the layout of a `kubernetes.io/tls` Secret) and their reloading.

pub mod ca;
pub mod dial;
pub mod files;
pub mod tls;

use std::fmt;
use std::str::FromStr;

/// Trust domain of a mesh when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "ferry.local";

/// What went wrong with an identity, a certificate or a key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: &'static str },
    #[error("certificate has no SPIFFE ID (no spiffe:// URI subject-alternative name)")]
    NoSpiffeId,
    #[error("certificate carries {count} SPIFFE IDs; exactly one is allowed")]
    SeveralSpiffeIds { count: usize },
    #[error("certificate does not parse: {reason}")]
    BadCertificate { reason: String },
    #[error("no certificate found in {what}")]
    NoCertificate { what: String },
    #[error("private key does not parse or is unsupported: {reason}")]
    BadKey { reason: String },
    #[error("certificate signing request is invalid: {reason}")]
    BadCsr { reason: String },
    #[error("could not issue a certificate: {reason}")]
    Issue { reason: String },
    #[error("trust bundle is unusable: {reason}")]
    BadBundle { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A workload's identity: namespace and service account in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// The identity of `namespace/service_account` in `trust_domain`; every part is checked
    /// (a trust domain is a lowercase DNS name, a namespace and a service account are DNS
    /// subdomain names), so that the URI it prints parses back to the same identity.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let bad = |reason| IdentityError::InvalidSpiffeId {
            id: id.to_string(),
            reason,
        };
        if !is_dns_name(trust_domain) {
            return Err(bad("the trust domain is not a lowercase DNS name"));
        }
        if !is_dns_name(namespace) {
            return Err(bad("the namespace is not a lowercase DNS name"));
        }
        if !is_dns_name(service_account) {
            return Err(bad("the service account is not a lowercase DNS name"));
        }
        Ok(id)
    }

    /// `namespace/service-account`, as a Topic's `allowedPublishers` names it.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| IdentityError::InvalidSpiffeId {
            id: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("its path is not /ns/<namespace>/sa/<service-account>"));
        };
        Self::new(td, ns, sa)
    }
}

/// A lowercase RFC 1123 DNS name (labels of `a-z0-9-`, dot-separated, at most 253 bytes).
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The one SPIFFE ID in a DER certificate's subject-alternative names.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
        IdentityError::BadCertificate {
            reason: e.to_string(),
        }
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate {
            reason: e.to_string(),
        })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [one] => one.parse(),
        several => Err(IdentityError::SeveralSpiffeIds {
            count: several.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips_and_names_the_workload() {
        let id = SpiffeId::new("cluster.local", "shop", "orders").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        assert_eq!(id.workload(), "shop/orders");
    }

    #[test]
    fn malformed_spiffe_ids_say_what_is_wrong() {
        for (input, reason) in [
            ("https://x/ns/a/sa/b", "start with spiffe://"),
            ("spiffe://x/ns/a", "/ns/<namespace>/sa/<service-account>"),
            (
                "spiffe://x/ns/a/sa/b/extra",
                "/ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://x/sa/a/ns/b",
                "/ns/<namespace>/sa/<service-account>",
            ),
            ("spiffe://X/ns/a/sa/b", "trust domain"),
            ("spiffe://x/ns/A/sa/b", "namespace"),
            ("spiffe://x/ns/a/sa/", "service account"),
        ] {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }
}
