//! Finding the `ferry-sidecar` binary that `dev` and `bench` start.
//!
//! Cargo puts every binary of the workspace in one folder, so the sidecar sits next to
//! `ferryctl` (and one level up from a test executable, which lives in `deps/`). The
//! `FERRY_SIDECAR_BIN` variable overrides that for installs that put them apart.

use std::path::{Path, PathBuf};

/// Environment variable naming the sidecar binary explicitly.
pub const SIDECAR_BIN_ENV: &str = "FERRY_SIDECAR_BIN";
/// File name of the sidecar binary.
pub const SIDECAR_BIN_NAME: &str = "ferry-sidecar";

/// Why the sidecar binary was not found.
#[derive(Debug, thiserror::Error)]
pub enum SidecarBinError {
    #[error("{SIDECAR_BIN_ENV}={0} does not exist")]
    EnvMissing(PathBuf),
    #[error(
        "no {SIDECAR_BIN_NAME} binary next to {exe} (looked in {looked}); build it with \
         `cargo build -p ferry-sidecar` or set {SIDECAR_BIN_ENV}"
    )]
    NotFound { exe: PathBuf, looked: String },
    #[error("cannot tell where this program lives: {0}")]
    CurrentExe(#[source] std::io::Error),
}

/// The sidecar binary: `$FERRY_SIDECAR_BIN`, else next to the running executable or its
/// parent folder.
pub fn locate() -> Result<PathBuf, SidecarBinError> {
    if let Some(path) = std::env::var_os(SIDECAR_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(SidecarBinError::EnvMissing(path))
        };
    }
    let exe = std::env::current_exe().map_err(SidecarBinError::CurrentExe)?;
    locate_near(&exe)
}

/// The sidecar binary in the folder of `exe` or in its parent (for `target/debug/deps/`).
pub fn locate_near(exe: &Path) -> Result<PathBuf, SidecarBinError> {
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(SIDECAR_BIN_NAME))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| SidecarBinError::NotFound {
            exe: exe.to_owned(),
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_next_to_or_above_the_executable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let deps = dir.path().join("deps");
        std::fs::create_dir_all(&deps).expect("mkdir");
        let exe = deps.join("some-test");
        assert!(matches!(
            locate_near(&exe),
            Err(SidecarBinError::NotFound { .. })
        ));
        std::fs::write(dir.path().join(SIDECAR_BIN_NAME), b"").expect("write");
        assert_eq!(
            locate_near(&exe).expect("found"),
            dir.path().join(SIDECAR_BIN_NAME)
        );
        std::fs::write(deps.join(SIDECAR_BIN_NAME), b"").expect("write");
        assert_eq!(
            locate_near(&exe).expect("found"),
            deps.join(SIDECAR_BIN_NAME)
        );
    }
}
