//! Small I/O helpers: errors with context, directory fsync, and failpoints.
//!
//! Failpoints (cargo feature `failpoints`, docs/reliability.md row 10) sit on `log::write`,
//! `log::fsync` and `log::rename`. The failpoint's argument, if any, is matched against the
//! file's path, so a test can break only its own temporary directory while other tests run
//! in parallel: `fail::cfg("log::fsync", "return(/tmp/.tmpAbC)")`. Without an argument
//! every file fails. `sleep(ms)`/`delay(ms)` actions simulate a slow disk. Successful fsyncs
//! are reported to the simulated power-loss disk (`powerloss.rs`, feature `powerloss`).

use std::fs::File;
use std::path::Path;

use super::LogError;

/// Builds a `LogError::Io` naming the operation and the file.
pub fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { op, path, source }
}

/// Returns an injected error if the failpoint `name` is configured for `path`.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str, path: &Path) -> std::io::Result<()> {
    fail::fail_point!(name, |arg: Option<String>| {
        match arg {
            Some(filter) if !path.to_string_lossy().contains(filter.as_str()) => Ok(()),
            _ => Err(std::io::Error::other(format!(
                "failpoint {name} injected an error"
            ))),
        }
    });
    Ok(())
}

/// Failpoints are compiled out without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str, _path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// `fdatasync`, behind the `log::fsync` failpoint; recorded by the simulated disk
/// (`powerloss.rs`) when that feature is on.
pub fn sync_data(file: &File, path: &Path) -> Result<(), LogError> {
    failpoint("log::fsync", path)
        .and_then(|()| file.sync_data())
        .map_err(io_err("fsync", path))?;
    super::powerloss::synced(path);
    Ok(())
}

/// Makes file creations, renames and deletions in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    failpoint("log::fsync", dir)
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Writes `buf` into a new file at `tmp` (replacing any) and fsyncs it, for a file that is
/// then renamed over the one it replaces. `ops` name the create, write and fsync steps in
/// errors. A failed fsync here is not a failed fsync of the log (the temporary file is
/// discarded and the old one stays in use), so it has its own operation name and poisons
/// nothing.
pub fn write_synced_temp(tmp: &Path, buf: &[u8], ops: [&'static str; 3]) -> Result<File, LogError> {
    use std::io::Write;
    let [create, write, fsync] = ops;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err(create, tmp))?;
    failpoint("log::write", tmp)
        .and_then(|()| file.write_all(buf))
        .map_err(io_err(write, tmp))?;
    failpoint("log::fsync", tmp)
        .and_then(|()| file.sync_data())
        .map_err(io_err(fsync, tmp))?;
    super::powerloss::synced(tmp);
    Ok(file)
}
