//! Issuing a sidecar its certificate.
//!
//! A sidecar proves which pod it runs in with the pod's projected service-account token,
//! requested for the audience [`ferry_api::consts::IDENTITY_AUDIENCE`] and bound to the pod
//! (what the kubelet mounts for a `serviceAccountToken` projected volume). The operator
//! asks the API server to review the token (TokenReview): only an authenticated token of a
//! service account, for that audience, bound to a pod, is accepted. The pod must exist with
//! the uid the token names, run as that service account, not be terminating, and carry the
//! injection annotation and the sidecar as the webhook injects it: an init container named
//! `ferry-sidecar` with `restartPolicy: Always` running the operator's sidecar image
//! (`--sidecar-image`). A pod that was not injected gets no identity, whatever its
//! containers are called, and neither does one that brings its own `ferry-sidecar` of
//! another image (where the webhook does not see it, or does not deny it): its other
//! containers cannot reach the token the sidecar presents, but a container of its own
//! choosing under that name could. The certificate then names the pod's
//! namespace and service account, whatever the request asked for: only the CSR's public key
//! is used.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use ferry_api::consts::{IDENTITY_AUDIENCE, INJECT_ANNOTATION, SIDECAR_CONTAINER};
use ferry_api::identity::ca::Ca;
use ferry_api::identity::{IdentityError, SpiffeId};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, PostParams};

/// `extra` keys of a reviewed token bound to a pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Username prefix of service accounts.
const SA_PREFIX: &str = "system:serviceaccount:";

/// Why a certificate was refused. Every variant but `Kube` is the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("the token was not accepted by the API server: {0}")]
    Unauthenticated(String),
    #[error("the token is not for the audience {IDENTITY_AUDIENCE:?}")]
    WrongAudience,
    #[error("the token is not a service account's (user {0:?})")]
    NotAServiceAccount(String),
    #[error("the token is not bound to a pod; request it for the sidecar's pod")]
    NotBoundToAPod,
    #[error("pod {namespace}/{name}: {why}")]
    Pod {
        namespace: String,
        name: String,
        why: String,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the API server could not be asked: {0}")]
    Kube(#[from] kube::Error),
}

/// A certificate issued to a sidecar.
#[derive(Debug, Clone)]
pub struct Certified {
    pub identity: SpiffeId,
    /// The leaf, PEM.
    pub chain_pem: String,
    /// The CA certificates to trust, PEM.
    pub bundle_pem: String,
    pub not_after: SystemTime,
}

/// Issues certificates with the mesh's CA.
#[derive(Clone)]
pub struct Certifier {
    client: kube::Client,
    ca: Arc<RwLock<Arc<Ca>>>,
    bundle: Arc<RwLock<String>>,
    trust_domain: String,
    ttl: Duration,
    /// The sidecar image the webhook injects (`--sidecar-image`): only a pod whose
    /// `ferry-sidecar` runs it is Ferry's.
    sidecar_image: String,
}

impl std::fmt::Debug for Certifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certifier")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .field("sidecar_image", &self.sidecar_image)
            .finish_non_exhaustive()
    }
}

impl Certifier {
    /// A certifier signing with `ca` for `trust_domain`, certificates valid for `ttl`, for
    /// pods whose `ferry-sidecar` runs `sidecar_image` (the operator's `--sidecar-image`);
    /// the trust bundle it hands out is the CA alone until [`Certifier::rotate`].
    pub fn new(
        client: kube::Client,
        ca: Ca,
        trust_domain: &str,
        ttl: Duration,
        sidecar_image: &str,
    ) -> Self {
        let bundle = ca.cert_pem().to_owned();
        Self {
            client,
            ca: Arc::new(RwLock::new(Arc::new(ca))),
            bundle: Arc::new(RwLock::new(bundle)),
            trust_domain: trust_domain.to_owned(),
            ttl,
            sidecar_image: sidecar_image.to_owned(),
        }
    }

    /// The CA it signs with.
    pub fn ca(&self) -> Arc<Ca> {
        self.ca
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The CA certificates a sidecar must trust, PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hands out `bundle_pem` (which must hold the CA) instead of the CA alone.
    #[must_use]
    pub fn with_bundle(self, bundle_pem: String) -> Self {
        *self.bundle.write().unwrap_or_else(PoisonError::into_inner) = bundle_pem;
        self
    }

    /// The shared trust bundle, which [`Certifier::rotate`] updates.
    pub fn bundle_handle(&self) -> Arc<RwLock<String>> {
        self.bundle.clone()
    }

    /// Signs with `ca` from now on and hands out `bundle_pem` (which holds it, and the
    /// previous CA during a rotation's overlap window).
    pub fn rotate(&self, ca: Ca, bundle_pem: String) {
        *self.ca.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ca);
        *self.bundle.write().unwrap_or_else(PoisonError::into_inner) = bundle_pem;
    }

    /// Verifies `token` and signs `csr_pem` for the pod it is bound to.
    pub async fn certify(&self, token: &str, csr_pem: &str) -> Result<Certified, CertifyError> {
        let (namespace, service_account, pod_name, pod_uid) = self.review(token).await?;
        self.check_pod(&namespace, &service_account, &pod_name, &pod_uid)
            .await?;
        let identity = SpiffeId::new(&self.trust_domain, &namespace, &service_account)?;
        let ca = self.ca();
        let now = SystemTime::now();
        let chain_pem = ca.issue_for_csr(&identity, csr_pem, now, self.ttl)?;
        tracing::info!(%identity, pod = %format!("{namespace}/{pod_name}"), "issued a workload certificate");
        Ok(Certified {
            identity,
            chain_pem,
            bundle_pem: self.bundle_pem(),
            not_after: (now + self.ttl).min(ca.not_after()),
        })
    }

    /// `(namespace, service account, pod name, pod uid)` of a reviewed token.
    async fn review(&self, token: &str) -> Result<(String, String, String, String), CertifyError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![IDENTITY_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = reviews
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(CertifyError::Unauthenticated(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == IDENTITY_AUDIENCE)
        {
            return Err(CertifyError::WrongAudience);
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(CertifyError::NotAServiceAccount(username));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first().cloned());
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(CertifyError::NotBoundToAPod);
        };
        Ok((
            namespace.to_owned(),
            service_account.to_owned(),
            pod_name,
            pod_uid,
        ))
    }

    async fn check_pod(
        &self,
        namespace: &str,
        service_account: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), CertifyError> {
        let refuse = |why: String| CertifyError::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            why,
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let Some(pod) = pods.get_opt(name).await? else {
            return Err(refuse("does not exist".into()));
        };
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(refuse(
                "was replaced since the token was issued (another uid)".into(),
            ));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(refuse("is terminating".into()));
        }
        let spec = pod.spec.unwrap_or_default();
        let runs_as = spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into());
        if runs_as != service_account {
            return Err(refuse(format!(
                "runs as service account {runs_as:?}, not {service_account:?}"
            )));
        }
        let injected = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INJECT_ANNOTATION))
            .is_some_and(|v| v == "true");
        let named = |c: &&Container| c.name == SIDECAR_CONTAINER;
        let native = spec.init_containers.iter().flatten().find(named);
        let plain = spec.containers.iter().find(named);
        if !injected || (native.is_none() && plain.is_none()) {
            return Err(refuse(format!(
                "is not a Ferry pod (it needs the {INJECT_ANNOTATION:?} annotation and the injected {SIDECAR_CONTAINER:?} container)"
            )));
        }
        if plain.is_some() {
            return Err(refuse(format!(
                "its {SIDECAR_CONTAINER:?} is a plain container, not the injected native sidecar (an init container with restartPolicy Always)"
            )));
        }
        let Some(sidecar) = native else {
            return Err(refuse(format!(
                "has no {SIDECAR_CONTAINER:?} init container"
            )));
        };
        if sidecar.restart_policy.as_deref() != Some("Always") {
            return Err(refuse(format!(
                "its {SIDECAR_CONTAINER:?} init container has no restartPolicy Always: it is not the injected native sidecar"
            )));
        }
        let image = sidecar.image.as_deref().unwrap_or_default();
        if image != self.sidecar_image {
            return Err(refuse(format!(
                "its {SIDECAR_CONTAINER:?} runs image {image:?}, not the sidecar image {:?}",
                self.sidecar_image
            )));
        }
        Ok(())
    }
}
