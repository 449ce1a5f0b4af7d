//! How a dispatcher reacts to settlements, send failures, query answers and dead-letter
//! results: the bookkeeping of copies, redelivery with backoff, and giving up.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use ferry_api::crd::Qos;
use ferry_api::proto::v1::{DeliveryState, Outcome as WireOutcome, Settled};

use super::{Copy, CopyState, DLQ_RETRY, Dispatcher, REJECT_RETRY, now_ms};
use crate::delivery::Event;
use crate::delivery::policy::{backoff_for, dead_letter};
use crate::log::Offset;
use crate::store::Outcome;

impl Dispatcher {
    pub(super) fn handle(&mut self, e: Event) {
        match e {
            Event::Settled { from, settled } => {
                let Some(k) = self.find_in_flight(settled.offset, &from, settled.attempt) else {
                    self.count_misdirected(&from, &settled);
                    // `AtMostOnce` copies are settled when sent, so the answer finds none in
                    // flight; anything but an ack is then a delivery that failed, dropped.
                    if self.setup.subscription.qos == Qos::AtMostOnce {
                        let acked = settled.outcome == WireOutcome::Acked as i32;
                        if !acked {
                            self.counters.dropped.inc();
                        }
                        // The app's answer is what a `DELIVERED` publish waits for.
                        let how = if acked {
                            Outcome::Acked
                        } else {
                            Outcome::Dropped
                        };
                        self.reports.push((self.sub.clone(), settled.offset, how));
                    }
                    return;
                };
                if !self.names_held(&settled) {
                    return;
                }
                let offset = settled.offset;
                let pod = self.release_member(offset, k);
                let attempt = settled.attempt;
                match WireOutcome::try_from(settled.outcome) {
                    Ok(WireOutcome::Acked) => self.acked(offset, k),
                    Ok(WireOutcome::Rejected) => {
                        self.note(
                            offset,
                            k,
                            format!("{attempt}@{pod}:refused ({})", settled.reason),
                        );
                        self.retry(offset, k, Some(REJECT_RETRY), false);
                    }
                    _ => {
                        let what = if settled.reason.is_empty() {
                            "nacked".to_string()
                        } else {
                            settled.reason.clone()
                        };
                        self.note(offset, k, format!("{attempt}@{pod}:{what}"));
                        let delay =
                            (settled.delay_ms > 0).then(|| Duration::from_millis(settled.delay_ms));
                        self.retry(offset, k, delay, true);
                    }
                }
            }
            Event::SendFailed {
                addr,
                items,
                reason,
            } => {
                for (offset, attempt) in items {
                    let Some(k) = self.find_in_flight(offset, &addr, attempt) else {
                        // An `AtMostOnce` copy settled when sent: it is lost, dropped.
                        if self.setup.subscription.qos == Qos::AtMostOnce {
                            self.reports
                                .push((self.sub.clone(), offset, Outcome::Dropped));
                        }
                        continue;
                    };
                    let pod = self.release_member(offset, k);
                    self.note(offset, k, format!("{attempt}@{pod}:not sent ({reason})"));
                    self.retry(offset, k, Some(REJECT_RETRY), false);
                }
                self.refresh_liveness();
            }
            Event::Queried {
                addr,
                offset,
                attempt,
                state,
            } => {
                let Some(k) = self.find_in_flight(offset, &addr, attempt) else {
                    return;
                };
                match state {
                    Ok(DeliveryState::Acked) => {
                        self.release_member(offset, k);
                        self.acked(offset, k);
                    }
                    Ok(DeliveryState::InProgress) => {
                        let deadline = Instant::now()
                            + Duration::from_millis(self.setup.subscription.ack_wait_ms);
                        if let Some(CopyState::InFlight {
                            deadline: d,
                            querying,
                            ..
                        }) = self
                            .entries
                            .get_mut(&offset)
                            .map(|e| &mut e.copies[k].state)
                        {
                            *d = deadline;
                            *querying = false;
                            self.timers.push(Reverse((deadline, offset)));
                        }
                    }
                    other => {
                        let pod = self.release_member(offset, k);
                        let why = match other {
                            Err(e) => format!("ack timeout, consumer sidecar unreachable: {e}"),
                            _ => "ack timeout, delivery unknown to the consumer sidecar".into(),
                        };
                        tracing::info!(subscription = %self.sub, offset, attempt, pod = %pod, "{why}; redelivering");
                        self.note(offset, k, format!("{attempt}@{pod}:{why}"));
                        self.retry(offset, k, None, true);
                    }
                }
            }
            Event::DeadLettered {
                offset,
                copy,
                result,
            } => {
                let Some(e) = self.entries.get_mut(&offset) else {
                    return;
                };
                match result {
                    Ok(()) => {
                        let dead_lettered = if expired(e) {
                            Outcome::Expired {
                                dead_lettered: true,
                            }
                        } else {
                            Outcome::DeadLettered
                        };
                        e.copies[copy].state = CopyState::Done(dead_lettered);
                        self.counters.dead_lettered.inc();
                        self.maybe_finish(offset);
                    }
                    Err(err) => {
                        tracing::warn!(subscription = %self.sub, offset, error = %err, "dead-letter publish failed; retrying");
                        let at = Instant::now() + DLQ_RETRY;
                        e.copies[copy].state = CopyState::DeadLetterWait(at);
                        self.timers.push(Reverse((at, offset)));
                    }
                }
            }
            Event::Setup(setup) => self.apply_setup(setup),
        }
    }

    /// Whether `settled` names the message held at its offset and this process's
    /// incarnation. Offsets are reused (a `Memory` topic after a restart, a `DiskAsync`
    /// log after a power loss, a pod that lost its disk): a consumer may answer for the
    /// message that held the offset before, or for a delivery of an earlier process, and
    /// that must not settle the message held now. Such a settlement is counted and
    /// ignored; the delivery held now is settled by its own answer or its ack timeout.
    ///
    /// A settlement without names (incarnation 0, which no sidecar draws) comes from a
    /// consumer sidecar of an older version during a rolling upgrade: it is taken by offset
    /// as before, rather than leaving every delivery to such a peer to wait out `ackWait`.
    fn names_held(&self, settled: &Settled) -> bool {
        let held = self
            .entries
            .get(&settled.offset)
            .map(|e| e.message.id.as_str());
        let incarnation = self.engine.identity.incarnation;
        if settled.incarnation == 0
            || (held == Some(settled.message_id.as_str()) && settled.incarnation == incarnation)
        {
            return true;
        }
        self.counters.mismatched.inc();
        tracing::debug!(
            subscription = %self.sub,
            offset = settled.offset,
            attempt = settled.attempt,
            message_id = %settled.message_id,
            held = held.unwrap_or_default(),
            incarnation = settled.incarnation,
            mine = incarnation,
            "settlement of another message or incarnation ignored"
        );
        false
    }

    /// A settlement from `from` of a delivery in flight to another member: whoever sent it
    /// may not settle it. It is ignored (as every settlement of nothing in flight there) and
    /// counted in `ferry_sidecar_peer_denied_total{rpc="Settled"}`. A late answer of an
    /// earlier attempt names another attempt and is not counted; nor is anything of a
    /// `Broadcast` group, whose members all get the same attempt of a message (its copies
    /// are pinned), so that a member's repeated answer is not taken for a forgery.
    fn count_misdirected(&self, from: &str, settled: &Settled) {
        let elsewhere = self.entries.get(&settled.offset).is_some_and(|e| {
            e.copies.iter().any(|c| {
                c.attempt == settled.attempt
                    && c.pinned.is_none()
                    && matches!(&c.state, CopyState::InFlight { addr, .. } if &**addr != from)
            })
        });
        if elsewhere {
            self.engine.metrics.denied("Settled");
            tracing::debug!(subscription = %self.sub, offset = settled.offset, %from,
                "settlement of a delivery that went to another member ignored");
        }
    }

    pub(super) fn find_in_flight(&self, offset: Offset, from: &str, attempt: u32) -> Option<usize> {
        let e = self.entries.get(&offset)?;
        e.copies.iter().position(|c| {
            c.attempt == attempt
                && matches!(&c.state, CopyState::InFlight { addr, .. } if &**addr == from)
        })
    }

    /// Frees the member slot of an in-flight copy; returns the member's pod.
    pub(super) fn release_member(&mut self, offset: Offset, k: usize) -> String {
        let Some(CopyState::InFlight { pod, .. }) =
            self.entries.get(&offset).map(|e| &e.copies[k].state)
        else {
            return String::new();
        };
        let pod = pod.clone();
        if let Some(m) = self.members.iter_mut().find(|m| m.pod == pod) {
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        pod
    }

    pub(super) fn note(&mut self, offset: Offset, k: usize, what: String) {
        if let Some(e) = self.entries.get_mut(&offset) {
            let c = &mut e.copies[k];
            c.reason = what.clone();
            c.history.push(what);
        }
    }

    pub(super) fn acked(&mut self, offset: Offset, k: usize) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        e.copies[k].state = CopyState::Done(Outcome::Acked);
        self.counters.acked.inc();
        let age_ms = now_ms().saturating_sub(e.message.publish_time_ms);
        self.counters.latency.observe(age_ms as f64 / 1000.0);
        self.maybe_finish(offset);
    }

    /// Schedules another delivery of copy `k`, or gives up after maxDeliveries.
    pub(super) fn retry(
        &mut self,
        offset: Offset,
        k: usize,
        delay: Option<Duration>,
        counts: bool,
    ) {
        let sub = &self.setup.subscription;
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        let c = &mut e.copies[k];
        if !counts {
            c.counted = c.counted.saturating_sub(1);
        }
        if sub.qos == Qos::AtMostOnce {
            c.state = CopyState::Done(Outcome::Dropped);
            self.counters.dropped.inc();
            self.maybe_finish(offset);
            return;
        }
        if counts && c.counted >= sub.max_deliveries {
            let reason = format!(
                "maxDeliveries ({}) reached; last: {}",
                sub.max_deliveries, c.reason
            );
            self.give_up(offset, k, reason);
            return;
        }
        let now = Instant::now();
        let at = now + delay.unwrap_or_else(|| backoff_for(sub, c.counted.max(1)));
        c.state = CopyState::Waiting(at);
        if !self.try_park(offset, now) {
            self.timers.push(Reverse((at, offset)));
        }
    }

    /// Dead-letters copy `k` (or drops it when the subscription has no dead-letter topic).
    pub(super) fn give_up(&mut self, offset: Offset, k: usize, reason: String) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        if e.copies.is_empty() {
            e.copies.push(Copy::new(None, u32::from(e.recovered)));
        }
        let Some(c) = e.copies.get_mut(k) else { return };
        match self
            .setup
            .subscription
            .dead_letter_topic
            .clone()
            .filter(|_| self.setup.dead_letter_known)
        {
            Some(dlq) => {
                c.state = CopyState::DeadLettering;
                let message = dead_letter(
                    &e.message,
                    &self.topic,
                    &self.sub,
                    &reason,
                    &c.history,
                    now_ms(),
                );
                let engine = self.engine.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = engine
                        .publish_internal(&dlq, message)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Event::DeadLettered {
                        offset,
                        copy: k,
                        result,
                    });
                });
            }
            None => {
                tracing::warn!(subscription = %self.sub, offset, %reason, "dropping message: no dead-letter topic");
                let is_expired = expired(e);
                let Some(c) = e.copies.get_mut(k) else { return };
                c.state = CopyState::Done(if is_expired {
                    Outcome::Expired {
                        dead_lettered: false,
                    }
                } else {
                    Outcome::Dropped
                });
                self.counters.dropped.inc();
                self.maybe_finish(offset);
            }
        }
    }

    pub(super) fn maybe_finish(&mut self, offset: Offset) {
        let Some(e) = self.entries.get(&offset) else {
            return;
        };
        if e.copies.is_empty()
            || !e
                .copies
                .iter()
                .all(|c| matches!(c.state, CopyState::Done(_)))
        {
            return;
        }
        // A broadcast group's copies: the worst outcome speaks for the subscription.
        let how = e
            .copies
            .iter()
            .map(|c| match c.state {
                CopyState::Done(s) => s,
                _ => Outcome::Acked,
            })
            .max_by_key(|s| s.severity())
            .unwrap_or(Outcome::Acked);
        let removed = self.entries.remove(&offset);
        if let Some(e) = &removed {
            self.entry_bytes = self.entry_bytes.saturating_sub(e.message.payload.len());
        }
        if let Some(e) = removed
            && let Some(k) = e.message.key
        {
            if self.key_busy.get(&k) == Some(&offset) {
                self.key_busy.remove(&k);
            }
            if let Some(offsets) = self.by_key.get_mut(&k) {
                offsets.remove(&offset);
                // The next message of this key may go now.
                match offsets.first() {
                    Some(next) => {
                        self.ready.insert(*next);
                    }
                    None => {
                        self.by_key.remove(&k);
                    }
                }
            }
            self.refill_key(&k);
        }
        self.ready.remove(&offset);
        self.settles.push((self.sub.clone(), offset, how));
    }
}

/// Whether `e`'s TTL or `retention.maxAge` has passed.
fn expired(e: &super::Entry) -> bool {
    e.expires.is_some_and(|(t, _)| t <= Instant::now())
}
