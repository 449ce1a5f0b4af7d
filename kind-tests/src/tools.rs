//! Paths of the pinned tools that `control-plane.sh install` builds besides the control
//! plane itself: helm (chart tests) and grpcurl (the sidecar's reflection test).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

use crate::ControlPlane;

/// The pinned `helm` (see `kind-tests/tools/helm/go.mod`), built and cached on first use
/// by `control-plane.sh install`.
pub async fn helm() -> Result<PathBuf> {
    installed("helm").await
}

/// The pinned `grpcurl` (see `kind-tests/tools/grpcurl/go.mod`), built and cached on first
/// use by `control-plane.sh install`.
pub async fn grpcurl() -> Result<PathBuf> {
    installed("grpcurl").await
}

/// The path of `name` from the `NAME VERSION PATH` line that `install` prints.
async fn installed(name: &str) -> Result<PathBuf> {
    let report = ControlPlane::install().await?;
    let path = report
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name))
                .then(|| fields.nth(1))
                .flatten()
        })
        .map(PathBuf::from)
        .with_context(|| format!("control-plane.sh install printed no {name} line:\n{report}"))?;
    ensure!(path.is_file(), "{} does not exist", path.display());
    Ok(path)
}
