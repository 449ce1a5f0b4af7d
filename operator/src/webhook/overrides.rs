//! Per-pod overrides of the injected sidecar, read from the pod's annotations
//! ([`ferry_api::consts::sidecar_annotations`]).
//!
//! Every value is checked before the pod is admitted: a malformed one denies the pod with a
//! message that names the annotation, rather than creating a pod whose sidecar would fail
//! later, far from the typo.

use std::collections::BTreeMap;

use ferry_api::consts::sidecar_annotations as annotation;
use ferry_api::quantity::parse_bytes;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// What a pod's annotations change in the injected sidecar.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overrides {
    /// Resource requests by name (`cpu`, `memory`).
    pub requests: BTreeMap<String, Quantity>,
    /// Resource limits by name.
    pub limits: BTreeMap<String, Quantity>,
    /// `FERRY_LOG` of the sidecar.
    pub log: Option<String>,
    /// A volume of the pod to hold the sidecar's data instead of the default `emptyDir`.
    pub data_volume: Option<String>,
    /// `sizeLimit` of the default `emptyDir`.
    pub data_size_limit: Option<Quantity>,
}

/// Reads and checks the overrides of `pod`; the error names the annotation at fault.
pub fn overrides(pod: &Pod) -> Result<Overrides, String> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |name: &str| annotations.get(name).map(|v| v.trim().to_owned());
    let mut out = Overrides::default();
    for (name, limit, resource) in [
        (annotation::CPU_REQUEST, false, "cpu"),
        (annotation::MEMORY_REQUEST, false, "memory"),
        (annotation::CPU_LIMIT, true, "cpu"),
        (annotation::MEMORY_LIMIT, true, "memory"),
    ] {
        let Some(value) = get(name) else { continue };
        let valid = if resource == "cpu" {
            cpu_quantity(&value)
        } else {
            parse_bytes(&value).map(|_| ()).map_err(|e| e.to_string())
        };
        valid.map_err(|error| format!("annotation {name}: {error}"))?;
        let target = if limit {
            &mut out.limits
        } else {
            &mut out.requests
        };
        target.insert(resource.to_owned(), Quantity(value));
    }
    if let Some(log) = get(annotation::LOG) {
        tracing_subscriber::EnvFilter::try_new(&log)
            .map_err(|error| format!("annotation {}: {error}", annotation::LOG))?;
        out.log = Some(log);
    }
    if let Some(volume) = get(annotation::DATA_VOLUME) {
        let exists = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.name == volume));
        if !exists {
            return Err(format!(
                "annotation {}: the pod has no volume named {volume:?}",
                annotation::DATA_VOLUME
            ));
        }
        out.data_volume = Some(volume);
    }
    if let Some(limit) = get(annotation::DATA_SIZE_LIMIT) {
        parse_bytes(&limit)
            .map_err(|error| format!("annotation {}: {error}", annotation::DATA_SIZE_LIMIT))?;
        out.data_size_limit = Some(Quantity(limit));
    }
    Ok(out)
}

/// Checks a CPU quantity: a positive number of cores, or of millicores with an `m`.
fn cpu_quantity(value: &str) -> Result<(), String> {
    let number = value.strip_suffix('m').unwrap_or(value);
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && !number.starts_with('+') => Ok(()),
        _ => Err(format!(
            "invalid CPU quantity {value:?} (expected e.g. 100m or 0.5)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{"name": "app"}], "volumes": [{"name": "pvc", "emptyDir": {}}]}
        }))
        .unwrap()
    }

    #[test]
    fn valid_annotations_become_overrides() {
        let o = overrides(&pod(json!({
            "ferry.dev/sidecar-cpu-request": "50m",
            "ferry.dev/sidecar-memory-limit": "512Mi",
            "ferry.dev/sidecar-log": "info,ferry_sidecar=debug",
            "ferry.dev/data-volume": "pvc",
            "ferry.dev/data-size-limit": "2Gi",
        })))
        .unwrap();
        assert_eq!(o.requests["cpu"], Quantity("50m".into()));
        assert_eq!(o.limits["memory"], Quantity("512Mi".into()));
        assert_eq!(o.log.as_deref(), Some("info,ferry_sidecar=debug"));
        assert_eq!(o.data_volume.as_deref(), Some("pvc"));
        assert_eq!(o.data_size_limit, Some(Quantity("2Gi".into())));
        assert_eq!(overrides(&pod(json!({}))).unwrap(), Overrides::default());
    }

    #[test]
    fn a_bad_value_names_its_annotation() {
        for (name, value) in [
            ("ferry.dev/sidecar-cpu-request", "lots"),
            ("ferry.dev/sidecar-cpu-limit", "-1"),
            ("ferry.dev/sidecar-memory-request", "12 parsecs"),
            ("ferry.dev/sidecar-log", "info,[[["),
            ("ferry.dev/data-volume", "missing"),
            ("ferry.dev/data-size-limit", "1Zi"),
        ] {
            let error = overrides(&pod(json!({ name: value }))).unwrap_err();
            assert!(error.starts_with(&format!("annotation {name}:")), "{error}");
        }
    }
}
