//! Appending one round's publish requests: the backlog limit per request, dedup, per-key
//! sequence numbers, then one log append for the whole round (its fsync follows in `round`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_api::crd::Durability;
use tokio::sync::watch;

use super::StoreThread;
use crate::error::Error;
use crate::log::record::message_record_len;
use crate::log::{LogError, Offset, Settlement};
use crate::store::Answer;
use crate::store::{AppendItem, AppendOutcome, DeliveryReport};

impl StoreThread {
    #[allow(clippy::type_complexity)]
    pub(super) fn append(
        &mut self,
        requests: Vec<(Vec<AppendItem>, Answer)>,
    ) -> Vec<(
        Answer,
        Result<Vec<AppendOutcome>, Error>,
        Vec<(Offset, watch::Sender<DeliveryReport>)>,
    )> {
        let now = Instant::now();
        let base = self.log.written();
        let mut batch = Vec::new();
        let mut pending_bytes = 0u64;
        // Without a dedup window there is nothing to remember per id (no map, no clone).
        let dedup = self.dedup.enabled();
        let mut round_ids: HashMap<String, Offset> = HashMap::new();
        let mut round_keys: HashMap<String, u64> = HashMap::new();
        let mut highest_key_sequence = 0;
        let mut accepted = Vec::new();
        let mut out = Vec::new();
        // Custody moves: (offset, subscriptions that settled it where it came from).
        let mut presettled: Vec<(Offset, Vec<String>)> = Vec::new();
        for (items, reply) in requests {
            let bytes: u64 = items
                .iter()
                .map(|i| message_record_len(&i.message) as u64)
                .sum();
            let backlog = self.log.backlog_bytes();
            if self.durability != Durability::Memory
                && backlog.saturating_add(pending_bytes).saturating_add(bytes) > self.max_backlog
            {
                reply.fail(Error::BacklogFull {
                    topic: self.topic.clone(),
                    limit: format!("retention.maxBytes = {} bytes", self.max_backlog),
                    current: backlog.saturating_add(pending_bytes),
                });
                continue;
            }
            pending_bytes += bytes;
            let mut outcomes = Vec::with_capacity(items.len());
            let mut waiters = Vec::new();
            for item in items {
                let offset = base + batch.len() as u64;
                if dedup && !item.bypass_dedup {
                    let id = &item.message.id;
                    let seen = round_ids
                        .get(id)
                        .copied()
                        .or_else(|| self.dedup.get(id, now));
                    if let Some(offset) = seen {
                        outcomes.push(AppendOutcome::Duplicate(offset));
                        continue;
                    }
                    round_ids.insert(id.clone(), offset);
                }
                let mut message = item.message;
                if let Some(sequences) = &self.key_sequences
                    && let Some(k) = &message.key
                {
                    let seq = round_keys
                        .get(k)
                        .copied()
                        .unwrap_or_else(|| sequences.last(k))
                        + 1;
                    round_keys.insert(k.clone(), seq);
                    highest_key_sequence = highest_key_sequence.max(seq);
                    message.key_sequence = seq;
                }
                batch.push(message);
                if !item.settled_by.is_empty() {
                    presettled.push((offset, item.settled_by));
                }
                if let Some(tx) = item.delivered {
                    waiters.push((offset, tx));
                }
                outcomes.push(AppendOutcome::Stored(offset));
            }
            accepted.push((reply, outcomes, waiters));
        }
        if batch.is_empty() {
            for (reply, outcomes, waiters) in accepted {
                out.push((reply, Ok(outcomes), waiters));
            }
            return out;
        }
        // The numbers must be known used before a restart could hand them out again.
        if let Some(sequences) = &mut self.key_sequences
            && let Err(e) = sequences.reserve(highest_key_sequence)
        {
            tracing::error!(topic = %self.topic, error = %e, "keeping the key sequence mark failed");
            for (reply, _, _) in accepted {
                let err = Error::Internal(format!("topic {}: {e}", self.topic));
                out.push((reply, Err(err), Vec::new()));
            }
            return out;
        }
        match self.log.append(&batch) {
            Ok(range) if range.start == base => {
                self.dirty = true;
                self.presettle(presettled);
                if let Some(index) = &mut self.settled_index {
                    index.appended(base, batch.iter().map(|m| m.id.as_str()));
                }
                if let Some(tail) = &mut self.tail {
                    tail.extend(base, batch);
                }
                for (id, offset) in round_ids {
                    self.dedup.insert(id, offset, now);
                }
                self.dedup.flush();
                if let Some(sequences) = &mut self.key_sequences {
                    sequences.commit(round_keys);
                }
                for (reply, outcomes, waiters) in accepted {
                    out.push((reply, Ok(outcomes), waiters));
                }
            }
            Ok(range) => {
                if let Some(tail) = &mut self.tail {
                    tail.clear();
                }
                // The log numbered the batch differently from what we told publishers.
                let msg = format!(
                    "log of {} appended at {range:?}, expected {base}",
                    self.topic
                );
                tracing::error!("{msg}");
                for (reply, _, _) in accepted {
                    out.push((reply, Err(Error::Internal(msg.clone())), Vec::new()));
                }
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "append failed");
                // Every request of the round failed the same way: each gets that error with
                // its code (a full disk is RESOURCE_EXHAUSTED for all of them).
                let last = accepted.len().saturating_sub(1);
                let mut original = Some(e);
                for (i, (reply, _, _)) in accepted.into_iter().enumerate() {
                    let err = match (i == last, original.as_ref()) {
                        (false, Some(e)) => same_error(&self.topic, e),
                        _ => match original.take() {
                            Some(e) => Error::from_log(&self.topic, e),
                            None => Error::Internal(format!("append to {} failed", self.topic)),
                        },
                    };
                    out.push((reply, Err(err), Vec::new()));
                }
            }
        }
        out
    }
}

impl StoreThread {
    /// Settles records just appended for the subscriptions that settled them before their
    /// custody moved here: in the same round, so that no read can hand them to those.
    /// A subscription this log does not know is skipped.
    fn presettle(&mut self, presettled: Vec<(Offset, Vec<String>)>) {
        for (offset, subs) in presettled {
            for sub in subs {
                match self.log.settle(&sub, offset, Settlement::Dropped) {
                    Ok(()) if self.settled_index.is_some() => {
                        self.presettled.push((Arc::from(sub), offset));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(topic = %self.topic, subscription = %sub, offset, error = %e, "not settled for a subscription this log does not know");
                    }
                }
            }
        }
    }
}

/// The error `e` of a failed append once more, for another request of the same round: its
/// code and message stay (an I/O error keeps its kind, not its OS error object).
fn same_error(topic: &str, e: &LogError) -> Error {
    let copy = match e {
        LogError::BacklogFull { limit, current } => LogError::BacklogFull {
            limit: limit.clone(),
            current: *current,
        },
        LogError::Io { op, path, source } => LogError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => return Error::Internal(format!("log of topic {topic:?} failed: {other}")),
    };
    Error::from_log(topic, copy)
}
