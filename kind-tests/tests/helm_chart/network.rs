//! The chart's NetworkPolicy on etcd: only the operator's pods (and the members) reach it.

use anyhow::{Result, ensure};
use serde_json::Value;

use crate::rendered::{kind_of, one};

fn component(selector: &Value) -> Option<&str> {
    selector["matchLabels"]["app.kubernetes.io/component"].as_str()
}

/// Checks the etcd NetworkPolicy of a chart rendered with its own etcd and the identity
/// service on (the defaults).
pub fn check_etcd_policy(objects: &[Value], client_port: u64) -> Result<()> {
    let policy = one(objects, "NetworkPolicy")?;
    let spec = &policy["spec"];
    ensure!(
        component(&spec["podSelector"]) == Some("etcd"),
        "the NetworkPolicy does not select the etcd pods"
    );
    ensure!(spec["policyTypes"] == serde_json::json!(["Ingress"]));
    let mut client_from = Vec::new();
    for rule in spec["ingress"].as_array().into_iter().flatten() {
        let ports: Vec<u64> = rule["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        if !ports.contains(&client_port) {
            continue;
        }
        let from = rule["from"].as_array();
        ensure!(
            from.is_some_and(|f| !f.is_empty()),
            "a rule admits every pod to etcd's client port"
        );
        for peer in from.into_iter().flatten() {
            ensure!(
                peer["namespaceSelector"].is_null() && peer["ipBlock"].is_null(),
                "a rule admits pods of other namespaces or addresses: {peer}"
            );
            client_from.push(component(&peer["podSelector"]).unwrap_or("any").to_owned());
        }
    }
    client_from.sort();
    ensure!(
        client_from == ["etcd", "operator"],
        "etcd's client port admits {client_from:?}, not only the operator and the members"
    );
    Ok(())
}

/// With an external etcd or the identity service off, no policy is rendered (sidecars then
/// dial etcd themselves).
pub fn check_no_policy(objects: &[Value]) -> Result<()> {
    ensure!(
        !objects.iter().any(|o| kind_of(o) == "NetworkPolicy"),
        "a NetworkPolicy on etcd is rendered although sidecars need etcd"
    );
    Ok(())
}
