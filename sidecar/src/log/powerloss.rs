//! A simulated disk that loses un-fsynced writes (docs/reliability.md row 4), behind the cargo
//! feature `powerloss`; without it every function here is an empty inline stub.
//!
//! `kill -9` keeps everything a process wrote (it sits in the page cache); a power loss
//! keeps only what was fsynced. To test the difference on one machine without a special
//! filesystem, every successful fsync of a log file records the file's length at that
//! moment in a manifest beside it (`.powerloss-synced`, replaced atomically); renames move
//! the entry along. Starting the sidecar with `FERRY_SIMULATE_POWER_LOSS=1` first cuts every
//! file under `topics/` and `consumer/` of the data dir back to its last fsynced length
//! (to nothing if it was never fsynced) before any recovery runs, and logs what it dropped.
//! That drops exactly the bytes that were written but not fsynced: the log files are only
//! ever appended to or replaced whole by a rename, so their fsynced content is a prefix.

use std::path::Path;

/// The environment variable that asks for a simulated power loss at startup.
pub const SIMULATE_ENV: &str = "FERRY_SIMULATE_POWER_LOSS";

/// What a simulated power loss dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub files: u64,
    pub bytes: u64,
}

#[cfg(feature = "powerloss")]
mod enabled {
    use std::collections::{BTreeMap, HashMap};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::Dropped;

    /// The manifest's name in each directory.
    pub const MANIFEST: &str = ".powerloss-synced";

    /// Manifests loaded so far, by directory.
    static MANIFESTS: Mutex<Option<HashMap<PathBuf, BTreeMap<String, u64>>>> = Mutex::new(None);

    fn read_manifest(dir: &Path) -> BTreeMap<String, u64> {
        let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else {
            return BTreeMap::new();
        };
        text.lines()
            .filter_map(|l| {
                let (len, name) = l.split_once(' ')?;
                Some((name.to_owned(), len.parse().ok()?))
            })
            .collect()
    }

    fn write_manifest(dir: &Path, m: &BTreeMap<String, u64>) {
        let text: String = m.iter().map(|(n, l)| format!("{l} {n}\n")).collect();
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let ok =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(MANIFEST)));
        if let Err(e) = ok {
            tracing::error!(dir = %dir.display(), error = %e, "power-loss manifest not written");
        }
    }

    fn update(path: &Path, f: impl FnOnce(&mut BTreeMap<String, u64>, &str)) {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            return;
        };
        let mut all = MANIFESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all = all.get_or_insert_with(HashMap::new);
        let m = all
            .entry(dir.to_path_buf())
            .or_insert_with(|| read_manifest(dir));
        f(m, name);
        write_manifest(dir, m);
    }

    pub fn synced(path: &Path) {
        let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
            return;
        };
        update(path, |m, name| {
            m.insert(name.to_owned(), len);
        });
    }

    pub fn renamed(from: &Path, to: &Path) {
        let Some(to_name) = to.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            return;
        };
        update(from, |m, name| {
            let len = m.remove(name).unwrap_or(0);
            m.insert(to_name, len);
        });
    }

    fn walk(dir: &Path, out: &mut Dropped) -> std::io::Result<()> {
        let manifest = read_manifest(dir);
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&path, out)?;
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if !kind.is_file() || name.starts_with(MANIFEST) {
                continue;
            }
            let len = entry.metadata()?.len();
            let synced = manifest.get(&name).copied().unwrap_or(0);
            if len > synced {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(synced)?;
                tracing::warn!(
                    file = %path.display(),
                    dropped_bytes = len - synced,
                    kept_bytes = synced,
                    "simulated power loss: dropped {} un-fsynced bytes of {}",
                    len - synced,
                    path.display()
                );
                out.files += 1;
                out.bytes += len - synced;
            }
        }
        Ok(())
    }

    pub fn simulate(data_dir: &Path) -> std::io::Result<Dropped> {
        let mut out = Dropped::default();
        for sub in ["topics", "consumer"] {
            let dir = data_dir.join(sub);
            if dir.is_dir() {
                walk(&dir, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// Records that `path` was just fsynced whole (its current length is durable).
#[cfg(feature = "powerloss")]
pub fn synced(path: &Path) {
    enabled::synced(path);
}

/// Records that `from` was renamed to `to` in the same directory.
#[cfg(feature = "powerloss")]
pub fn renamed(from: &Path, to: &Path) {
    enabled::renamed(from, to);
}

/// Cuts every log file under `data_dir` back to its last fsynced length; see the module
/// documentation.
#[cfg(feature = "powerloss")]
pub fn simulate(data_dir: &Path) -> std::io::Result<Dropped> {
    let dropped = enabled::simulate(data_dir)?;
    tracing::warn!(
        files = dropped.files,
        bytes = dropped.bytes,
        "simulated power loss: dropped {} un-fsynced bytes in {} files",
        dropped.bytes,
        dropped.files
    );
    Ok(dropped)
}

/// Without the `powerloss` feature nothing is recorded.
#[cfg(not(feature = "powerloss"))]
#[inline(always)]
pub fn synced(_path: &Path) {}

/// Without the `powerloss` feature nothing is recorded.
#[cfg(not(feature = "powerloss"))]
#[inline(always)]
pub fn renamed(_from: &Path, _to: &Path) {}

#[cfg(all(test, feature = "powerloss"))]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn drops_exactly_what_was_not_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let topic = dir.path().join("topics").join("ns").join("t");
        std::fs::create_dir_all(&topic).unwrap();
        let seg = topic.join("00000000000000000000.log");
        let mut f = std::fs::File::create(&seg).unwrap();
        f.write_all(b"durable!").unwrap();
        f.sync_data().unwrap();
        synced(&seg);
        f.write_all(b"volatile").unwrap();
        let never = topic.join("never-synced");
        std::fs::write(&never, b"gone").unwrap();
        let tmp = topic.join("snap.tmp");
        std::fs::write(&tmp, b"snapshot").unwrap();
        synced(&tmp);
        let snap = topic.join("snap");
        std::fs::rename(&tmp, &snap).unwrap();
        renamed(&tmp, &snap);

        let dropped = simulate(dir.path()).unwrap();
        assert_eq!(
            dropped,
            Dropped {
                files: 2,
                bytes: 12
            }
        );
        assert_eq!(std::fs::read(&seg).unwrap(), b"durable!");
        assert_eq!(std::fs::read(&never).unwrap(), b"");
        assert_eq!(std::fs::read(&snap).unwrap(), b"snapshot");
    }
}
