//! Workload identity in a local mesh: `ferryctl dev` is its own CA.
//!
//! In a cluster the operator issues each sidecar's certificate after checking its pod; a
//! local mesh has no pods to check, so the CLI that starts the sidecars issues them, and
//! the sidecars then run the same mutual-TLS path as in a cluster. The CA lives under the
//! mesh's data folder (`identity/ca.crt`, `identity/ca.key`) and is kept across runs; each
//! start issues every pod a fresh certificate (`identity/pods/<namespace>/<name>/`) for its
//! namespace and service account, valid for [`LEAF_TTL`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferry_api::identity::ca::Ca;
use ferry_api::identity::files::{CredentialDir, Pems};
use ferry_api::identity::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId};
use ferry_api::local::LocalPod;

use super::SidecarSpec;

/// How long a local CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a local pod's certificate is valid; a new `ferryctl dev` issues new ones.
pub const LEAF_TTL: Duration = Duration::from_secs(24 * 3600);

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

/// The mesh's identity folder.
pub fn root(data_root: &Path) -> PathBuf {
    data_root.join("identity")
}

/// The certificate folder of `pod`.
pub fn pod_dir(data_root: &Path, pod: &LocalPod) -> PathBuf {
    root(data_root)
        .join("pods")
        .join(&pod.namespace)
        .join(&pod.name)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.display().to_string();
    move |source| IdentityError::Io { path, source }
}

/// The mesh's CA: the one kept under `data_root`, or a new one (then saved there).
pub fn ca(data_root: &Path) -> Result<Ca, IdentityError> {
    let dir = root(data_root);
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if let (Ok(cert_pem), Ok(key_pem)) = (
        std::fs::read_to_string(&cert),
        std::fs::read_to_string(&key),
    ) {
        let ca = Ca::from_pem(&cert_pem, &key_pem)?;
        // A CA about to expire is replaced rather than used for a day's certificates.
        if ca.not_after() > SystemTime::now() + LEAF_TTL {
            return Ok(ca);
        }
    }
    let ca = Ca::generate(DEFAULT_TRUST_DOMAIN, SystemTime::now(), CA_VALIDITY)?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    write_private(&key, ca.key_pem())?;
    std::fs::write(&cert, ca.cert_pem()).map_err(io(&cert))?;
    Ok(ca)
}

fn write_private(path: &Path, text: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(text.as_bytes()).map_err(io(path))
}

/// The identity a local pod's sidecar proves.
pub fn identity_of(pod: &LocalPod) -> Result<SpiffeId, IdentityError> {
    SpiffeId::new(DEFAULT_TRUST_DOMAIN, &pod.namespace, &pod.service_account)
}

/// Issues `spec`'s pod a certificate valid for `ttl` from `now` into its folder.
pub fn issue(
    ca: &Ca,
    spec: &SidecarSpec,
    now: SystemTime,
    ttl: Duration,
) -> Result<(), IdentityError> {
    let issued = ca.issue_with_key(&identity_of(&spec.pod)?, now, ttl)?;
    CredentialDir::new(&spec.tls_dir).write(&Pems {
        chain: issued.cert_pem,
        key: issued.key_pem,
        bundle: ca.cert_pem().to_owned(),
    })
}

/// Issues every sidecar of the mesh its certificate.
pub fn issue_all(data_root: &Path, specs: &[SidecarSpec]) -> Result<(), IdentityError> {
    let ca = ca(data_root)?;
    let now = SystemTime::now();
    for spec in specs {
        issue(&ca, spec, now, LEAF_TTL)?;
    }
    Ok(())
}
