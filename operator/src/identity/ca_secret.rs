//! The mesh's CA, kept in a Secret of the operator's namespace.
//!
//! The Secret has the `kubernetes.io/tls` layout (`tls.crt`, `tls.key`), which is also
//! what cert-manager writes for a `Certificate` with `isCA: true`: a platform team that
//! wants cert-manager (or its own PKI) to own the CA points the operator at that Secret,
//! and the operator only reads it. When the Secret does not exist the operator makes a CA
//! and creates it. It creates and never overwrites: of two replicas racing at first start,
//! one wins and the other gets `AlreadyExists` and reads the winner's CA, so the mesh never
//! has two CAs by accident.
//!
//! **Rotating the CA** (the overlap window): put the new CA in `tls.crt`/`tls.key` and both
//! the old and the new certificate in `ca.crt` (cert-manager's key for the bundle). The
//! operator re-reads the Secret every 30 s: it then signs with the new CA and hands out the
//! two-root bundle with every certificate, so sidecars trust peers of either CA while they
//! renew (at half-life). Once every certificate was renewed (a certificate lifetime later),
//! drop the old CA from `ca.crt`. Without `ca.crt` the bundle is `tls.crt` alone. A `ca.crt`
//! that does not contain the signing CA is refused, since peers would reject what it signs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ferry_api::identity::IdentityError;
use ferry_api::identity::ca::Ca;
use ferry_api::identity::tls::certs_from_pem;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};

const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const BUNDLE_KEY: &str = "ca.crt";

/// The CA and the bundle of roots that peers trust (the CA alone, or more in a rotation).
#[derive(Debug)]
pub struct CaMaterial {
    pub ca: Ca,
    pub bundle_pem: String,
}

/// Why the CA could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Secret {namespace}/{name}: key {key:?} is missing or not UTF-8")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name} does not hold a usable CA: {source}")]
    Unusable {
        namespace: String,
        name: String,
        #[source]
        source: IdentityError,
    },
    #[error("making a new CA: {0}")]
    Generate(#[source] IdentityError),
    #[error("Secret {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

fn text(
    secret: &Secret,
    key: &'static str,
    namespace: &str,
    name: &str,
) -> Result<String, CaSecretError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or_else(|| CaSecretError::MissingKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key,
        })
}

fn from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<CaMaterial, CaSecretError> {
    let cert = text(secret, CERT_KEY, namespace, name)?;
    let key = text(secret, KEY_KEY, namespace, name)?;
    let unusable = |source| CaSecretError::Unusable {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let ca = Ca::from_pem(&cert, &key).map_err(unusable)?;
    let bundle_pem = match text(secret, BUNDLE_KEY, namespace, name) {
        Ok(bundle) => {
            let roots = certs_from_pem(&bundle, BUNDLE_KEY).map_err(unusable)?;
            let signing = certs_from_pem(ca.cert_pem(), CERT_KEY).map_err(unusable)?;
            if !signing.iter().all(|c| roots.contains(c)) {
                return Err(unusable(IdentityError::BadBundle {
                    reason: format!("{BUNDLE_KEY} does not contain the CA of {CERT_KEY}"),
                }));
            }
            bundle
        }
        Err(_) => ca.cert_pem().to_owned(),
    };
    Ok(CaMaterial { ca, bundle_pem })
}

/// The CA in Secret `namespace/name`, if the Secret exists.
pub async fn read(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<CaMaterial>, CaSecretError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| CaSecretError::Kube {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })?;
    secret.map(|s| from_secret(&s, namespace, name)).transpose()
}

/// The CA in Secret `namespace/name`, made and stored there first if the Secret does not
/// exist (valid for `validity`, for `trust_domain`).
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    validity: Duration,
) -> Result<CaMaterial, CaSecretError> {
    let kube_err = |source| CaSecretError::Kube {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = secrets.get_opt(name).await.map_err(kube_err)? {
        return from_secret(&secret, namespace, name);
    }
    let ca =
        Ca::generate(trust_domain, SystemTime::now(), validity).map_err(CaSecretError::Generate)?;
    let data = BTreeMap::from([
        (
            CERT_KEY.to_owned(),
            ByteString(ca.cert_pem().as_bytes().to_vec()),
        ),
        (
            KEY_KEY.to_owned(),
            ByteString(ca.key_pem().as_bytes().to_vec()),
        ),
    ]);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "created the mesh's identity CA");
            let bundle_pem = ca.cert_pem().to_owned();
            Ok(CaMaterial { ca, bundle_pem })
        }
        // Another replica created it first: use that one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(name).await.map_err(kube_err)?;
            from_secret(&secret, namespace, name)
        }
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_bundle_is_ca_crt_and_must_hold_the_signing_ca() -> Result<(), Box<dyn std::error::Error>>
    {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let (old, new) = (Ca::generate("t", now, day)?, Ca::generate("t", now, day)?);
        let alone = from_secret(
            &secret(&[(CERT_KEY, new.cert_pem()), (KEY_KEY, new.key_pem())]),
            "ns",
            "ca",
        )?;
        assert_eq!(alone.bundle_pem, new.cert_pem());

        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let rotating = from_secret(
            &secret(&[
                (CERT_KEY, new.cert_pem()),
                (KEY_KEY, new.key_pem()),
                (BUNDLE_KEY, &both),
            ]),
            "ns",
            "ca",
        )?;
        assert_eq!(rotating.bundle_pem, both);

        let error = from_secret(
            &secret(&[
                (CERT_KEY, new.cert_pem()),
                (KEY_KEY, new.key_pem()),
                (BUNDLE_KEY, old.cert_pem()),
            ]),
            "ns",
            "ca",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ca.crt does not contain"), "{error}");
        Ok(())
    }
}
