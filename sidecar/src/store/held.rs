//! A hold on the records of a `Replicated` publish: stored and fsynced here, but not yet
//! copied to `replicas - 1` peers, so dispatchers must not see them (DESIGN, "Only durable
//! records are delivered"). The publish path releases the hold once the copies are made,
//! or refuses the records when they could not be: the publisher gets an error and the
//! records are settled for every subscription without being delivered.
//!
//! A hold dropped without a release (the publish was cancelled: its client went away)
//! refuses its records. The copies may have reached some replicas; a takeover can then
//! deliver a message whose publisher heard nothing back, never one it was told failed.

use std::sync::mpsc::Sender;

use super::Command;
use crate::log::Offset;

/// Records hidden from dispatchers until [`Held::confirm`].
#[derive(Debug)]
pub struct Held {
    offsets: Vec<Offset>,
    tx: Option<Sender<Command>>,
}

impl Held {
    pub(super) fn new(offsets: Vec<Offset>, tx: Sender<Command>) -> Self {
        Self {
            offsets,
            tx: Some(tx),
        }
    }

    /// The copies are made: the records may be delivered.
    pub fn confirm(mut self) {
        self.release(true);
    }

    /// The copies were not made: the publisher is refused, the records never delivered.
    pub fn refuse(mut self) {
        self.release(false);
    }

    fn release(&mut self, replicated: bool) {
        if let Some(tx) = self.tx.take() {
            let offsets = std::mem::take(&mut self.offsets);
            // A stopped store has nothing left to deliver them from.
            let _ = tx.send(Command::Release {
                offsets,
                replicated,
            });
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release(false);
    }
}
