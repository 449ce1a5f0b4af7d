//! The volumes a container mounts: which kinds the e2e kubelet makes, and where they go.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::{SpecError, is_empty, only};

/// Default `expirationSeconds` of a projected token (the API's default).
const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// The API server refuses shorter projected tokens.
const MIN_TOKEN_SECONDS: i64 = 600;
/// Default file mode of projected files (`defaultMode`, 0644).
const DEFAULT_MODE: u32 = 0o644;

/// A volume, as the harness makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A new empty folder for the pod's lifetime (kept across container restarts).
    EmptyDir,
    /// A folder of files the kubelet writes and keeps current.
    Projected {
        /// File mode of the files.
        mode: u32,
        /// Service-account tokens bound to the pod.
        tokens: Vec<TokenSource>,
    },
}

/// A `serviceAccountToken` projection: a token of the pod's service account, bound to the
/// pod, written at `path` in the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    pub path: PathBuf,
    /// `None`: the API server's own audience.
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// A volume mounted in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// The volumes `container` mounts and its mounts (shallower paths first, so that a mount
/// inside another lands on top of it).
pub(super) fn resolve(
    spec: &PodSpec,
    container: &Container,
    at: &str,
) -> Result<(BTreeMap<String, Volume>, Vec<Mount>), SpecError> {
    let mut volumes = BTreeMap::new();
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let field = format!("{at}.volumeMounts[{}]", mount.name);
        only(
            &serde_json::to_value(mount).unwrap_or_default(),
            &field,
            &["name", "mountPath", "readOnly"],
        )?;
        let path = PathBuf::from(&mount.mount_path);
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(SpecError::invalid(
                format!("{field}.mountPath"),
                format!(
                    "{:?} is not an absolute path without '..'",
                    mount.mount_path
                ),
            ));
        }
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .ok_or_else(|| {
                SpecError::invalid(&field, format!("the pod has no volume {:?}", mount.name))
            })?;
        let json = serde_json::to_value(volume).unwrap_or_default();
        volumes.insert(
            mount.name.clone(),
            volume_of(&json, &format!("spec.volumes[{}]", mount.name))?,
        );
        mounts.push(Mount {
            volume: mount.name.clone(),
            path,
            read_only: mount.read_only.unwrap_or(false),
        });
    }
    mounts.sort_by_key(|m| m.path.components().count());
    Ok((volumes, mounts))
}

/// One volume of the pod spec (as JSON, so that every set field is seen).
fn volume_of(json: &serde_json::Value, at: &str) -> Result<Volume, SpecError> {
    only(json, at, &["name", "emptyDir", "projected"])?;
    if let Some(empty) = json.get("emptyDir") {
        let field = format!("{at}.emptyDir");
        only(empty, &field, &["medium"])?;
        if let Some(medium) = empty.get("medium").and_then(|m| m.as_str())
            && !medium.is_empty()
        {
            return Err(SpecError::unsupported(
                format!("{field}.medium"),
                format!("{medium:?}: only the node's disk"),
            ));
        }
        return Ok(Volume::EmptyDir);
    }
    let Some(projected) = json.get("projected") else {
        return Err(SpecError::Missing {
            field: format!("{at} (a volume source)"),
        });
    };
    let field = format!("{at}.projected");
    only(projected, &field, &["sources", "defaultMode"])?;
    let mode = match projected.get("defaultMode") {
        None | Some(serde_json::Value::Null) => DEFAULT_MODE,
        Some(m) => m
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| SpecError::invalid(format!("{field}.defaultMode"), format!("{m}")))?,
    };
    let mut tokens = Vec::new();
    let sources = projected.get("sources").and_then(|s| s.as_array());
    for (i, source) in sources.into_iter().flatten().enumerate() {
        let at = format!("{field}.sources[{i}]");
        only(source, &at, &["serviceAccountToken"])?;
        let Some(token) = source.get("serviceAccountToken") else {
            if is_empty(source) {
                continue;
            }
            return Err(SpecError::Missing { field: at });
        };
        let at = format!("{at}.serviceAccountToken");
        only(token, &at, &["audience", "expirationSeconds", "path"])?;
        let path = token
            .get("path")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| SpecError::Missing {
                field: format!("{at}.path"),
            })?;
        let relative = Path::new(path);
        if relative.is_absolute() || relative.components().any(|c| c == Component::ParentDir) {
            return Err(SpecError::invalid(
                format!("{at}.path"),
                format!("{path:?} is not a relative path without '..'"),
            ));
        }
        let expiration_seconds = match token.get("expirationSeconds") {
            None | Some(serde_json::Value::Null) => DEFAULT_TOKEN_SECONDS,
            Some(s) => s
                .as_i64()
                .filter(|s| *s >= MIN_TOKEN_SECONDS)
                .ok_or_else(|| {
                    SpecError::invalid(
                        format!("{at}.expirationSeconds"),
                        format!("{s}: at least {MIN_TOKEN_SECONDS}"),
                    )
                })?,
        };
        tokens.push(TokenSource {
            path: relative.to_owned(),
            audience: token
                .get("audience")
                .and_then(|a| a.as_str())
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
            expiration_seconds,
        });
    }
    Ok(Volume::Projected { mode, tokens })
}
