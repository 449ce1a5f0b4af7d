//! Test support: a real local control plane.
//!
//! [`ControlPlane`] starts a real etcd and a real kube-apiserver on loopback through
//! `kind-tests/control-plane.sh` (which builds the pinned binaries from the Go modules in
//! `kind-tests/tools/` and caches them). There is no kubelet, scheduler or
//! controller-manager: tests create Nodes and Pods and set pod status themselves, as a
//! kubelet would.
//!
//! The end-to-end suite (`tests/e2e/`) builds on it: [`e2e::E2e`] is one test's world (a
//! `ferry-operator` process, pods as network namespaces of a [`netns::Fabric`] with
//! `ferry-sidecar` processes and `ferry-e2e-app` apps in them), [`toxic_proxy`] delays peer
//! links, and [`app_events`] is the apps' history format.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use ferry_kind_tests::{ControlPlane, CRDS_DIR};
//!
//! let cp = ControlPlane::shared().await?; // one per test binary
//! cp.install_crds(CRDS_DIR).await?;
//! let client = cp.client().await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

pub mod app_events;
pub mod binaries;
pub mod control_plane;
pub mod crds;
pub mod e2e;
pub mod http;
pub mod kubelet;
pub mod netns;
pub mod tools;
pub mod toxic_proxy;
pub mod wait;

pub use control_plane::ControlPlane;
pub use crds::{CRDS_DIR, install_crds, read_crds};
pub use wait::{wait_for, wait_for_value};
