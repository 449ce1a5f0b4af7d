//! Default ports and names, shared so that every binary and the chart agree.

/// API group of every Ferry resource.
pub const GROUP: &str = "ferry.dev";
/// API version of every Ferry resource.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get ferry` lists every Ferry resource.
pub const CATEGORY: &str = "ferry";

/// App gRPC API, loopback only.
pub const APP_GRPC_PORT: u16 = 7700;
/// App HTTP/JSON API, loopback only.
pub const APP_HTTP_PORT: u16 = 7701;
/// Sidecar-to-sidecar gRPC, on the pod IP.
pub const PEER_GRPC_PORT: u16 = 7710;
/// Sidecar admin: metrics, health, readiness.
pub const SIDECAR_ADMIN_PORT: u16 = 7790;
/// Operator metrics and health.
pub const OPERATOR_METRICS_PORT: u16 = 8080;
/// Operator's sidecar-injection webhook.
pub const WEBHOOK_PORT: u16 = 8443;
/// Operator's identity service (`ferry.v1.Identity`, gRPC over TLS).
pub const IDENTITY_PORT: u16 = 8444;
/// Service account the operator runs as (the chart's); its SPIFFE ID is what the identity
/// service proves to sidecars.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "ferry-operator";
/// Where the injected sidecar finds its pod's projected identity token.
pub const IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/ferry.dev/identity";
/// File name of the token in [`IDENTITY_TOKEN_DIR`].
pub const IDENTITY_TOKEN_FILE: &str = "token";
/// [`IDENTITY_TOKEN_DIR`]`/`[`IDENTITY_TOKEN_FILE`], the sidecar's default token file.
pub const IDENTITY_TOKEN_PATH: &str = "/var/run/secrets/ferry.dev/identity/token";

/// Prefix of every environment variable the binaries read.
pub const ENV_PREFIX: &str = "FERRY_";
/// Audience of the projected service-account token a sidecar presents to be issued its
/// workload certificate; a token for any other audience is refused.
pub const IDENTITY_AUDIENCE: &str = "ferry.dev/identity";
/// Pod annotation that asks for sidecar injection.
pub const INJECT_ANNOTATION: &str = "ferry.dev/inject";
/// Node label that gives a member its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Finalizer the operator puts on every Ferry resource.
pub const FINALIZER: &str = "ferry.dev/routing-table";
/// Field manager the operator uses for server-side apply.
pub const FIELD_MANAGER: &str = "ferry-operator";
/// Name of the sidecar container the webhook injects; a pod carrying a container of this
/// name (native sidecar or plain) can be a group member.
pub const SIDECAR_CONTAINER: &str = "ferry-sidecar";
/// Pod annotations that override the injected sidecar's defaults, one setting each.
pub mod sidecar_annotations {
    /// CPU request of the sidecar container (`100m`, `0.5`).
    pub const CPU_REQUEST: &str = "ferry.dev/sidecar-cpu-request";
    /// CPU limit of the sidecar container.
    pub const CPU_LIMIT: &str = "ferry.dev/sidecar-cpu-limit";
    /// Memory request of the sidecar container (`64Mi`).
    pub const MEMORY_REQUEST: &str = "ferry.dev/sidecar-memory-request";
    /// Memory limit of the sidecar container.
    pub const MEMORY_LIMIT: &str = "ferry.dev/sidecar-memory-limit";
    /// The sidecar's log filter (`FERRY_LOG`, e.g. `debug` or `info,ferry_sidecar=debug`).
    pub const LOG: &str = "ferry.dev/sidecar-log";
    /// Name of a volume of the pod (a PersistentVolumeClaim, say) to keep the sidecar's log
    /// on, instead of the default `emptyDir`.
    pub const DATA_VOLUME: &str = "ferry.dev/data-volume";
    /// `sizeLimit` of the default `emptyDir` data volume (`1Gi`).
    pub const DATA_SIZE_LIMIT: &str = "ferry.dev/data-size-limit";
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_path_is_the_dir_and_the_file() {
        assert_eq!(
            super::IDENTITY_TOKEN_PATH,
            format!(
                "{}/{}",
                super::IDENTITY_TOKEN_DIR,
                super::IDENTITY_TOKEN_FILE
            )
        );
    }
}
