//! The ids of a `Replicated` topic's unsettled records, by offset, so that the store can
//! report ids as they become settled by every subscription (the replicator then tells the
//! replicas to drop their copies) and answer whether it still holds an id unsettled (a
//! restarted producer comparing its log with what its replicas hold).
//!
//! Ids are reported when `acknowledged()` passes them, and also at once when a settlement
//! completes a record above it (out-of-order acks). A settlement by one subscription of a
//! record that others have not settled yet is reported as (subscription, id), so that a
//! replica's takeover delivers it to the others only. A report lost to a crash only means
//! a replica keeps a copy (or a subscription's claim on it) that a later takeover or
//! re-learn may deliver again: a duplicate, never a loss.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use ferry_api::crd::Durability;
use ferry_api::routing::TopicEntry;

use super::{SettledIds, SettledReport, StoreOptions};
use crate::log::{Log, Offset};

#[derive(Debug)]
pub(super) struct SettledIndex {
    topic: String,
    ids: BTreeMap<Offset, String>,
    tx: SettledIds,
}

impl SettledIndex {
    /// The index of a `Replicated` topic whose settled ids have somewhere to go.
    pub(super) fn for_topic(
        entry: &TopicEntry,
        log: &dyn Log,
        options: &StoreOptions,
    ) -> Option<Self> {
        let tx = options.settled_ids.clone()?;
        let topic = ferry_api::routing::object_ref(&entry.namespace, &entry.name);
        (entry.durability == Durability::Replicated).then(|| Self::rebuild(&topic, log, tx))
    }

    /// The index of every record still unsettled in `log`.
    pub(super) fn rebuild(topic: &str, log: &dyn Log, tx: SettledIds) -> Self {
        let mut ids = BTreeMap::new();
        let mut from = log.first();
        while from < log.written() {
            let Ok(batch) = log.read(from, 1024) else {
                break;
            };
            let Some((last, _)) = batch.last() else {
                break;
            };
            from = last + 1;
            ids.extend(batch.into_iter().map(|(o, m)| (o, m.id)));
        }
        Self {
            topic: topic.to_owned(),
            ids,
            tx,
        }
    }

    /// Records appended at `base..`.
    pub(super) fn appended<'a>(&mut self, base: Offset, ids: impl Iterator<Item = &'a str>) {
        for (i, id) in ids.enumerate() {
            self.ids.insert(base + i as u64, id.to_owned());
        }
    }

    /// Reports the ids that every subscription has settled (those below `acknowledged()`
    /// and those of `touched`, the settlements of this round, that are complete), and for
    /// the other records of `touched` which subscription settled them.
    pub(super) fn settled(
        &mut self,
        log: &dyn Log,
        subs: &[String],
        touched: &[(Arc<str>, Offset)],
    ) {
        if subs.is_empty() {
            return;
        }
        let above = self.ids.split_off(&log.acknowledged());
        let mut done: Vec<String> = std::mem::replace(&mut self.ids, above)
            .into_values()
            .collect();
        let mut by_subscription = Vec::new();
        for (sub, o) in touched {
            let Some(id) = self.ids.get(o) else {
                continue;
            };
            if subs.iter().all(|s| log.is_settled(s, *o)) {
                done.push(id.clone());
                self.ids.remove(o);
            } else if log.is_settled(sub, *o) {
                by_subscription.push((sub.clone(), id.clone()));
            }
        }
        if !done.is_empty() || !by_subscription.is_empty() {
            let _ = self.tx.send(SettledReport {
                topic: self.topic.clone(),
                ids: done,
                by_subscription,
            });
        }
    }

    /// For each id, whether the log holds it unsettled.
    pub(super) fn holds(&self, ids: &[String]) -> Vec<bool> {
        let held: HashSet<&str> = self.ids.values().map(String::as_str).collect();
        ids.iter().map(|id| held.contains(id.as_str())).collect()
    }
}
