//! Publishes with ack level `DELIVERED` waiting for their message: each gets the
//! subscriptions registered when it was stored, every outcome as it comes, and `done` once
//! each of those subscriptions (still registered) settled it for good. An `AtMostOnce`
//! subscription settles a message when it is sent; its app's answer comes later as a
//! report, and only that is final (`outcome.rs`).

use std::sync::Arc;

use tokio::sync::watch;

use super::StoreThread;
use crate::log::Offset;
use crate::store::{DeliveryReport, Outcome, SettleItem};

impl StoreThread {
    /// Registers a waiter for `offset`, expecting the subscriptions registered now (none:
    /// nothing will ever deliver it, which the publisher is told at once).
    pub(super) fn wait_for_delivery(&mut self, offset: Offset, tx: watch::Sender<DeliveryReport>) {
        let expected: Vec<Arc<str>> = self
            .subscriptions
            .iter()
            .map(|s| Arc::from(s.as_str()))
            .collect();
        tx.send_modify(|r| r.expected = expected);
        self.delivered_waiters.entry(offset).or_default().push(tx);
    }

    /// Passes outcomes on to the waiters of their offsets.
    pub(super) fn record_outcomes(&mut self, items: &[SettleItem]) {
        if self.delivered_waiters.is_empty() {
            return;
        }
        for (sub, offset, how) in items {
            if let Some(waiters) = self.delivered_waiters.get(offset) {
                for tx in waiters {
                    tx.send_modify(|r| r.record(sub, *how));
                }
            }
        }
    }

    /// Tells the waiters whose every expected subscription settled their message for good.
    pub(super) fn fire_delivered_waiters(&mut self) {
        if self.delivered_waiters.is_empty() {
            return;
        }
        let subs = &self.subscriptions;
        let log = &self.log;
        self.delivered_waiters.retain(|offset, waiters| {
            waiters.retain(|tx| {
                let mut done = false;
                tx.send_if_modified(|r| {
                    // A subscription deleted meanwhile waits for nothing.
                    r.expected.retain(|s| subs.iter().any(|t| **t == **s));
                    // Settled with no outcome heard (it should not happen): reported as
                    // dropped rather than waited for until the publisher's timeout.
                    let unheard: Vec<Arc<str>> = r
                        .expected
                        .iter()
                        .filter(|s| {
                            log.is_settled(s, *offset) && !r.outcomes.iter().any(|(t, _)| t == *s)
                        })
                        .cloned()
                        .collect();
                    for s in unheard {
                        r.record(&s, Outcome::Dropped);
                    }
                    done = r.expected.iter().all(|s| r.final_outcome(s).is_some());
                    r.done = done;
                    done
                });
                // Kept while waiting and while the publisher still listens.
                !done && !tx.is_closed()
            });
            !waiters.is_empty()
        });
    }
}
