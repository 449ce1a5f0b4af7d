//! An app's consume session: opened on a subscription's inbox with some credit, it hands
//! deliveries to the app's stream and, when closed or dropped, returns what it still holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ferry_api::proto::v1::Delivery;
use tokio::sync::mpsc;

use super::{Consumer, Inbox, lock};
use crate::error::Error;

/// An app's consume session; closing it (or dropping it) returns what it holds.
#[derive(Debug)]
pub struct Session {
    consumer: Arc<Consumer>,
    inbox: Arc<Inbox>,
    id: u64,
}

impl Consumer {
    /// Opens a consume session on `subscription` (`namespace/name`) with `credit`.
    /// `nack_on_close`: deliveries still unacked when the session closes go back to their
    /// producers at once (streams); HTTP fetches leave them until their ackWait.
    pub fn open_session(
        self: &Arc<Self>,
        subscription: &str,
        credit: u64,
        nack_on_close: bool,
    ) -> Result<(Session, mpsc::UnboundedReceiver<Delivery>), Error> {
        let table = self.routing.borrow().clone();
        let inbox = self.inbox(subscription, &table)?;
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let handed = {
            let mut state = lock(&inbox.state);
            state.open_session(id, credit, tx, nack_on_close, Instant::now());
            state.take_handed()
        };
        self.count_delivered(&inbox, handed);
        Ok((
            Session {
                consumer: self.clone(),
                inbox,
                id,
            },
            rx,
        ))
    }
}

impl Session {
    /// The subscription (`namespace/name`).
    pub fn subscription(&self) -> &str {
        &self.inbox.subscription
    }

    /// The subscription's topic (`namespace/name`).
    pub fn topic(&self) -> &str {
        &self.inbox.topic
    }

    /// Grants `n` more deliveries.
    pub fn add_credit(&self, n: u64) {
        let handed = {
            let mut state = lock(&self.inbox.state);
            state.add_credit(self.id, n, Instant::now());
            state.take_handed()
        };
        self.consumer.count_delivered(&self.inbox, handed);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut replies = Vec::new();
        lock(&self.inbox.state).close_session(self.id, &mut replies);
        self.consumer.send(replies);
    }
}
