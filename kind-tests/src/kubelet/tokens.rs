//! Projected service-account tokens: requested through the TokenRequest API for the pod's
//! service account, bound to the pod (name and uid), written into the volume, and
//! refreshed as the kubelet does, once 80% of their lifetime has passed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};

use super::{ContainerPlan, TokenSource};

/// Retry interval when a refresh fails (the kubelet keeps the old token meanwhile).
const RETRY: Duration = Duration::from_secs(5);

/// When to refresh a token valid for `lifetime` (the kubelet's rule: past 80% of it, at
/// the latest after 24 hours).
pub fn refresh_after(lifetime: Duration) -> Duration {
    (lifetime.mul_f64(0.8)).min(Duration::from_secs(24 * 3600))
}

/// One token of `source` for the pod of `plan`; returns it and its lifetime.
pub(super) async fn request(
    client: &Client,
    plan: &ContainerPlan,
    source: &TokenSource,
) -> Result<(String, Duration)> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: source.audience.clone().map(|a| vec![a]),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(plan.pod.clone()),
                uid: Some(plan.uid.clone()),
            }),
            expiration_seconds: Some(source.expiration_seconds),
        }),
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), &plan.namespace)
        .create_token_request(&plan.service_account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!(
                "TokenRequest for serviceaccounts/{} of {}/{}",
                plan.service_account, plan.namespace, plan.pod
            )
        })?;
    let status = answer.status.context("the TokenRequest has no status")?;
    let token = status.token.context("the TokenRequest returned no token")?;
    let lifetime = match status.expiration_timestamp {
        Some(expires) => Duration::try_from(
            expires
                .0
                .duration_since(k8s_openapi::jiff::Timestamp::now()),
        )
        .unwrap_or(Duration::ZERO),
        None => Duration::from_secs(u64::try_from(source.expiration_seconds).unwrap_or(0)),
    };
    Ok((token, lifetime))
}

/// Writes `token` at `path` with `mode`, atomically (a reader never sees half a token).
pub(super) fn write(path: &Path, token: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temp = path.with_extension("tmp-token");
    std::fs::write(&temp, token)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))
}

/// Keeps the token at `path` fresh until aborted.
pub(super) async fn keep_fresh(
    client: Client,
    plan: ContainerPlan,
    source: TokenSource,
    path: PathBuf,
    mode: u32,
    mut lifetime: Duration,
) {
    let mut wait = refresh_after(lifetime);
    loop {
        tokio::time::sleep(wait).await;
        match request(&client, &plan, &source).await {
            Ok((token, new_lifetime)) => match write(&path, &token, mode) {
                Ok(()) => {
                    lifetime = new_lifetime;
                    wait = refresh_after(lifetime);
                }
                Err(error) => {
                    eprintln!("kubelet: {}: {error:#}", path.display());
                    wait = RETRY;
                }
            },
            Err(error) => {
                eprintln!("kubelet: refreshing {}: {error:#}", path.display());
                wait = RETRY;
            }
        }
    }
}
