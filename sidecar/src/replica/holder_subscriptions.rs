//! The per-subscription part of a replica log: which subscriptions it records
//! settlements of (the file [`SUBSCRIPTIONS_FILE`]), and marking copies settled by one.

use std::path::Path;

use super::{CUSTODY_SUB, Copies, split};
use crate::error::Error;
use crate::log::{DiskLog, Log, Offset, Settlement};

/// File in a replica log's folder naming, a line each, the subscriptions whose
/// settlements the log records beside [`CUSTODY_SUB`].
const SUBSCRIPTIONS_FILE: &str = "replica-subscriptions";
/// Most subscriptions one replica log records settlements of; trims naming more are
/// ignored (those copies are then delivered to them again after a takeover: duplicates).
const MAX_SUBSCRIPTIONS: usize = 256;
/// Longest subscription name taken (`namespace/name`, each at most 253).
const MAX_SUBSCRIPTION_NAME: usize = 512;

impl Copies {
    /// Settles the copy at `o` for every subscription of the log: it is not needed any
    /// more (trimmed, or taken over), and its segment may go.
    pub(super) fn settle_everywhere(&mut self, o: Offset) {
        let _ = self.log.settle(CUSTODY_SUB, o, Settlement::Dropped);
        for s in &self.subscriptions {
            let _ = self.log.settle(s, o, Settlement::Dropped);
        }
    }

    /// Makes sure the log records settlements of `sub`; false when it cannot (a name not
    /// of the form `namespace/name`, or too many subscriptions). A new subscription starts
    /// at the log's acknowledged offset and is settled at once for every copy above it
    /// that is gone already, so that it never keeps a segment alive.
    pub(super) fn register(&mut self, sub: &str, topic: &str) -> Result<bool, Error> {
        if self.subscriptions.iter().any(|s| s == sub) {
            return Ok(true);
        }
        if !valid_subscription(sub) || self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            tracing::debug!(%topic, subscription = %sub, "replica log does not record this subscription's settlements");
            return Ok(false);
        }
        self.subscriptions.push(sub.to_owned());
        write_subscriptions(&self.dir, &self.subscriptions)?;
        self.log
            .set_subscriptions(&registered(&self.subscriptions))
            .map_err(|e| Error::from_log(topic, e))?;
        catch_up(&mut self.log, sub);
        Ok(true)
    }

    /// Marks one copy of `id` settled by `sub`: the oldest it has not settled, preferring
    /// those sent by `incarnation`. Whether there was one.
    pub(super) fn settle_by(&mut self, sub: &str, id: &str, incarnation: u64) -> bool {
        let Some(offsets) = self.by_id.get(id) else {
            return false;
        };
        let log = &self.log;
        let open: Vec<(Offset, u64)> = offsets
            .iter()
            .copied()
            .filter(|(o, _)| !log.is_settled(sub, *o))
            .collect();
        let pick = open
            .iter()
            .filter(|(_, i)| *i == incarnation)
            .map(|(o, _)| *o)
            .min()
            .or_else(|| open.iter().map(|(o, _)| *o).min());
        pick.is_some_and(|o| self.log.settle(sub, o, Settlement::Acked).is_ok())
    }
}

/// Settles for `sub` every copy above the log's acknowledged offset that is gone already
/// (settled for [`CUSTODY_SUB`]): a subscription registered late, or registered again
/// after its settlements were lost, must not keep their segments.
pub(super) fn catch_up(log: &mut DiskLog, sub: &str) {
    for o in log.acknowledged()..log.written() {
        if log.is_settled(CUSTODY_SUB, o) && !log.is_settled(sub, o) {
            let _ = log.settle(sub, o, Settlement::Dropped);
        }
    }
}

/// The log's subscriptions: [`CUSTODY_SUB`] and `subscriptions`.
pub(super) fn registered(subscriptions: &[String]) -> Vec<String> {
    std::iter::once(CUSTODY_SUB.to_owned())
        .chain(subscriptions.iter().cloned())
        .collect()
}

/// A subscription name that can be recorded: `namespace/name`, one line.
fn valid_subscription(sub: &str) -> bool {
    sub.len() <= MAX_SUBSCRIPTION_NAME
        && sub != CUSTODY_SUB
        && !sub.contains(['\n', '\r'])
        && split(sub).is_ok()
}

/// The subscriptions listed in a log folder's [`SUBSCRIPTIONS_FILE`] (none if it is
/// missing or unreadable: their settlements are then forgotten, which only means
/// duplicates after a takeover).
pub(super) fn read_subscriptions(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(SUBSCRIPTIONS_FILE)).unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if valid_subscription(line) && !out.iter().any(|s| s == line) {
            out.push(line.to_owned());
        }
    }
    out.truncate(MAX_SUBSCRIPTIONS);
    out
}

/// Replaces the folder's [`SUBSCRIPTIONS_FILE`] (written aside, then renamed).
fn write_subscriptions(dir: &Path, subscriptions: &[String]) -> Result<(), Error> {
    let path = dir.join(SUBSCRIPTIONS_FILE);
    let tmp = dir.join(format!("{SUBSCRIPTIONS_FILE}.tmp"));
    let mut text = subscriptions.join("\n");
    text.push('\n');
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}
