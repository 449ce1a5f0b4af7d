//! A container's environment as a kubelet builds it: `value`s with `$(VAR)` references to
//! the variables listed before them, and downward-API `fieldRef`s read from the bound pod.

use k8s_openapi::api::core::v1::{Container, Pod};

use super::{SpecError, only};

/// The container's env, in order (a later duplicate replaces the value in place, as the
/// kubelet's map does).
pub(super) fn resolve(
    pod: &Pod,
    container: &Container,
    at: &str,
) -> Result<Vec<(String, String)>, SpecError> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(SpecError::unsupported(
            format!("{at}.envFrom"),
            "ConfigMaps and Secrets as env are not read",
        ));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let field = format!("{at}.env[{}]", var.name);
        let json = serde_json::to_value(var).unwrap_or_default();
        only(&json, &field, &["name", "value", "valueFrom"])?;
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                let from_at = format!("{field}.valueFrom");
                only(
                    &serde_json::to_value(from).unwrap_or_default(),
                    &from_at,
                    &["fieldRef"],
                )?;
                let selector = from.field_ref.as_ref().ok_or_else(|| SpecError::Missing {
                    field: format!("{from_at}.fieldRef"),
                })?;
                let ref_at = format!("{from_at}.fieldRef");
                if let Some(version) = &selector.api_version
                    && version != "v1"
                {
                    return Err(SpecError::invalid(
                        format!("{ref_at}.apiVersion"),
                        format!("{version:?}: pods are v1"),
                    ));
                }
                field_ref(pod, &selector.field_path, &ref_at)?
            }
            (Some(value), None) => {
                let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                expand(value, &lookup)
            }
            (None, None) => String::new(),
        };
        match env.iter_mut().find(|(k, _)| *k == var.name) {
            Some(slot) => slot.1 = value,
            None => env.push((var.name.clone(), value)),
        }
    }
    Ok(env)
}

/// The value of a downward-API `fieldPath` of `pod`, as the kubelet gives it to env.
///
/// A field the kubelet always has when it starts a container (the pod's name, uid, node,
/// service account, IP) that is empty is an error: the pod was not bound or given its IP
/// first. A missing label or annotation is an empty string, as in Kubernetes.
pub fn field_ref(pod: &Pod, path: &str, at: &str) -> Result<String, SpecError> {
    let at = format!("{at}({path})");
    let required = |value: Option<&String>| {
        value
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| SpecError::Missing { field: at.clone() })
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ips = |list: Option<Vec<String>>, single: Option<&String>| {
        let list = list.filter(|l| !l.is_empty());
        required(list.map(|l| l.join(",")).as_ref().or(single))
    };
    if let Some(key) = bracketed(path, "metadata.labels") {
        return Ok(pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .cloned()
            .unwrap_or_default());
    }
    if let Some(key) = bracketed(path, "metadata.annotations") {
        return Ok(pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
            .unwrap_or_default());
    }
    match path {
        "metadata.name" => required(pod.metadata.name.as_ref()),
        "metadata.namespace" => required(pod.metadata.namespace.as_ref()),
        "metadata.uid" => required(pod.metadata.uid.as_ref()),
        "spec.nodeName" => required(spec.and_then(|s| s.node_name.as_ref())),
        "spec.serviceAccountName" => required(spec.and_then(|s| s.service_account_name.as_ref())),
        "status.podIP" => required(status.and_then(|s| s.pod_ip.as_ref())),
        "status.hostIP" => required(status.and_then(|s| s.host_ip.as_ref())),
        "status.podIPs" => ips(
            status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|l| l.iter().map(|i| i.ip.clone()).collect()),
            status.and_then(|s| s.pod_ip.as_ref()),
        ),
        "status.hostIPs" => ips(
            status
                .and_then(|s| s.host_ips.as_ref())
                .map(|l| l.iter().map(|i| i.ip.clone()).collect()),
            status.and_then(|s| s.host_ip.as_ref()),
        ),
        other => Err(SpecError::unsupported(
            at.clone(),
            format!("{other:?} is not a field the downward API gives to env"),
        )),
    }
}

/// `KEY` of `prefix['KEY']`.
fn bracketed<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)?
        .strip_prefix("['")?
        .strip_suffix("']")
}

/// Kubernetes' `$(VAR)` expansion of env values, commands and args: a defined `VAR` is
/// replaced by its value, an undefined one is kept as written, `$$` is a literal `$`.
pub fn expand<'a>(text: &str, lookup: &impl Fn(&str) -> Option<&'a String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}
