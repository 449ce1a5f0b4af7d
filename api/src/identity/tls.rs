//! rustls configurations for peer connections, with the key pair and the trust bundle
//! read at every handshake.
//!
//! Both ends authenticate: the server requires a client certificate, the client checks
//! the server's. A certificate is accepted only if it chains to the current trust bundle,
//! is within its validity period, and carries exactly one SPIFFE ID of the mesh's trust
//! domain; the client can further require one exact identity (the member the routing table
//! says it is dialling). TLS 1.3 only.
//!
//! [`Credentials`] and [`TrustBundle`] are shared handles: replacing the key pair
//! (rotation before expiry) or the bundle (a CA rotation's overlap window, when it holds the
//! old and the new root) affects the next handshake, and connections already established
//! carry on undisturbed, so that rotation drops no stream.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use super::{IdentityError, SpiffeId, spiffe_id_of};

/// ALPN of peer connections: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every Ferry TLS endpoint uses (ring, as kube's client does).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(PoisonError::into_inner) = value;
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadCertificate {
            reason: format!("{what}: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// The trust anchors, parsed once per change.
#[derive(Debug)]
struct Anchors {
    pem: String,
    roots: Arc<RootCertStore>,
    client: Arc<dyn ClientCertVerifier>,
}

/// The roots peer certificates must chain to: one CA, or two during a rotation.
#[derive(Debug)]
pub struct TrustBundle {
    provider: Arc<CryptoProvider>,
    anchors: RwLock<Arc<Anchors>>,
}

impl TrustBundle {
    /// A bundle of the CA certificates in `pem`.
    pub fn from_pem(pem: &str, provider: Arc<CryptoProvider>) -> Result<Self, IdentityError> {
        let anchors = Self::parse(pem, &provider)?;
        Ok(Self {
            provider,
            anchors: RwLock::new(Arc::new(anchors)),
        })
    }

    fn parse(pem: &str, provider: &Arc<CryptoProvider>) -> Result<Anchors, IdentityError> {
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(pem, "trust bundle")? {
            roots.add(cert).map_err(|e| IdentityError::BadBundle {
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::BadBundle {
                reason: e.to_string(),
            })?;
        Ok(Anchors {
            pem: pem.to_owned(),
            roots,
            client,
        })
    }

    /// Replaces the roots; the next handshake uses them. Returns whether they changed. A
    /// bundle that does not parse changes nothing.
    pub fn replace(&self, pem: &str) -> Result<bool, IdentityError> {
        if read(&self.anchors).pem == pem {
            return Ok(false);
        }
        let anchors = Self::parse(pem, &self.provider)?;
        write(&self.anchors, Arc::new(anchors));
        Ok(true)
    }

    /// The bundle, PEM.
    pub fn pem(&self) -> String {
        read(&self.anchors).pem.clone()
    }

    fn current(&self) -> Arc<Anchors> {
        read(&self.anchors)
    }
}

/// This sidecar's certificate chain and key, with the identity and expiry they carry.
#[derive(Debug)]
pub struct Credentials {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
    not_after: SystemTime,
}

impl Credentials {
    /// Credentials from a certificate chain (leaf first) and its private key, PEM.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let loaded = Self::load(chain_pem, key_pem, &provider)?;
        Ok(Self {
            provider,
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    fn load(
        chain_pem: &str,
        key_pem: &str,
        provider: &CryptoProvider,
    ) -> Result<Loaded, IdentityError> {
        let chain = certs_from_pem(chain_pem, "certificate chain")?;
        let id = spiffe_id_of(&chain[0])?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
            IdentityError::BadCertificate {
                reason: e.to_string(),
            }
        })?;
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
        let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            IdentityError::BadKey {
                reason: e.to_string(),
            }
        })?;
        let signer =
            provider
                .key_provider
                .load_private_key(der)
                .map_err(|e| IdentityError::BadKey {
                    reason: e.to_string(),
                })?;
        let key = CertifiedKey::new(chain, signer);
        key.keys_match().map_err(|e| IdentityError::BadKey {
            reason: format!("the key does not match the certificate: {e}"),
        })?;
        Ok(Loaded {
            key: Arc::new(key),
            id,
            not_after,
        })
    }

    /// Replaces the key pair (rotation); the next handshake presents the new one. A pair
    /// that does not load changes nothing.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        let loaded = Self::load(chain_pem, key_pem, &self.provider)?;
        write(&self.current, Arc::new(loaded));
        Ok(())
    }

    /// The identity the current certificate proves.
    pub fn identity(&self) -> SpiffeId {
        read(&self.current).id.clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        read(&self.current).not_after
    }

    fn key(&self) -> Arc<CertifiedKey> {
        read(&self.current).key.clone()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Which server identity a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Any identity of this trust domain (authorization happens afterwards).
    TrustDomain(String),
    /// Exactly this identity.
    Exactly(SpiffeId),
}

fn refuse(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Checks the SPIFFE ID of a chain already verified against the bundle.
fn check_identity(end_entity: &CertificateDer<'_>, expect: &Expect) -> Result<(), rustls::Error> {
    let id = spiffe_id_of(end_entity).map_err(refuse)?;
    let ok = match expect {
        Expect::TrustDomain(td) => &id.trust_domain == td,
        Expect::Exactly(want) => &id == want,
    };
    if ok {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Verifies a peer's certificate for a client or a server.
#[derive(Debug)]
struct PeerVerifier {
    bundle: Arc<TrustBundle>,
    expect: Expect,
    /// Whether a client without a certificate is refused at the handshake.
    mandatory: bool,
}

impl PeerVerifier {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; every peer has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let anchors = self.bundle.current();
        anchors
            .client
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.expect)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Peers are named by their SPIFFE ID, not by a DNS name: the chain is checked
        // against the bundle here and the name by `check_identity`.
        let anchors = self.bundle.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &anchors.roots,
            intermediates,
            now,
            self.bundle.provider.signature_verification_algorithms.all,
        )?;
        check_identity(end_entity, &self.expect)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// A sidecar's TLS material: its credentials and the bundle it trusts.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub credentials: Arc<Credentials>,
    pub bundle: Arc<TrustBundle>,
}

impl PeerTls {
    /// The server side: a client certificate of this trust domain is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let verifier = PeerVerifier {
            bundle: self.bundle.clone(),
            expect: Expect::TrustDomain(self.credentials.identity().trust_domain),
            mandatory: true,
        };
        let mut config = ServerConfig::builder_with_provider(self.bundle.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::BadBundle {
                reason: e.to_string(),
            })?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.credentials.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side, accepting a server that proves `expect`.
    pub fn client_config(&self, expect: Expect) -> Result<Arc<ClientConfig>, IdentityError> {
        let verifier = PeerVerifier {
            bundle: self.bundle.clone(),
            expect,
            mandatory: true,
        };
        let mut config = ClientConfig::builder_with_provider(self.bundle.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::BadBundle {
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.credentials.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The server side of the operator's identity service: it proves `credentials` (the
/// operator's own identity). A sidecar that comes to be certified has no certificate yet
/// (its token authenticates it), so none is required; with `clients`, one is requested and,
/// when offered, must chain to that bundle and name a SPIFFE ID of the trust domain: that
/// is how the routing service on the same port knows its caller
/// ([`peer_identity`] of the connection, `None` for a caller that sent none).
pub fn identity_server_config(
    credentials: Arc<Credentials>,
    clients: Option<Arc<TrustBundle>>,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let builder = ServerConfig::builder_with_provider(credentials.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::BadBundle {
            reason: e.to_string(),
        })?;
    let builder = match clients {
        Some(bundle) => builder.with_client_cert_verifier(Arc::new(PeerVerifier {
            bundle,
            expect: Expect::TrustDomain(credentials.identity().trust_domain),
            mandatory: false,
        })),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(credentials);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client that verifies servers as a peer does but has no certificate to present: what a
/// workload without an identity can do, which tests use to show that it gets nothing.
pub fn anonymous_client_config(
    bundle: Arc<TrustBundle>,
    expect: Expect,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = bundle.provider.clone();
    let verifier = PeerVerifier {
        bundle,
        expect,
        mandatory: true,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::BadBundle {
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The identity a peer proved on an established connection (its first certificate).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| IdentityError::NoCertificate {
            what: "the peer's handshake".into(),
        })?;
    spiffe_id_of(leaf)
}
