//! Paths of the pinned tools that `control-plane.sh install` builds besides the control
//! plane itself (today: helm, for the chart tests).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

use crate::ControlPlane;

/// The pinned `helm` (see `kind-tests/tools/helm/go.mod`), built and cached on first use
/// by `control-plane.sh install`; read from the `helm VERSION PATH` line it prints.
pub async fn helm() -> Result<PathBuf> {
    let report = ControlPlane::install().await?;
    let path = report
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("helm"))
                .then(|| fields.nth(1))
                .flatten()
        })
        .map(PathBuf::from)
        .with_context(|| format!("control-plane.sh install printed no helm line:\n{report}"))?;
    ensure!(path.is_file(), "{} does not exist", path.display());
    Ok(path)
}
