//! The replica side's storage: one `DiskLog` of copies per (producer, topic) under
//! `<data-dir>/replicas/<producer namespace>/<producer pod>/<topic namespace>/<topic>`, with
//! the producer's peer address in `<producer pod>/address` (the takeover probes it after a
//! restart of this sidecar). A copy is "held" until the producer trims its id or this
//! sidecar takes custody of it; either settles it for the log's subscription
//! [`CUSTODY_SUB`] (and every other one), so compaction frees its segment.
//!
//! Per subscription: a producer also tells which subscription settled a copy that others
//! have not settled yet. The replica log then gets a subscription of that name (listed in
//! `replica-subscriptions` in its folder, `holder_subscriptions.rs`, so that a restart registers it again) and the copy is settled
//! for it; a takeover or re-learn hands the copy on with those names
//! ([`super::Moved::settled_by`]), so that only the other subscriptions receive it again.
//! Such a trim names a message id; of the copies with that id the oldest this subscription
//! has not settled is meant, preferring those sent by the trimming incarnation (an id is
//! one message within the dedup window; the copies of one id published twice, further
//! apart, are told apart by age).
//!
//! Each copy carries the producer's incarnation in the header [`INCARNATION_HEADER`], so a
//! restarted producer can ask for what an earlier start of it sent. The methods block
//! (fsync); async callers use `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_api::proto::v1::SubscriptionSettled;

use super::Moved;
use super::early::Early;
use super::pins::Pins;
use crate::error::Error;
use crate::log::record::message_record_len;
use crate::log::{DiskLog, DiskLogConfig, Log, Offset, StoredMessage};

/// The subscription of a replica log that every copy has: the copy is still needed.
const CUSTODY_SUB: &str = "custody";
/// Header of a stored copy: the producer's incarnation that sent it (decimal).
const INCARNATION_HEADER: &str = "ferry-replica-incarnation";
/// The copies of one producer's topic.
#[derive(Debug)]
struct Copies {
    log: DiskLog,
    /// Offsets of held copies with the incarnation that sent each, by message id.
    by_id: HashMap<String, Vec<(Offset, u64)>>,
    address: String,
    /// The log's folder.
    dir: PathBuf,
    /// Subscriptions that settled some copy, registered with the log beside [`CUSTODY_SUB`].
    subscriptions: Vec<String>,
    /// Per-subscription settlements of ids whose copy has not come yet.
    early: Early,
}

/// What [`ReplicaLogs::replicate`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replicated {
    /// Copies of this producer and topic held afterwards.
    pub held: u64,
    /// Copies newly marked settled by one subscription.
    pub settled_by_subscription: u64,
}

/// One held copy: its replica offset, the message and who settled it.
#[derive(Debug, Clone)]
pub struct HeldCopy {
    pub offset: Offset,
    pub moved: Moved,
}

/// Replica logs by (producer, topic).
type Logs = HashMap<(String, String), Arc<Mutex<Copies>>>;

/// One page of held copies: the copies with their replica offsets, where to continue, and
/// whether there is more.
#[derive(Debug, Default)]
pub struct HeldPage {
    pub copies: Vec<HeldCopy>,
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
    pins: Pins,
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
            pins: Pins::new(root.clone()),
            root,
            logs: Mutex::new(HashMap::new()),
        }
    }

    /// Which identity each producer's copies belong to (`pins.rs`).
    pub fn pins(&self) -> &Pins {
        &self.pins
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
        let subscriptions = read_subscriptions(&dir);
        log.set_subscriptions(&registered(&subscriptions))
            .map_err(|e| Error::from_log(topic, e))?;
        for sub in &subscriptions {
            catch_up(&mut log, sub);
        }
        let mut by_id: HashMap<String, Vec<(Offset, u64)>> = HashMap::new();
        for (o, m) in read_all(&log).map_err(|e| Error::from_log(topic, e))? {
            let incarnation = incarnation_of(&m);
            by_id.entry(m.id).or_default().push((o, incarnation));
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
            dir,
            subscriptions,
            early: Early::default(),
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

    /// [`ReplicaLogs::replicate_within`] with no size limit.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub fn replicate(
        &self,
        producer: &str,
        address: &str,
        topic: &str,
        incarnation: u64,
        copies: Vec<StoredMessage>,
        trims: &[String],
        settled_by: &[SubscriptionSettled],
    ) -> Result<Replicated, Error> {
        self.replicate_within(
            u64::MAX,
            producer,
            address,
            topic,
            incarnation,
            copies,
            trims,
            settled_by,
        )
    }

    /// Drops the copies of `trims`, stores `copies`, then marks the copies named by
    /// `settled_by` settled by those subscriptions, all fsynced before returning. A request
    /// with trims only for a producer and topic never seen creates nothing. Copies that
    /// would take the unsettled bytes held for this producer and topic past `max_bytes`
    /// (the topic's `retention.maxBytes`, measured as the producer measures its backlog)
    /// are refused whole with `BacklogFull` after the trims are applied; nothing of them
    /// is stored.
    #[allow(clippy::too_many_arguments)]
    pub fn replicate_within(
        &self,
        max_bytes: u64,
        producer: &str,
        address: &str,
        topic: &str,
        incarnation: u64,
        copies: Vec<StoredMessage>,
        trims: &[String],
        settled_by: &[SubscriptionSettled],
    ) -> Result<Replicated, Error> {
        let Some(c) = self.get(producer, topic, !copies.is_empty())? else {
            return Ok(Replicated::default());
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
            for (o, _) in c.by_id.remove(id).unwrap_or_default() {
                c.settle_everywhere(o);
                changed = true;
            }
        }
        // Settlements that came before these copies apply to them now.
        let copies_ids: Vec<String> = if c.early.is_empty() {
            Vec::new()
        } else {
            copies.iter().map(|m| m.id.clone()).collect()
        };
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
            let bytes: u64 = copies.iter().map(|m| message_record_len(m) as u64).sum();
            let current = c.log.backlog_bytes();
            if current.saturating_add(bytes) > max_bytes {
                if changed {
                    c.log.sync().map_err(|e| Error::from_log(topic, e))?;
                }
                return Err(Error::BacklogFull {
                    topic: topic.to_owned(),
                    limit: format!(
                        "retention.maxBytes = {max_bytes} bytes of copies of producer {producer} on this replica"
                    ),
                    current,
                });
            }
            let range = c
                .log
                .append(&copies)
                .map_err(|e| Error::from_log(topic, e))?;
            for (o, m) in range.zip(&copies) {
                c.by_id
                    .entry(m.id.clone())
                    .or_default()
                    .push((o, incarnation));
            }
            changed = true;
        }
        let mut settled = 0;
        for id in &copies_ids {
            for sub in c.early.take(id) {
                settled += u64::from(c.settle_by(&sub, id, incarnation));
            }
        }
        let now = std::time::Instant::now();
        for s in settled_by {
            if !c.register(&s.subscription, topic)? {
                continue;
            }
            for id in &s.ids {
                if c.settle_by(&s.subscription, id, incarnation) {
                    settled += 1;
                } else if !c.by_id.contains_key(id) {
                    c.early.note(&s.subscription, id, now);
                }
            }
        }
        changed |= settled > 0;
        if changed {
            c.log.sync().map_err(|e| Error::from_log(topic, e))?;
            if let Err(e) = c.log.compact() {
                tracing::debug!(%topic, error = %e, "replica log compaction failed");
            }
        }
        Ok(Replicated {
            held: c.by_id.values().map(Vec::len).sum::<usize>() as u64,
            settled_by_subscription: settled,
        })
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
                let settled_by = c
                    .subscriptions
                    .iter()
                    .filter(|s| c.log.is_settled(s, o))
                    .cloned()
                    .collect();
                out.push(HeldCopy {
                    offset: o,
                    moved: Moved {
                        message: m,
                        settled_by,
                    },
                });
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
            os.retain(|(o, _)| !set.contains(o));
            !os.is_empty()
        });
        for o in offsets {
            c.settle_everywhere(*o);
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

/// The incarnation a copy was sent under (0 if its header is missing).
fn incarnation_of(m: &StoredMessage) -> u64 {
    m.headers
        .iter()
        .find(|(k, _)| k == INCARNATION_HEADER)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
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

#[path = "holder_subscriptions.rs"]
mod subscriptions;
use subscriptions::{catch_up, read_subscriptions, registered};

#[cfg(test)]
#[path = "holder_tests.rs"]
mod tests;
