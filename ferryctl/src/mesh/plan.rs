//! Where each local sidecar listens: its own loopback address, the default ports.
//!
//! Linux routes all of 127.0.0.0/8 to the loopback device, so every sidecar can bind
//! `127.0.1.N` with the same ports as in a pod, with no setup; that keeps the ports of the
//! local mesh the ones in the docs and lets a user tell sidecars apart by address alone.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use ferry_api::consts::{APP_GRPC_PORT, APP_HTTP_PORT, PEER_GRPC_PORT, SIDECAR_ADMIN_PORT};
use ferry_api::local::LocalPod;

/// The first three octets of the local mesh's addresses: sidecar N gets `127.0.1.N`.
pub const DEFAULT_SUBNET: [u8; 3] = [127, 0, 1];

/// The endpoints of one sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub app_grpc: SocketAddr,
    pub app_http: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
}

impl Endpoints {
    /// The default ports on one address.
    pub fn on(ip: Ipv4Addr) -> Self {
        let at = |port| SocketAddr::V4(SocketAddrV4::new(ip, port));
        Self {
            app_grpc: at(APP_GRPC_PORT),
            app_http: at(APP_HTTP_PORT),
            peer: at(PEER_GRPC_PORT),
            admin: at(SIDECAR_ADMIN_PORT),
        }
    }
}

/// One sidecar to start: its pod, its address and its data folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSpec {
    pub pod: LocalPod,
    pub ip: Ipv4Addr,
    pub endpoints: Endpoints,
    pub data_dir: PathBuf,
    /// Its workload certificate, key and trust bundle (`--tls-dir`).
    pub tls_dir: PathBuf,
}

/// Why a mesh cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{count} pods do not fit in one /24 of loopback addresses (at most 254)")]
    TooManyPods { count: usize },
}

/// Gives pod `i` (in the given order) the address `<subnet>.(i + 1)` and the data folder
/// `<data_root>/pods/<namespace>/<name>`, so a restarted mesh finds its logs again, and
/// its certificate folder `<data_root>/identity/pods/<namespace>/<name>`.
pub fn plan(
    pods: &[LocalPod],
    subnet: [u8; 3],
    data_root: &Path,
) -> Result<Vec<SidecarSpec>, PlanError> {
    if pods.len() > 254 {
        return Err(PlanError::TooManyPods { count: pods.len() });
    }
    Ok(pods
        .iter()
        .zip(1u8..)
        .map(|(pod, host)| {
            let ip = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host);
            SidecarSpec {
                pod: pod.clone(),
                ip,
                endpoints: Endpoints::on(ip),
                data_dir: data_root.join("pods").join(&pod.namespace).join(&pod.name),
                tls_dir: super::identity::pod_dir(data_root, pod),
            }
        })
        .collect())
}

/// The peer address of `pod` in a plan, as the routing table lists it.
pub fn peer_address(specs: &[SidecarSpec], pod: &LocalPod) -> String {
    specs
        .iter()
        .find(|s| s.pod.id() == pod.id())
        .map(|s| s.endpoints.peer.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_consecutive_loopback_addresses() {
        let pod = |name: &str| LocalPod {
            name: name.into(),
            namespace: "default".into(),
            zone: "zone-a".into(),
            node: String::new(),
            labels: Default::default(),
            ready: true,
            service_account: "default".into(),
        };
        let pods = [pod("a"), pod("b")];
        let specs = plan(&pods, DEFAULT_SUBNET, Path::new("/d")).expect("plans");
        assert_eq!(specs[1].endpoints.app_grpc.to_string(), "127.0.1.2:7700");
        assert_eq!(specs[1].endpoints.admin.to_string(), "127.0.1.2:7790");
        assert_eq!(specs[0].data_dir, Path::new("/d/pods/default/a"));
        assert_eq!(peer_address(&specs, &pods[1]), "127.0.1.2:7710");
        let many: Vec<_> = (0..255).map(|i| pod(&format!("p{i}"))).collect();
        assert!(plan(&many, DEFAULT_SUBNET, Path::new("/d")).is_err());
    }
}
