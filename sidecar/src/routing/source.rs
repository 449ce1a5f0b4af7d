//! Where the routing table comes from. A [`RoutingSource`] yields a `watch` receiver of the
//! latest table; the rest of the sidecar only reads that receiver, so an etcd source can be
//! added next to [`FileSource`] (local mode) without touching anything else.
//!
//! Every source keeps one rule: a table with a lower `revision` than one already applied is
//! never applied (no "back in time" routing, docs/reliability.md row 16).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_api::routing::RoutingTable;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// A running source of routing tables.
pub trait RoutingSource: Send + 'static {
    /// Loads the first table and starts following changes until `cancel`. Fails if no
    /// first table can be had (the sidecar must not start with a table it never saw).
    fn start(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> Result<(watch::Receiver<Arc<RoutingTable>>, JoinHandle<()>), Error>;
}

/// Applies `next` to `tx` unless it is older than the current table or identical to it.
/// Returns whether it was applied.
pub fn apply_if_newer(tx: &watch::Sender<Arc<RoutingTable>>, next: RoutingTable) -> bool {
    tx.send_if_modified(|current| {
        if next.revision < current.revision {
            tracing::warn!(
                current = current.revision,
                offered = next.revision,
                "ignoring a routing table older than the one applied"
            );
            return false;
        }
        if **current == next {
            return false;
        }
        *current = Arc::new(next);
        true
    })
}

/// A table handed in by the caller (tests, embedding), updated through [`StaticSource::sender`].
#[derive(Debug)]
pub struct StaticSource {
    tx: watch::Sender<Arc<RoutingTable>>,
}

impl StaticSource {
    /// A source that starts with `table`.
    pub fn new(table: RoutingTable) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(table)),
        }
    }

    /// A handle to publish newer tables (through [`apply_if_newer`]).
    pub fn sender(&self) -> watch::Sender<Arc<RoutingTable>> {
        self.tx.clone()
    }
}

impl RoutingSource for StaticSource {
    fn start(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> Result<(watch::Receiver<Arc<RoutingTable>>, JoinHandle<()>), Error> {
        let rx = self.tx.subscribe();
        let tx = self.tx;
        let task = tokio::spawn(async move {
            cancel.cancelled().await;
            drop(tx);
        });
        Ok((rx, task))
    }
}

/// Local mode: a JSON file holding a `RoutingTable`, polled for changes (mtime and size)
/// every `interval`. A file that does not parse is reported and skipped; the last good
/// table stays in force, as with an unreachable etcd.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
}

impl FileSource {
    /// Polls `path` every 200 ms.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            interval: Duration::from_millis(200),
        }
    }

    fn load(&self) -> Result<(RoutingTable, Stamp), Error> {
        let stamp = stamp(&self.path)?;
        let bytes = std::fs::read(&self.path).map_err(|e| {
            Error::Routing(format!(
                "cannot read routing file {}: {e}",
                self.path.display()
            ))
        })?;
        let table = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Routing(format!(
                "routing file {} is not a JSON RoutingTable: {e}",
                self.path.display()
            ))
        })?;
        Ok((table, stamp))
    }
}

type Stamp = (Option<SystemTime>, u64);

fn stamp(path: &std::path::Path) -> Result<Stamp, Error> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Routing(format!("cannot stat routing file {}: {e}", path.display())))?;
    Ok((meta.modified().ok(), meta.len()))
}

impl RoutingSource for FileSource {
    fn start(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> Result<(watch::Receiver<Arc<RoutingTable>>, JoinHandle<()>), Error> {
        let (table, mut last) = self.load()?;
        let tx = watch::Sender::new(Arc::new(table));
        let rx = tx.subscribe();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match stamp(&self.path) {
                    Ok(s) if s == last => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the last routing table");
                        continue;
                    }
                }
                match self.load() {
                    Ok((table, s)) => {
                        last = s;
                        let revision = table.revision;
                        if apply_if_newer(&tx, table) {
                            tracing::info!(revision, "applied routing table from file");
                        }
                    }
                    // A half-written file parses badly; the next poll sees the whole file.
                    Err(e) => tracing::warn!(error = %e, "keeping the last routing table"),
                }
            }
        });
        Ok((rx, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_back_in_time() {
        let tx = watch::Sender::new(Arc::new(RoutingTable {
            revision: 5,
            ..Default::default()
        }));
        let mut older = RoutingTable {
            revision: 4,
            ..Default::default()
        };
        older
            .topics
            .insert("a/b".into(), crate::routing::tests::topic("a", "b"));
        assert!(!apply_if_newer(&tx, older));
        assert_eq!(tx.borrow().revision, 5);
        let newer = RoutingTable {
            revision: 6,
            ..Default::default()
        };
        assert!(apply_if_newer(&tx, newer));
        assert_eq!(tx.borrow().revision, 6);
    }

    #[tokio::test]
    async fn file_source_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.json");
        let write = |rev: i64| {
            let t = RoutingTable {
                revision: rev,
                ..Default::default()
            };
            std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
        };
        write(1);
        let cancel = CancellationToken::new();
        let mut source = FileSource::new(path.clone());
        source.interval = Duration::from_millis(20);
        let (mut rx, task) = Box::new(source).start(cancel.clone()).unwrap();
        assert_eq!(rx.borrow().revision, 1);
        std::thread::sleep(Duration::from_millis(20));
        write(7);
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().revision, 7);
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn missing_file_is_a_start_error() {
        let source = FileSource::new("/nonexistent/routing.json".into());
        assert!(source.load().is_err());
    }
}
