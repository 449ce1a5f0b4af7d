//! The injected sidecar's defaults: the operator's flags, then the Helm chart's
//! `sidecar.yaml` (`--sidecar-config`, the `ferry-sidecar` ConfigMap mounted as a file).
//!
//! The file is read once at start and checked then: a typo in it stops the operator with
//! a message naming the field, instead of injecting a sidecar that cannot start. Where the
//! file and a flag both set something, the file wins: it is what the chart's values say.
//! Changing it restarts the operator (the chart's checksum annotation), so a reload is not
//! needed.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_api::consts::SIDECAR_ADMIN_PORT;
use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::Deserialize;

use super::Injection;
use crate::config::Config;
use crate::error::{Error, Result};

/// Variables the webhook sets itself from the pod (downward API) or from the ports; the
/// file may not override them.
const RESERVED_ENV: [&str; 12] = [
    "FERRY_POD_NAME",
    "FERRY_NAMESPACE",
    "FERRY_SERVICE_ACCOUNT",
    "FERRY_POD_IP",
    "FERRY_ADVERTISE_ADDR",
    "FERRY_DATA_DIR",
    "FERRY_ETCD_ENDPOINTS",
    "FERRY_ROUTING_URL",
    "FERRY_IDENTITY_URL",
    "FERRY_IDENTITY_SERVER",
    "FERRY_IDENTITY_TRUST_ANCHORS",
    "FERRY_IDENTITY_TOKEN_FILE",
];

/// Local-mode settings that a cluster's sidecar ignores (it learns them from its pod
/// record); one in the file would be a setting nobody keeps true, so it is refused.
const LEARNED_ENV: [&str; 2] = ["FERRY_ZONE", "FERRY_NODE"];

/// `sidecar.yaml`, as the chart writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarFile {
    /// The sidecar image.
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: Option<String>,
    /// Requests and limits of the sidecar container.
    pub resources: Option<ResourceRequirements>,
    /// The sidecar's ports.
    #[serde(default)]
    pub ports: Ports,
    /// Comma-separated etcd client URLs of the routing table.
    pub etcd_endpoints: Option<String>,
    /// More `FERRY_*` settings of the sidecar (grace period, sync interval, ...).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The sidecar's ports in `sidecar.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ports {
    pub app_grpc: Option<u16>,
    pub app_http: Option<u16>,
    pub peer: Option<u16>,
    pub admin: Option<u16>,
}

/// What the webhook injects, from the flags and, when given, the sidecar file.
pub fn injection(config: &Config) -> Result<Injection> {
    let file = match &config.sidecar_config {
        Some(path) => load(path)?,
        None => SidecarFile::default(),
    };
    from_file(config, file)
}

/// Reads and parses `path`.
fn load(path: &Path) -> Result<SidecarFile> {
    let bad =
        |message: String| Error::Config(format!("--sidecar-config {}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_saphyr::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// Merges the file over the flags and checks the result.
fn from_file(config: &Config, file: SidecarFile) -> Result<Injection> {
    let bad = |message: String| Error::Config(format!("--sidecar-config: {message}"));
    if let Some(peer) = file.ports.peer
        && peer != config.sidecar_peer_port
    {
        // Members' addresses use --sidecar-peer-port: both must agree.
        return Err(bad(format!(
            "ports.peer {peer} differs from --sidecar-peer-port {}",
            config.sidecar_peer_port
        )));
    }
    if let Some(policy) = &file.image_pull_policy
        && !["Always", "IfNotPresent", "Never"].contains(&policy.as_str())
    {
        return Err(bad(format!(
            "imagePullPolicy {policy:?} is not one of Always, IfNotPresent, Never"
        )));
    }
    for name in file.env.keys() {
        if !name.starts_with(ferry_api::consts::ENV_PREFIX) {
            return Err(bad(format!(
                "env.{name}: only FERRY_* settings belong here"
            )));
        }
        if RESERVED_ENV.contains(&name.as_str()) {
            return Err(bad(format!("env.{name}: set by the webhook itself")));
        }
        if LEARNED_ENV.contains(&name.as_str()) {
            return Err(bad(format!(
                "env.{name}: in a cluster the sidecar learns its zone and node from its pod record in the routing table"
            )));
        }
    }
    let image = file.image.unwrap_or_else(|| config.sidecar_image.clone());
    if image.trim().is_empty() {
        return Err(bad("image must not be empty".into()));
    }
    let etcd_endpoints = match file.etcd_endpoints {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        None => config.etcd_endpoints.clone(),
    };
    let mut env = file.env;
    if let Some(port) = file.ports.app_grpc {
        env.entry("FERRY_APP_GRPC_ADDR".into())
            .or_insert(format!("127.0.0.1:{port}"));
    }
    if let Some(port) = file.ports.app_http {
        env.entry("FERRY_APP_HTTP_ADDR".into())
            .or_insert(format!("127.0.0.1:{port}"));
    }
    let admin_port = file.ports.admin.unwrap_or(SIDECAR_ADMIN_PORT);
    env.entry("FERRY_ADMIN_ADDR".into())
        .or_insert(format!("0.0.0.0:{admin_port}"));
    Ok(Injection {
        image,
        image_pull_policy: file.image_pull_policy,
        peer_port: config.sidecar_peer_port,
        admin_port,
        etcd_endpoints,
        resources: file.resources,
        env,
        identity: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHART_FILE: &str = r#"
image: "ghcr.io/ferry-dev/ferry-sidecar:0.1.0"
imagePullPolicy: IfNotPresent
resources:
  requests:
    cpu: 20m
    memory: 32Mi
  limits:
    memory: 256Mi
ports:
  appGrpc: 7700
  appHttp: 7701
  peer: 7710
  admin: 7790
etcdEndpoints: "http://ferry-etcd-0.ferry-etcd:2379"
env:
  FERRY_APP_GRPC_ADDR: "127.0.0.1:7700"
  FERRY_SHUTDOWN_GRACE: "25s"
"#;

    fn config() -> Config {
        Config::new(vec!["http://flag:2379".into()])
    }

    fn parse(text: &str) -> Result<Injection> {
        from_file(
            &config(),
            serde_saphyr::from_str(text).map_err(|e| Error::Config(e.to_string()))?,
        )
    }

    #[test]
    fn the_chart_file_sets_the_injection() {
        let injection = parse(CHART_FILE).unwrap();
        assert_eq!(injection.image, "ghcr.io/ferry-dev/ferry-sidecar:0.1.0");
        assert_eq!(
            injection.etcd_endpoints,
            ["http://ferry-etcd-0.ferry-etcd:2379"]
        );
        let limits = injection.resources.unwrap().limits.unwrap();
        assert_eq!(limits["memory"].0, "256Mi");
        assert_eq!(injection.env["FERRY_SHUTDOWN_GRACE"], "25s");
        assert_eq!(injection.env["FERRY_ADMIN_ADDR"], "0.0.0.0:7790");
    }

    #[test]
    fn without_a_file_the_flags_decide() {
        let injection = from_file(&config(), SidecarFile::default()).unwrap();
        assert_eq!(injection.etcd_endpoints, ["http://flag:2379"]);
        assert_eq!(injection.image, config().sidecar_image);
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        for (text, expected) in [
            ("imagePullPolicy: Sometimes", "imagePullPolicy"),
            ("ports: {peer: 7711}", "ports.peer 7711"),
            ("env: {RUST_LOG: debug}", "env.RUST_LOG"),
            ("env: {FERRY_POD_NAME: x}", "env.FERRY_POD_NAME"),
            ("env: {FERRY_ZONE: zone-a}", "pod record"),
            ("env: {FERRY_NODE: n1}", "env.FERRY_NODE"),
            ("image: \" \"", "image"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert!(parse("imagee: x").is_err(), "unknown fields are refused");
    }
}
