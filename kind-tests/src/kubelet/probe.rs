//! A container's startup and readiness probes, run as the kubelet runs them: `httpGet` on
//! the pod IP and the named or numbered port, every `periodSeconds` after
//! `initialDelaySeconds`, each within `timeoutSeconds`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Probe as K8sProbe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::process::Child;

use super::{SpecError, only};
use crate::http::http_get;

/// An `httpGet` action on the pod IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGet {
    pub path: String,
    pub port: u16,
}

/// A probe with the API's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub http: HttpGet,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// The probe of field `at`, its named port looked up in the container's `ports`.
pub(super) fn resolve(
    probe: Option<&K8sProbe>,
    ports: &BTreeMap<String, u16>,
    at: &str,
) -> Result<Option<Probe>, SpecError> {
    let Some(probe) = probe else {
        return Ok(None);
    };
    let json = serde_json::to_value(probe).unwrap_or_default();
    only(
        &json,
        at,
        &[
            "httpGet",
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "successThreshold",
            "failureThreshold",
        ],
    )?;
    let http = probe.http_get.as_ref().ok_or_else(|| {
        SpecError::unsupported(at, "only httpGet probes (no exec, tcpSocket or grpc)")
    })?;
    let get_at = format!("{at}.httpGet");
    only(
        &serde_json::to_value(http).unwrap_or_default(),
        &get_at,
        &["path", "port", "scheme"],
    )?;
    if let Some(scheme) = &http.scheme
        && scheme != "HTTP"
    {
        return Err(SpecError::unsupported(
            format!("{get_at}.scheme"),
            format!("{scheme:?}: only HTTP"),
        ));
    }
    let port = match &http.port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| SpecError::invalid(format!("{get_at}.port"), format!("{n}")))?,
        IntOrString::String(name) => match ports.get(name) {
            Some(port) => *port,
            None => match name.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(SpecError::invalid(
                        format!("{get_at}.port"),
                        format!("the container has no port named {name:?}"),
                    ));
                }
            },
        },
    };
    let seconds = |value: Option<i32>, default: i32, field: &str| -> Result<u32, SpecError> {
        let value = value.unwrap_or(default);
        u32::try_from(value)
            .map_err(|_| SpecError::invalid(format!("{at}.{field}"), format!("{value}")))
    };
    let success_threshold = seconds(probe.success_threshold, 1, "successThreshold")?.max(1);
    let failure_threshold = seconds(probe.failure_threshold, 3, "failureThreshold")?.max(1);
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    Ok(Some(Probe {
        http: HttpGet {
            path: http.path.clone().unwrap_or_else(|| "/".into()),
            port,
        },
        initial_delay: secs(seconds(
            probe.initial_delay_seconds,
            0,
            "initialDelaySeconds",
        )?),
        period: secs(seconds(probe.period_seconds, 10, "periodSeconds")?.max(1)),
        timeout: secs(seconds(probe.timeout_seconds, 1, "timeoutSeconds")?.max(1)),
        success_threshold,
        failure_threshold,
    }))
}

/// One probe: an HTTP status from 200 to 399 within the timeout is a success.
pub async fn probe_once(probe: &Probe, ip: IpAddr) -> bool {
    let addr = SocketAddr::new(ip, probe.http.port);
    matches!(
        tokio::time::timeout(probe.timeout, http_get(addr, &probe.http.path)).await,
        Ok(Ok((status, _))) if (200..400).contains(&status)
    )
}

/// Waits for the container's startup probe (failing once it failed `failureThreshold`
/// times, as the kubelet then kills the container), then until its readiness probe
/// succeeds `successThreshold` times in a row (readiness failures only delay it; the
/// caller's deadline bounds the wait). Fails as soon as the process exits.
pub async fn wait_started(
    startup: Option<&Probe>,
    readiness: Option<&Probe>,
    ip: IpAddr,
    child: &mut Child,
) -> Result<()> {
    if let Some(probe) = startup {
        run(probe, ip, child, true).await?;
    }
    if let Some(probe) = readiness {
        run(probe, ip, child, false).await?;
    }
    Ok(())
}

async fn run(probe: &Probe, ip: IpAddr, child: &mut Child, fatal: bool) -> Result<()> {
    let kind = if fatal { "startup" } else { "readiness" };
    tokio::time::sleep(probe.initial_delay).await;
    let (mut successes, mut failures) = (0, 0);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the container exited ({status}) before its {kind} probe succeeded");
        }
        if probe_once(probe, ip).await {
            successes += 1;
            failures = 0;
            if successes >= probe.success_threshold {
                return Ok(());
            }
        } else {
            successes = 0;
            failures += 1;
            if fatal && failures >= probe.failure_threshold {
                bail!(
                    "the startup probe GET {}:{}{} failed {failures} times",
                    ip,
                    probe.http.port,
                    probe.http.path
                );
            }
        }
        tokio::time::sleep(probe.period).await;
    }
}
