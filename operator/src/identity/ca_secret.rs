//! The mesh's CA, kept in a Secret of the operator's namespace.
//!
//! The Secret has the `kubernetes.io/tls` layout (`tls.crt`, `tls.key`), which is also
//! what cert-manager writes for a `Certificate` with `isCA: true`: a platform team that
//! wants cert-manager (or its own PKI) to own the CA points the operator at that Secret,
//! and the operator only reads it. When the Secret does not exist the operator makes a CA
//! and creates it. It creates and never overwrites: of two replicas racing at first start,
//! one wins and the other gets `AlreadyExists` and reads the winner's CA, so the mesh never
//! has two CAs by accident.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ferry_api::identity::IdentityError;
use ferry_api::identity::ca::Ca;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};

const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

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

fn from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Ca, CaSecretError> {
    let cert = text(secret, CERT_KEY, namespace, name)?;
    let key = text(secret, KEY_KEY, namespace, name)?;
    Ca::from_pem(&cert, &key).map_err(|source| CaSecretError::Unusable {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// The CA in Secret `namespace/name`, made and stored there first if the Secret does not
/// exist (valid for `validity`, for `trust_domain`).
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    validity: Duration,
) -> Result<Ca, CaSecretError> {
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
            Ok(ca)
        }
        // Another replica created it first: use that one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(name).await.map_err(kube_err)?;
            from_secret(&secret, namespace, name)
        }
        Err(e) => Err(kube_err(e)),
    }
}
