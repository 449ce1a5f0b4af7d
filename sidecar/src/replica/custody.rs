//! The one path by which custody of messages moves to this sidecar: a takeover from a
//! replica log, a re-learn from a replica, or a peer's handoff on SIGTERM.

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::Error;
use crate::log::StoredMessage;
use crate::store::{AppendItem, AppendOutcome};

use super::{CUSTODY_HEADER, Moved};

/// Appends `messages` to this sidecar's log of `topic` as messages it now owns, tagged with
/// [`CUSTODY_HEADER`] = `from`, and returns once they are durable (the topic's durability,
/// `Disk` level at least), with how many were stored (ids within the dedup window are not
/// stored twice). Each is settled at once for the subscriptions that settled it where it
/// comes from ([`Moved::settled_by`]), so that only the others receive it again. For a `Replicated` topic their copies go to this sidecar's replicas too,
/// as far as they answer: custody is never refused for want of replicas, since the
/// sender's copy would be the only other one.
pub async fn take_custody(
    engine: &Arc<Engine>,
    topic: &str,
    from: &str,
    messages: Vec<Moved>,
) -> Result<u64, Error> {
    append(engine, topic, from, messages, false).await
}

/// [`take_custody`] of messages this sidecar produced itself and lost: the dedup window is
/// not consulted (it may name records the log lost), so an id it still remembers is stored
/// again rather than trusted to be there.
pub async fn relearn(
    engine: &Arc<Engine>,
    topic: &str,
    messages: Vec<Moved>,
) -> Result<u64, Error> {
    let me = engine.identity.producer_id.clone();
    append(engine, topic, &me, messages, true).await
}

async fn append(
    engine: &Arc<Engine>,
    topic: &str,
    from: &str,
    messages: Vec<Moved>,
    bypass_dedup: bool,
) -> Result<u64, Error> {
    if messages.is_empty() {
        return Ok(0);
    }
    let store = engine.store(topic).await?;
    // Two copies of one id (sent again after a restart of their producer) are one message.
    let mut ids = std::collections::HashSet::new();
    let (messages, settled_by): (Vec<StoredMessage>, Vec<Vec<String>>) = messages
        .into_iter()
        .filter(|m| ids.insert(m.message.id.clone()))
        .map(
            |Moved {
                 mut message,
                 settled_by,
             }| {
                let m = &mut message;
                if !m.headers.iter().any(|(k, _)| k == CUSTODY_HEADER) {
                    m.headers.push((CUSTODY_HEADER.into(), from.to_owned()));
                    m.headers.sort();
                }
                m.key_sequence = 0;
                (message, settled_by)
            },
        )
        .unzip();
    let items = messages
        .iter()
        .cloned()
        .zip(settled_by)
        .map(|(message, settled_by)| AppendItem {
            message,
            delivered: None,
            bypass_dedup,
            settled_by,
        })
        .collect();
    let outcomes = store
        .append(items)?
        .await
        .map_err(|_| Error::Internal(format!("store of {topic} stopped")))??;
    let stored: Vec<StoredMessage> = messages
        .into_iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, AppendOutcome::Stored(_)))
        .map(|(m, _)| m)
        .collect();
    let n = stored.len() as u64;
    if let Some(entry) = engine.table().topics.get(topic).cloned()
        && let Err(e) = engine.replicator.replicate(engine, &entry, &stored).await
    {
        tracing::warn!(%topic, error = %e, "messages taken into custody are not replicated yet");
    }
    Ok(n)
}
