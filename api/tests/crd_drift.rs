//! The checked-in CRD YAML (`crds/`, the Helm chart's copy and the kustomization's copy in
//! `deploy/`) must be exactly what the Rust types generate; regenerate with `cargo run -p ferry-api --bin crdgen`.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for dir in ["crds", "charts/ferry/crds", "deploy"] {
        for (file, yaml) in ferry_api::manifest::crd_files() {
            let path = root.join(dir).join(&file);
            match std::fs::read_to_string(&path) {
                Ok(existing) if existing == yaml => {}
                Ok(_) => stale.push(format!("{dir}/{file} differs")),
                Err(e) => stale.push(format!("{dir}/{file}: {e}")),
            }
        }
    }
    assert!(
        stale.is_empty(),
        "CRDs drifted from the code ({}); run `cargo run -p ferry-api --bin crdgen`",
        stale.join(", ")
    );
}

#[test]
fn every_schema_property_has_a_description() {
    // `kubectl explain` shows these; an undocumented field is a bug.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let root_meta = !path.contains('.')
                    && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                if !root_meta && sub.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(path, items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in ferry_api::crd::all_crds() {
        let value = serde_json::to_value(&crd).expect("CRD serializes");
        let kind = value["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let schema = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&kind, schema, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:?}"
    );
}
