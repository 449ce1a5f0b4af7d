//! An issuing certificate authority for workload identities.
//!
//! The CA signs only leaf certificates (path length 0) and only for an identity its caller
//! has verified: the operator after a TokenReview of the pod's service-account token,
//! `ferryctl dev` for the local pods it starts itself. Keys are ECDSA P-256, the algorithm
//! every TLS stack accepts and the cheapest to sign with at rotation time.
//!
//! A leaf is valid from five minutes before `now` (so that a peer whose clock runs a little
//! behind accepts it at once) until `now + ttl`; it carries the SPIFFE ID as its only
//! subject-alternative name and both TLS usages, since every sidecar is client and server.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;

use super::{IdentityError, SpiffeId};

/// How far back a certificate's validity starts, for peers whose clock runs behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate authority: its certificate and the key it signs with.
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate issued together with a fresh key (local mode and tests).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

fn issue_err(e: rcgen::Error) -> IdentityError {
    IdentityError::Issue {
        reason: e.to_string(),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive serial of at most 20 bytes, as RFC 5280 asks.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// A new self-signed CA for `trust_domain`, valid from `now - BACKDATE` for `validity`.
    /// Its name carries the trust domain and the time it was made, so that the CAs of a
    /// rotation can be told apart in a trust bundle.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, IdentityError> {
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Ferry");
        let made = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        name.push(
            DnType::CommonName,
            format!("Ferry identity CA {trust_domain} {made}"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key).map_err(issue_err)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            not_after: now + validity,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM), as stored in a Secret.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::BadKey {
            reason: e.to_string(),
        })?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e| IdentityError::BadCertificate {
                reason: format!("CA certificate: {e}"),
            },
        )?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
            IdentityError::BadCertificate {
                reason: format!("CA certificate: {e}"),
            }
        })?;
        if !parsed.is_ca() {
            return Err(IdentityError::BadCertificate {
                reason: "the CA certificate is not a CA (basicConstraints CA:FALSE)".into(),
            });
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| IdentityError::BadCertificate {
                reason: format!("CA certificate: {e}"),
            })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// The CA certificate, PEM (what goes into trust bundles).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (what goes into the CA's Secret, nowhere else).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<CertificateParams, IdentityError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Ferry");
        name.push(DnType::CommonName, id.workload());
        params.distinguished_name = name;
        let uri = id.to_string().try_into().map_err(issue_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        // A leaf never outlives the CA that signed it.
        params.not_after = (now + ttl).min(self.not_after).into();
        Ok(params)
    }

    /// Signs a leaf for `id` over the public key of `csr_pem`. Only the key is taken from
    /// the request: its names and extensions are ignored, since the identity is what the
    /// caller verified, not what the requester asked for.
    pub fn issue_for_csr(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<String, IdentityError> {
        let der =
            CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
                IdentityError::BadCsr {
                    reason: e.to_string(),
                }
            })?;
        let csr =
            CertificateSigningRequestParams::from_der(&der).map_err(|e| IdentityError::BadCsr {
                reason: e.to_string(),
            })?;
        let params = self.leaf_params(id, now, ttl)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(issue_err)?;
        Ok(cert.pem())
    }

    /// Issues a leaf for `id` with a key made here.
    pub fn issue_with_key(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        let key = KeyPair::generate().map_err(issue_err)?;
        let params = self.leaf_params(id, now, ttl)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh key and a certificate signing request for it, PEM: `(csr, key)`. The request
/// names nothing; the CA decides the identity.
pub fn new_csr() -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate().map_err(issue_err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(issue_err)?;
    let csr_pem = csr.pem().map_err(issue_err)?;
    Ok((csr_pem, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spiffe_id_of;

    fn leaf_der(pem: &str) -> Vec<u8> {
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_leaf_carries_exactly_the_verified_identity() {
        let now = SystemTime::now();
        let ca = Ca::generate("ferry.local", now, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("ferry.local", "shop", "orders").unwrap();
        let issued = ca
            .issue_with_key(&id, now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(spiffe_id_of(&leaf_der(&issued.cert_pem)).unwrap(), id);

        let (csr, _key) = new_csr().unwrap();
        let pem = ca
            .issue_for_csr(&id, &csr, now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(spiffe_id_of(&leaf_der(&pem)).unwrap(), id);
    }

    #[test]
    fn a_ca_survives_its_pem_round_trip_and_keeps_signing() {
        let now = SystemTime::now();
        let ca = Ca::generate("ferry.local", now, Duration::from_secs(3600)).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let id = SpiffeId::new("ferry.local", "a", "b").unwrap();
        let issued = again
            .issue_with_key(&id, now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(spiffe_id_of(&leaf_der(&issued.cert_pem)).unwrap(), id);
    }

    #[test]
    fn bad_inputs_get_precise_errors() {
        let now = SystemTime::now();
        let ca = Ca::generate("ferry.local", now, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("ferry.local", "a", "b").unwrap();
        let err = ca
            .issue_for_csr(&id, "not a csr", now, Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, IdentityError::BadCsr { .. }), "{err}");
        let leaf = ca
            .issue_with_key(&id, now, Duration::from_secs(60))
            .unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        let err = Ca::from_pem(ca.cert_pem(), "garbage").unwrap_err();
        assert!(matches!(err, IdentityError::BadKey { .. }), "{err}");
    }
}
