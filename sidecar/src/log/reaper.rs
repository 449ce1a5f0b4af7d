//! Deleting settled segment files off the store thread.
//!
//! Unlinking a 64 MiB segment costs ext4 tens of milliseconds (freeing its extents and
//! dropping its pages); done inline, every compaction that freed a few segments stalled the
//! topic's appends for that long (a p99 of ~100 ms at 10k msg/s after a burst of large
//! messages). The segment leaves the log's index at once, so nothing reads it again; its
//! file goes on a thread of its own. Dropping the reaper waits for the deletions it was
//! given, so a log reopened in the same process finds them done. After a crash in between,
//! recovery finds a segment whose records are all settled and compaction deletes it again.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A thread that deletes the files it is given, in order.
#[derive(Debug)]
pub struct Reaper {
    tx: Option<mpsc::Sender<PathBuf>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts the thread (named after the log's directory, for `top -H`).
    pub fn start(name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name(format!("reap-{name}"))
            .spawn(move || {
                for path in rx {
                    if let Err(e) = shrink_then_remove(&path) {
                        // The log no longer uses it; a file left behind is deleted again
                        // after the next restart's recovery.
                        tracing::warn!(path = %path.display(), error = %e, "deleting a settled segment failed");
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Deletes `path` soon. Falls back to deleting it here if the thread is gone.
    pub fn delete(&self, path: PathBuf) {
        let unsent = match &self.tx {
            Some(tx) => tx.send(path).err().map(|e| e.0),
            None => Some(path),
        };
        if let Some(path) = unsent {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bytes freed per step when shrinking a file before its unlink.
const STEP_BYTES: u64 = 4 << 20;
/// Pause between steps.
const STEP_PAUSE: Duration = Duration::from_millis(2);

/// Truncates `path` a few MiB at a time, then unlinks it: ext4 frees a file's extents in
/// the journal transaction that every fsync must also commit, so freeing 64 MiB at once
/// made the fsyncs of live topics wait behind it; small steps interleave with them.
fn shrink_then_remove(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > STEP_BYTES {
        len -= STEP_BYTES;
        file.set_len(len)?;
        std::thread::sleep(STEP_PAUSE);
    }
    drop(file);
    std::fs::remove_file(path)
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_gone_once_the_reaper_is_dropped() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let paths: Vec<PathBuf> = (0..5)
            .map(|i| dir.path().join(format!("{i}.seg")))
            .collect();
        for p in &paths {
            std::fs::write(p, b"settled")?;
        }
        let reaper = Reaper::start("test")?;
        for p in &paths {
            reaper.delete(p.clone());
        }
        drop(reaper);
        assert!(paths.iter().all(|p| !p.exists()));
        Ok(())
    }
}
