//! The store's answer to a publish and, for a `Replicated` topic, the copies that must be
//! made before its records may be delivered: the store holds them back from dispatchers
//! (`store/held.rs`) until the copies are confirmed, and a publish whose copies failed is
//! refused and its records never delivered (DESIGN, "Only durable records are delivered").

use std::sync::Arc;

use ferry_api::routing::TopicEntry;
use tokio::sync::oneshot;

use super::Engine;
use crate::error::Error;
use crate::log::StoredMessage;
use crate::store::{AppendItem, AppendOutcome, HeldResult, TopicStore};

/// A `Replicated` topic's entry and the messages to copy.
pub(super) type Copies = Option<(TopicEntry, Vec<StoredMessage>)>;

/// The store's answer on its way.
pub(super) enum StoreReply {
    Plain(oneshot::Receiver<Result<Vec<AppendOutcome>, Error>>),
    Held(oneshot::Receiver<HeldResult>),
}

/// Queues the append of a publish: held when copies are to be made.
pub(super) fn append(
    store: &TopicStore,
    items: Vec<AppendItem>,
    copies: &Copies,
) -> Result<StoreReply, Error> {
    if copies.is_some() {
        store.append_held(items).map(StoreReply::Held)
    } else {
        store.append(items).map(StoreReply::Plain)
    }
}

impl Engine {
    /// Waits for the store, then makes the copies of what it stored (a replica never holds
    /// an id this log did not store) and releases or refuses the held records.
    pub(super) async fn stored_and_copied(
        self: &Arc<Self>,
        topic: &str,
        reply: StoreReply,
        copies: &Copies,
    ) -> Result<Vec<AppendOutcome>, Error> {
        let stopped = || Error::Internal(format!("store of {topic} stopped"));
        match reply {
            StoreReply::Plain(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
            StoreReply::Held(rx) => {
                let (outcomes, held) = rx.await.map_err(|_| stopped())??;
                let Some((entry, messages)) = copies else {
                    held.confirm();
                    return Ok(outcomes);
                };
                let stored = crate::replica::newly_stored(messages, &outcomes);
                match self.replicator.replicate(self, entry, &stored).await {
                    Ok(()) => {
                        held.confirm();
                        Ok(outcomes)
                    }
                    Err(e) => {
                        held.refuse();
                        Err(e)
                    }
                }
            }
        }
    }
}
