//! A dispatcher's timers: delayed first deliveries, backoff before redelivery, dead-letter
//! retries, expiry sweeps (`expiry.rs`), and ack timeouts, which first ask the consumer's sidecar (`QueryDelivery`).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_api::proto::v1::QueryDeliveryRequest;

use super::{CopyState, Dispatcher, LOCAL_ADDR, now_ms};
use crate::delivery::Event;
use crate::log::Offset;

/// A timed-out delivery to ask about: its offset, attempt and message id.
pub(super) struct TimedOut {
    offset: Offset,
    attempt: u32,
    message_id: String,
}

/// Timers kept per message held, at most, before the stale ones are dropped.
const TIMERS_PER_ENTRY: usize = 4;
/// Timers always allowed, whatever few messages are held.
const TIMERS_FLOOR: usize = 4096;

impl Dispatcher {
    /// Drops the timers of messages no longer held. A timer is not removed when its message
    /// settles (a heap cannot find it): at 100k msg/s and a 30 s `ackWait`, the ack
    /// deadlines alone would pile up to millions of entries and tens of MiB. Pruning when
    /// the heap outgrows the window keeps it proportional to what is held, at an amortized
    /// constant cost per timer.
    pub(super) fn prune_timers(&mut self) {
        if self.timers.len() <= TIMERS_FLOOR + TIMERS_PER_ENTRY * self.entries.len() {
            return;
        }
        let entries = &self.entries;
        self.timers
            .retain(|Reverse((_, o))| *o == super::expiry::SWEEP || entries.contains_key(o));
    }

    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        self.wake_parked(now);
        let mut queries: HashMap<Arc<str>, Vec<TimedOut>> = HashMap::new();
        let mut dead_letters = Vec::new();
        while let Some(Reverse((at, offset))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if offset == super::expiry::SWEEP {
                self.sweep(at, now);
                continue;
            }
            let Some(e) = self.entries.get_mut(&offset) else {
                continue;
            };
            if e.not_before.is_some_and(|t| t <= now) {
                e.not_before = None;
                self.ready.insert(offset);
            }
            for (k, c) in e.copies.iter_mut().enumerate() {
                match &mut c.state {
                    CopyState::Waiting(t) if *t <= now => {
                        c.state = CopyState::Idle;
                        self.ready.insert(offset);
                    }
                    CopyState::DeadLetterWait(t) if *t <= now => {
                        c.state = CopyState::Idle;
                        dead_letters.push((offset, k, c.reason.clone()));
                    }
                    CopyState::InFlight {
                        addr,
                        deadline,
                        querying,
                        ..
                    } if *deadline <= now && !*querying => {
                        *querying = true;
                        queries.entry(addr.clone()).or_default().push(TimedOut {
                            offset,
                            attempt: c.attempt,
                            message_id: e.message.id.clone(),
                        });
                    }
                    _ => {}
                }
            }
        }
        for (offset, k, reason) in dead_letters {
            self.give_up(offset, k, reason);
        }
        for (addr, items) in queries {
            self.query(addr, items);
        }
    }

    /// Asks the consumer sidecar at `addr` about timed-out deliveries: one task per peer,
    /// not per message. Each question names the message and this process's incarnation, so
    /// that an ack of another message once held at the same offset does not answer it.
    pub(super) fn query(&self, addr: Arc<str>, items: Vec<TimedOut>) {
        let incarnation = self.engine.identity.incarnation;
        if &*addr == LOCAL_ADDR {
            for TimedOut {
                offset,
                attempt,
                message_id,
            } in items
            {
                let state = self.engine.consumer.query(&QueryDeliveryRequest {
                    producer: self.engine.identity.producer_id.to_string(),
                    subscription: self.sub.to_string(),
                    offset,
                    attempt,
                    message_id,
                    incarnation,
                });
                let _ = self.tx.send(Event::Queried {
                    addr: addr.clone(),
                    offset,
                    attempt,
                    state: Ok(state),
                });
            }
            return;
        }
        let peers = self.engine.peers.clone();
        let tx = self.tx.clone();
        let producer = self.engine.identity.producer_id.to_string();
        let sub = self.sub.to_string();
        tokio::spawn(async move {
            use futures::StreamExt;
            let results = futures::stream::iter(items)
                .map(|q| {
                    let (offset, attempt) = (q.offset, q.attempt);
                    let req = QueryDeliveryRequest {
                        producer: producer.clone(),
                        subscription: sub.clone(),
                        offset,
                        attempt,
                        message_id: q.message_id,
                        incarnation,
                    };
                    let peers = peers.clone();
                    let addr = addr.clone();
                    async move { (offset, attempt, peers.query(&addr, req).await) }
                })
                .buffer_unordered(32);
            futures::pin_mut!(results);
            while let Some((offset, attempt, state)) = results.next().await {
                let _ = tx.send(Event::Queried {
                    addr: addr.clone(),
                    offset,
                    attempt,
                    state,
                });
            }
        });
    }

    pub(super) fn flush_settles(&mut self) {
        if !self.settles.is_empty() {
            self.store.settle(std::mem::take(&mut self.settles));
        }
        if !self.reports.is_empty() {
            self.store.report(std::mem::take(&mut self.reports));
        }
    }

    pub(super) fn update_gauges(&self) {
        let held = self
            .entries
            .values()
            .next()
            .map(|e| e.message.publish_time_ms);
        let oldest = match (held, self.parked.oldest_publish_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let age = oldest.map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0);
        self.counters.oldest.set(age);
        self.counters
            .parked
            .set(i64::try_from(self.parked.len()).unwrap_or(i64::MAX));
    }
}
