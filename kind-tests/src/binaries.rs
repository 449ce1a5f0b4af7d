//! The Ferry binaries the end-to-end suite runs as processes: `ferry-operator`,
//! `ferry-sidecar` and the suite's own `ferry-e2e-app`, built once per test process with
//! the test's profile (so the suite always runs the current code) and found where Cargo
//! puts them, one folder up from the test executable in `deps/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

/// Paths of the three binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub operator: PathBuf,
    pub sidecar: PathBuf,
    pub app: PathBuf,
}

/// Builds (once per process) and returns the binaries.
pub fn binaries() -> Result<Binaries> {
    static BUILT: OnceLock<std::result::Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build() -> Result<Binaries> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .ancestors()
        .nth(2)
        .context("the test executable is not in <target>/<profile>/deps")?
        .to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(cargo);
    command.current_dir(&workspace).args([
        "build",
        "--quiet",
        "-p",
        "ferry-operator",
        "-p",
        "ferry-sidecar",
        "-p",
        "ferry-kind-tests",
        "--bin",
        "ferry-operator",
        "--bin",
        "ferry-sidecar",
        "--bin",
        "ferry-e2e-app",
    ]);
    if release {
        command.arg("--release");
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of ferry-operator, ferry-sidecar and ferry-e2e-app failed: {status}");
    }
    let find = |name: &str| {
        let path = profile_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(anyhow!("{} was not built", path.display()))
        }
    };
    Ok(Binaries {
        operator: find("ferry-operator")?,
        sidecar: find("ferry-sidecar")?,
        app: find("ferry-e2e-app")?,
    })
}
