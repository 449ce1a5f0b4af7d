//! The replica side's storage: one `DiskLog` of copies per (producer, topic) under
//! `<data-dir>/replicas/<producer namespace>/<producer pod>/<topic namespace>/<topic>`, with
//! the producer's peer address in `<producer pod>/address` (the takeover probes it after a
//! restart of this sidecar). A copy is "held" until the producer trims its id or this
//! sidecar takes custody of it; either settles it for the log's one subscription
//! ([`CUSTODY_SUB`]), so compaction frees its segment.
//!
//! Each copy carries the producer's incarnation in the header [`INCARNATION_HEADER`], so a
//! restarted producer can ask for what an earlier start of it sent. The methods block
//! (fsync); async callers use `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::log::{DiskLog, DiskLogConfig, Log, Offset, Settlement, StoredMessage};

/// The one subscription of a replica log: the copy is still needed.
const CUSTODY_SUB: &str = "custody";
/// Header of a stored copy: the producer's incarnation that sent it (decimal).
const INCARNATION_HEADER: &str = "ferry-replica-incarnation";

/// The copies of one producer's topic.
#[derive(Debug)]
struct Copies {
    log: DiskLog,
    /// Offsets of held copies, by message id.
    by_id: HashMap<String, Vec<Offset>>,
    address: String,
}

/// Replica logs by (producer, topic).
type Logs = HashMap<(String, String), Arc<Mutex<Copies>>>;

/// One page of held copies: the copies with their replica offsets, where to continue, and
/// whether there is more.
#[derive(Debug, Default)]
pub struct HeldPage {
    pub copies: Vec<(Offset, StoredMessage)>,
    pub next: Offset,
    pub more: bool,
}

/// What [`ReplicaLogs::producers`] lists.
#[derive(Debug, Clone)]
pub struct HeldSummary {
    pub producer: String,
    pub topic: String,
    pub address: String,
    pub copies: usize,
}

/// Every replica log of this sidecar.
#[derive(Debug)]
pub struct ReplicaLogs {
    root: PathBuf,
    logs: Mutex<Logs>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Internal("replica state poisoned by an earlier panic".into()))
}

fn split(reference: &str) -> Result<(&str, &str), Error> {
    reference
        .split_once('/')
        .filter(|(a, b)| {
            [a, b]
                .iter()
                .all(|p| !p.is_empty() && *p != &"." && *p != &".." && !p.contains('/'))
        })
        .ok_or_else(|| Error::InvalidArgument(format!("{reference:?} is not namespace/name")))
}

impl ReplicaLogs {
    /// Replica logs under `root` (opened lazily; [`ReplicaLogs::open_existing`] reopens).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            logs: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, producer: &str, topic: &str) -> Result<PathBuf, Error> {
        let (pns, pod) = split(producer)?;
        let (tns, name) = split(topic)?;
        Ok(self.root.join(pns).join(pod).join(tns).join(name))
    }

    fn get(
        &self,
        producer: &str,
        topic: &str,
        create: bool,
    ) -> Result<Option<Arc<Mutex<Copies>>>, Error> {
        let key = (producer.to_owned(), topic.to_owned());
        if let Some(c) = lock(&self.logs)?.get(&key) {
            return Ok(Some(c.clone()));
        }
        let dir = self.dir(producer, topic)?;
        if !create && !dir.is_dir() {
            return Ok(None);
        }
        let (mut log, _report) =
            DiskLog::open(&dir, DiskLogConfig::default()).map_err(|e| Error::from_log(topic, e))?;
        log.set_subscriptions(&[CUSTODY_SUB.to_owned()])
            .map_err(|e| Error::from_log(topic, e))?;
        let mut by_id: HashMap<String, Vec<Offset>> = HashMap::new();
        for (o, m) in read_all(&log).map_err(|e| Error::from_log(topic, e))? {
            by_id.entry(m.id).or_default().push(o);
        }
        let address = dir
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("address"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let copies = Arc::new(Mutex::new(Copies {
            log,
            by_id,
            address,
        }));
        Ok(Some(lock(&self.logs)?.entry(key).or_insert(copies).clone()))
    }

    /// Reopens every replica log found on disk (after a restart of this sidecar).
    pub fn open_existing(&self) {
        let walk = |p: &Path| -> Vec<String> {
            std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.path().is_dir())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        for pns in walk(&self.root) {
            for pod in walk(&self.root.join(&pns)) {
                for tns in walk(&self.root.join(&pns).join(&pod)) {
                    for name in walk(&self.root.join(&pns).join(&pod).join(&tns)) {
                        let (producer, topic) = (format!("{pns}/{pod}"), format!("{tns}/{name}"));
                        if let Err(e) = self.get(&producer, &topic, false) {
                            tracing::error!(%producer, %topic, error = %e, "cannot reopen replica log");
                        }
                    }
                }
            }
        }
    }

    /// Stores `copies` (fsynced before returning) and drops the copies of `trims`. Returns
    /// how many copies are held afterwards. A request with trims only for a producer and
    /// topic never seen creates nothing.
    pub fn replicate(
        &self,
        producer: &str,
        address: &str,
        topic: &str,
        incarnation: u64,
        copies: Vec<StoredMessage>,
        trims: &[String],
    ) -> Result<u64, Error> {
        let Some(c) = self.get(producer, topic, !copies.is_empty())? else {
            return Ok(0);
        };
        let mut c = lock(&c)?;
        if !address.is_empty() && c.address != address {
            let file = self
                .dir(producer, topic)?
                .parent()
                .and_then(Path::parent)
                .map(|p| p.join("address"));
            if let Some(file) = file {
                std::fs::write(&file, address).map_err(|source| Error::Io {
                    what: format!("writing {}", file.display()),
                    source,
                })?;
            }
            c.address = address.to_owned();
        }
        let mut changed = false;
        for id in trims {
            for o in c.by_id.remove(id).unwrap_or_default() {
                let _ = c.log.settle(CUSTODY_SUB, o, Settlement::Dropped);
                changed = true;
            }
        }
        if !copies.is_empty() {
            let tag = incarnation.to_string();
            let copies: Vec<StoredMessage> = copies
                .into_iter()
                .map(|mut m| {
                    m.headers.retain(|(k, _)| k != INCARNATION_HEADER);
                    m.headers.push((INCARNATION_HEADER.into(), tag.clone()));
                    m
                })
                .collect();
            let range = c
                .log
                .append(&copies)
                .map_err(|e| Error::from_log(topic, e))?;
            for (o, m) in range.zip(&copies) {
                c.by_id.entry(m.id.clone()).or_default().push(o);
            }
            changed = true;
        }
        if changed {
            c.log.sync().map_err(|e| Error::from_log(topic, e))?;
            if let Err(e) = c.log.compact() {
                tracing::debug!(%topic, error = %e, "replica log compaction failed");
            }
        }
        Ok(c.by_id.values().map(Vec::len).sum::<usize>() as u64)
    }

    /// A page of the held copies of `producer`'s `topic` from replica offset `from`, not
    /// sent under `exclude` (header removed), of about `max_bytes` of payload at most; with
    /// the offset to continue from and whether there is more.
    pub fn held(
        &self,
        producer: &str,
        topic: &str,
        exclude: u64,
        from: Offset,
        max_bytes: usize,
    ) -> Result<HeldPage, Error> {
        let Some(c) = self.get(producer, topic, false)? else {
            return Ok(HeldPage {
                next: from,
                ..HeldPage::default()
            });
        };
        let c = lock(&c)?;
        let tag = exclude.to_string();
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut next = from.max(c.log.first());
        while next < c.log.written() {
            if bytes >= max_bytes {
                return Ok(HeldPage {
                    copies: out,
                    next,
                    more: true,
                });
            }
            let batch = c
                .log
                .read(next, 256)
                .map_err(|e| Error::from_log(topic, e))?;
            let Some((last, _)) = batch.last() else {
                break;
            };
            next = last + 1;
            for (o, mut m) in batch {
                let excluded = m
                    .headers
                    .iter()
                    .any(|(k, v)| k == INCARNATION_HEADER && *v == tag);
                if excluded || c.log.is_settled(CUSTODY_SUB, o) {
                    continue;
                }
                m.headers.retain(|(k, _)| k != INCARNATION_HEADER);
                bytes += m.payload.len() + 64;
                out.push((o, m));
            }
        }
        Ok(HeldPage {
            copies: out,
            next,
            more: false,
        })
    }

    /// Drops the copies at `offsets` (after their custody moved here), durably.
    pub fn release(&self, producer: &str, topic: &str, offsets: &[Offset]) -> Result<(), Error> {
        let Some(c) = self.get(producer, topic, false)? else {
            return Ok(());
        };
        let mut c = lock(&c)?;
        let set: std::collections::HashSet<Offset> = offsets.iter().copied().collect();
        c.by_id.retain(|_, os| {
            os.retain(|o| !set.contains(o));
            !os.is_empty()
        });
        for o in offsets {
            let _ = c.log.settle(CUSTODY_SUB, *o, Settlement::Dropped);
        }
        c.log.sync().map_err(|e| Error::from_log(topic, e))
    }

    /// Every (producer, topic) with copies held.
    pub fn producers(&self) -> Vec<HeldSummary> {
        let Ok(logs) = lock(&self.logs) else {
            return Vec::new();
        };
        logs.iter()
            .filter_map(|((producer, topic), c)| {
                let c = c.lock().ok()?;
                let copies = c.by_id.values().map(Vec::len).sum();
                (copies > 0).then(|| HeldSummary {
                    producer: producer.clone(),
                    topic: topic.clone(),
                    address: c.address.clone(),
                    copies,
                })
            })
            .collect()
    }
}

/// Every unsettled record of a replica log.
fn read_all(log: &DiskLog) -> Result<Vec<(Offset, StoredMessage)>, crate::log::LogError> {
    let mut out = Vec::new();
    let mut from = log.first();
    while from < log.written() {
        let batch = log.read(from, 1024)?;
        let Some((last, _)) = batch.last() else {
            break;
        };
        from = last + 1;
        out.extend(
            batch
                .into_iter()
                .filter(|(o, _)| !log.is_settled(CUSTODY_SUB, *o)),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::msg;

    const P: &str = "ns/producer";
    const T: &str = "ns/orders";

    fn ids(page: &HeldPage) -> Vec<String> {
        page.copies.iter().map(|(_, m)| m.id.clone()).collect()
    }

    #[test]
    fn copies_survive_reopen_trims_drop_only_named_ids_and_incarnations_filter() {
        let dir = tempfile::tempdir().unwrap();
        let logs = ReplicaLogs::new(dir.path().join("replicas"));
        // Trims for a producer never seen create nothing.
        assert_eq!(
            logs.replicate(P, "", T, 1, vec![], &["x".into()]).unwrap(),
            0
        );
        assert!(logs.producers().is_empty());

        let held = logs
            .replicate(P, "p:7710", T, 7, vec![msg(1), msg(2), msg(3)], &[])
            .unwrap();
        assert_eq!(held, 3);
        let held = logs
            .replicate(P, "p:7710", T, 8, vec![msg(4)], &[msg(2).id])
            .unwrap();
        assert_eq!(held, 3);

        // A new process finds the copies and the producer's address again.
        let logs = ReplicaLogs::new(dir.path().join("replicas"));
        logs.open_existing();
        let summary = logs.producers();
        assert_eq!(summary.len(), 1);
        assert_eq!(
            (summary[0].address.as_str(), summary[0].copies),
            ("p:7710", 3)
        );
        let all = logs.held(P, T, 0, 0, usize::MAX).unwrap();
        assert_eq!(ids(&all), [msg(1).id, msg(3).id, msg(4).id]);
        assert!(
            all.copies
                .iter()
                .all(|(_, m)| m.headers.iter().all(|(k, _)| k != INCARNATION_HEADER))
        );
        // The asker's own incarnation is left out.
        assert_eq!(
            ids(&logs.held(P, T, 8, 0, usize::MAX).unwrap()),
            [msg(1).id, msg(3).id]
        );

        // Releasing after a takeover drops them for good.
        let offsets: Vec<Offset> = all.copies.iter().map(|(o, _)| *o).collect();
        logs.release(P, T, &offsets).unwrap();
        assert!(logs.held(P, T, 0, 0, usize::MAX).unwrap().copies.is_empty());
        assert!(logs.producers().is_empty());
    }

    #[test]
    fn pages_are_bounded_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let logs = ReplicaLogs::new(dir.path().to_owned());
        let copies = (0..10).map(msg).collect();
        logs.replicate(P, "", T, 1, copies, &[]).unwrap();
        let mut seen = Vec::new();
        let mut from = 0;
        loop {
            let page = logs.held(P, T, 0, from, 1).unwrap();
            seen.extend(ids(&page));
            if !page.more {
                break;
            }
            from = page.next;
        }
        let want: Vec<String> = (0..10).map(|i| msg(i).id).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn names_that_escape_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let logs = ReplicaLogs::new(dir.path().to_owned());
        for bad in ["../x", "ns/..", "nons", "a/b/c"] {
            assert!(
                logs.replicate(bad, "", T, 1, vec![msg(1)], &[]).is_err(),
                "{bad}"
            );
            assert!(
                logs.replicate(P, "", bad, 1, vec![msg(1)], &[]).is_err(),
                "{bad}"
            );
        }
    }
}
