//! Installing the repository's CustomResourceDefinitions into a cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::wait::wait_for_value;

/// The repository's generated CRD manifests (`crds/*.yaml`).
pub const CRDS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");

/// Field manager for the server-side apply of CRDs.
const FIELD_MANAGER: &str = "ferry-kind-tests";

/// Reads every CustomResourceDefinition from `dir/*.yaml` (and `*.yml`), files in name
/// order, documents in file order. Empty documents are skipped; any other kind of object
/// is an error, and so is a folder without a single CRD.
pub fn read_crds(dir: impl AsRef<Path>) -> Result<Vec<CustomResourceDefinition>> {
    let dir = dir.as_ref();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the CRD folder {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    files.retain(|path| {
        path.is_file()
            && matches!(
                path.extension().and_then(|ext| ext.to_str()),
                Some("yaml" | "yml")
            )
    });
    files.sort();

    let mut crds = Vec::new();
    for file in &files {
        crds.extend(read_crd_file(file)?);
    }
    if crds.is_empty() {
        bail!("no CustomResourceDefinition in {}/*.yaml", dir.display());
    }
    Ok(crds)
}

fn read_crd_file(file: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing the YAML in {}", file.display()))?;
    let mut crds = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        let kind = document.get("kind").and_then(|kind| kind.as_str());
        if kind != Some("CustomResourceDefinition") {
            bail!(
                "{} document {}: expected kind CustomResourceDefinition, found {:?}",
                file.display(),
                index + 1,
                kind
            );
        }
        let crd: CustomResourceDefinition =
            serde_json::from_value(document).with_context(|| {
                format!(
                    "{} document {}: not a valid CustomResourceDefinition",
                    file.display(),
                    index + 1
                )
            })?;
        crds.push(crd);
    }
    Ok(crds)
}

/// Server-side applies every CRD in `dir/*.yaml` and waits until each one is
/// `Established` (its API is served), failing after `timeout`. Returns the CRDs as the
/// API server stored them.
pub async fn install_crds(
    client: &Client,
    dir: impl AsRef<Path>,
    timeout: Duration,
) -> Result<Vec<CustomResourceDefinition>> {
    let crds = read_crds(&dir)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in &crds {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .with_context(|| format!("applying CustomResourceDefinition {name}"))?;
    }
    let mut installed = Vec::with_capacity(crds.len());
    for crd in &crds {
        let name = crd.name_any();
        let stored = wait_for_value(timeout, || established(&api, &name))
            .await
            .with_context(|| format!("CustomResourceDefinition {name} becomes Established"))?;
        installed.push(stored);
    }
    Ok(installed)
}

/// The CRD when its `Established` condition is `True`. A `NamesAccepted=False` condition
/// (a name clash) is reported as an error so that the wait says why it never succeeds.
async fn established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<Option<CustomResourceDefinition>> {
    let crd = api
        .get(name)
        .await
        .with_context(|| format!("reading CustomResourceDefinition {name}"))?;
    let conditions = crd
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_deref())
        .unwrap_or_default();
    if let Some(condition) = conditions
        .iter()
        .find(|c| c.type_ == "NamesAccepted" && c.status == "False")
    {
        bail!(
            "NamesAccepted is False: {}: {}",
            condition.reason.as_deref().unwrap_or_default(),
            condition.message.as_deref().unwrap_or_default()
        );
    }
    let ready = conditions
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    Ok(ready.then_some(crd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_files_and_rejects_other_kinds() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("a.yaml"),
            "---\n# leading comment\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.dev\nspec:\n  group: example.dev\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n---\n",
        )?;
        std::fs::write(dir.path().join("notes.txt"), "not yaml")?;
        let crds = read_crds(dir.path())?;
        assert_eq!(crds.len(), 1);
        assert_eq!(crds[0].name_any(), "widgets.example.dev");
        assert_eq!(crds[0].spec.versions[0].name, "v1");

        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )?;
        let error = read_crds(dir.path()).err().map(|e| format!("{e:#}"));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("expected kind CustomResourceDefinition")),
            "{error:?}"
        );
        Ok(())
    }

    #[test]
    fn an_empty_folder_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(read_crds(dir.path()).is_err());
        Ok(())
    }
}
