//! Every example under `examples/` is valid: each document passes the checked-in CRD's
//! OpenAPI schema (types, required fields, enums, patterns, ranges, unknown fields), and the
//! folder builds a routing table with no problems, as `ferryctl dev` would.
//!
//! CEL rules are not evaluated here; the ones that matter locally are re-checked by the
//! routing-entry constructors `build_table` calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_api::local::{build_table, load_pods};
use ferry_api::manifest::Manifests;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The openAPIV3Schema of each CRD in `crds/`, by kind.
fn schemas() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crds")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let crd: Value = serde_saphyr::from_str(&text).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
        out.insert(
            kind,
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
        );
    }
    out
}

/// Checks `value` against the subset of OpenAPI v3 the CRDs use; returns the errors.
fn validate(path: &str, schema: &Value, value: &Value, errors: &mut Vec<String>) {
    let mut err = |m: String| errors.push(format!("{path}: {m}"));
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    let ty = schema["type"].as_str().unwrap_or_default();
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    let null_allowed = value.is_null() && schema["nullable"] == Value::Bool(true);
    if !(ok || null_allowed) {
        err(format!("expected {ty}, got {value}"));
        return;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        err(format!("{value} is not one of {options:?}"));
    }
    if let (Some(pattern), Some(s)) = (schema["pattern"].as_str(), value.as_str())
        && !regex::Regex::new(pattern).unwrap().is_match(s)
    {
        err(format!("{s:?} does not match {pattern}"));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|min| n < min) {
            err(format!("{n} < minimum {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|max| n > max) {
            err(format!("{n} > maximum {}", schema["maximum"]));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| len < m)
            || schema["maxLength"].as_u64().is_some_and(|m| len > m)
        {
            err(format!("{s:?} has a length out of range"));
        }
    }
    if let Some(object) = value.as_object() {
        for req in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(req.as_str().unwrap_or_default()) {
                err(format!("missing required field {req}"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, v) in object {
            let sub = format!("{path}.{k}");
            match (
                props.and_then(|p| p.get(k)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => validate(&sub, s, v, errors),
                (None, Some(extra)) if extra.is_object() => validate(&sub, extra, v, errors),
                (None, _) if props.is_some() => errors.push(format!("{sub}: unknown field")),
                _ => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            validate(&format!("{path}[{i}]"), items, v, errors);
        }
    }
}

fn example_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_example_matches_the_crd_schemas() {
    let schemas = schemas();
    let mut errors = Vec::new();
    let mut checked = 0;
    for dir in example_dirs() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".yaml") || name == ferry_api::local::PODS_FILE {
                continue;
            }
            let docs: Vec<Value> =
                serde_saphyr::from_multiple(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for doc in docs.into_iter().filter(|d| !d.is_null()) {
                let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                let Some(schema) = schemas.get(&kind) else {
                    errors.push(format!("{}: unknown kind {kind:?}", path.display()));
                    continue;
                };
                let mut spec_only = doc.clone();
                // metadata, apiVersion and kind are the API server's, not in the CRD schema.
                for field in ["metadata", "apiVersion", "kind"] {
                    spec_only.as_object_mut().unwrap().remove(field);
                }
                if doc["apiVersion"] != "ferry.dev/v1alpha1" {
                    errors.push(format!(
                        "{}: apiVersion {}",
                        path.display(),
                        doc["apiVersion"]
                    ));
                }
                validate(
                    &format!("{} {kind}", path.display()),
                    schema,
                    &spec_only,
                    &mut errors,
                );
                checked += 1;
            }
        }
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(checked >= 20, "only {checked} documents checked");
}

#[test]
fn every_example_builds_a_table_without_problems() {
    let dirs = example_dirs();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in [
        "quickstart",
        "work-queue",
        "fan-out",
        "broadcast",
        "ordered",
        "dead-letter",
        "zones",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "examples/{required} is missing"
        );
    }
    for dir in dirs {
        assert!(
            dir.join("README.md").is_file(),
            "{} has no README.md",
            dir.display()
        );
        let manifests = Manifests::read_dir(&dir).unwrap();
        let (pods, _) = load_pods(&dir, &manifests).unwrap();
        let (table, problems) = build_table(&manifests, &pods, |p| format!("{}:7710", p.name), 1);
        assert!(problems.is_empty(), "{}: {problems:#?}", dir.display());
        assert!(
            !table.subscriptions.is_empty(),
            "{}: no subscription",
            dir.display()
        );
        for group in table.groups.keys() {
            assert!(
                table.members.contains_key(group),
                "{}: group {group} has no member",
                dir.display()
            );
        }
    }
}

#[test]
fn the_validator_catches_mistakes() {
    let schemas = schemas();
    let bad: Value = serde_saphyr::from_str(
        "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nspec: {durability: Sometimes, replicas: 9, dedupWindow: forever, colour: red}\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    validate("bad", &schemas["Topic"], &bad, &mut errors);
    let text = errors.join("\n");
    for needle in [
        "durability",
        "replicas",
        "dedupWindow",
        "colour: unknown field",
    ] {
        assert!(text.contains(needle), "{needle} not reported in:\n{text}");
    }
}
