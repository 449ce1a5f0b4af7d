//! One subscription's deliveries on the consuming sidecar: the queue waiting for credit,
//! the deliveries handed to the app, the app's sessions and their credit, and what was
//! settled recently (to answer late acks precisely and the producer's `QueryDelivery`).
//!
//! Pure state: methods return the settlements to send back to producers, which the caller
//! sends after releasing the lock.

use std::collections::VecDeque;

// Seeded per process, several times faster than SipHash on these per-delivery lookups.
use foldhash::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::proto::v1::{Delivery, DeliveryState, Outcome};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::acked::{AckedOrigins, Origin};
use super::acked_ids::AckedIds;
pub use super::held::{Arrival, Finish, Reply};
use super::held::{Held, HeldState, Name, Twin, settled};
use crate::log::Offset;

/// Settled delivery ids remembered, for precise "expired"/"already settled" answers.
const FINISHED_MEMORY: usize = 100_000;

/// Deliveries one subscription's inbox holds at most (waiting for credit or with the app).
/// Each producer sends at most `maxInFlight` per member, but nothing bounds how many
/// producers (or callers) send: past this, a delivery is refused (`REJECTED`, and its
/// producer retries it later or elsewhere) instead of growing the inbox without bound.
pub const MAX_HELD: usize = 16_384;

/// Re-linked attempt numbers kept per held delivery (see `Held::earlier`).
const MAX_EARLIER_ATTEMPTS: usize = 4;

#[derive(Debug)]
struct Session {
    id: u64,
    credit: u64,
    tx: mpsc::UnboundedSender<Delivery>,
    nack_on_close: bool,
}

/// State of one subscription's inbox.
#[derive(Debug, Default)]
pub struct InboxState {
    subscription: Arc<str>,
    held: HashMap<u64, Held>,
    by_origin: HashMap<Origin, u64>,
    queue: VecDeque<u64>,
    sessions: Vec<Session>,
    rr: usize,
    finished: HashMap<u64, Finish>,
    finished_order: VecDeque<u64>,
    /// Acked (producer, offset) pairs, to answer repeats and `QueryDelivery`.
    acked_origins: AckedOrigins,
    /// ExactlyOnce: message ids the app acked, with when they are forgotten (bounded).
    acked_ids: AckedIds,
    /// ExactlyOnce: the held delivery of each message id, for linking other origins' copies.
    held_ids: HashMap<String, u64>,
    pub exactly_once_window: Option<Duration>,
    /// Deliveries handed to the app since the last call of `take_handed`.
    handed: u64,
}

impl InboxState {
    /// Empty state for `subscription`.
    pub fn new(subscription: Arc<str>) -> Self {
        Self {
            subscription,
            ..Self::default()
        }
    }

    /// Answers every attempt of `h` that its producer's current process may wait for:
    /// those of the latest incarnation (an earlier process of the producer is gone, and
    /// its attempts would only be ignored), and every twin.
    fn reply(&self, h: &Held, outcome: Outcome, delay_ms: u64, reason: &str, out: &mut Vec<Reply>) {
        let current = (h.incarnation, h.attempt);
        let attempts = h.earlier.iter().chain(std::iter::once(&current));
        for &(incarnation, attempt) in attempts.filter(|(i, _)| *i == h.incarnation) {
            let name = Name {
                offset: h.offset,
                attempt,
                message_id: &h.message_id,
                incarnation,
            };
            out.push(Reply {
                to: h.reply.clone(),
                settled: settled(&self.subscription, name, outcome, delay_ms, reason),
            });
        }
        for t in &h.twins {
            let name = Name {
                offset: t.offset,
                attempt: t.attempt,
                message_id: &h.message_id,
                incarnation: t.incarnation,
            };
            out.push(Reply {
                to: t.reply.clone(),
                settled: settled(&self.subscription, name, outcome, delay_ms, reason),
            });
        }
    }

    fn finish(&mut self, seq: u64, how: Finish) -> Option<Held> {
        let h = self.held.remove(&seq)?;
        let origins = std::iter::once((h.producer.clone(), h.offset))
            .chain(h.twins.iter().map(|t| (t.producer.clone(), t.offset)));
        for origin in origins {
            if self.by_origin.get(&origin) == Some(&seq) {
                self.by_origin.remove(&origin);
            }
        }
        if self.held_ids.get(&h.message_id) == Some(&seq) {
            self.held_ids.remove(&h.message_id);
        }
        self.finished.insert(seq, how);
        self.finished_order.push_back(seq);
        while self.finished_order.len() > FINISHED_MEMORY {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
        Some(h)
    }

    /// Takes deliveries in; returns immediate answers (ExactlyOnce repeats).
    pub fn accept(&mut self, arrivals: Vec<Arrival>, now: Instant, out: &mut Vec<Reply>) {
        for a in arrivals {
            if self.exactly_once_window.is_some() && self.acked_ids.contains(&a.delivery.message_id)
            {
                let settled = settled(
                    &self.subscription,
                    a.name(),
                    Outcome::Acked,
                    0,
                    "already acked (ExactlyOnce)",
                );
                out.push(Reply {
                    to: a.reply,
                    settled,
                });
                continue;
            }
            let origin = (a.producer.clone(), a.offset);
            if self.acked_origins.acked(&origin, &a.delivery.message_id) {
                // The app acked it already; the producer lost the ack (a broken stream, or
                // a restart after kill -9). Answer again instead of handing out a copy.
                let settled = settled(
                    &self.subscription,
                    a.name(),
                    Outcome::Acked,
                    0,
                    "already acked",
                );
                out.push(Reply {
                    to: a.reply,
                    settled,
                });
                continue;
            }
            if let Some(old) = self.by_origin.get(&origin).copied() {
                if self.relink(old, &a) {
                    continue;
                }
                // Same origin, another message: the producer lost its log and numbers
                // from 0 again. The older delivery id is void.
                self.finish(old, Finish::Superseded);
                self.queue.retain(|s| *s != old);
            }
            if self.held.len() >= MAX_HELD {
                let reason = format!("inbox full: {MAX_HELD} deliveries held for the app");
                let settled = settled(&self.subscription, a.name(), Outcome::Rejected, 0, &reason);
                out.push(Reply {
                    to: a.reply,
                    settled,
                });
                continue;
            }
            if self.exactly_once_window.is_some() {
                if let Some(&held) = self.held_ids.get(&a.delivery.message_id)
                    && let Some(h) = self.held.get_mut(&held)
                {
                    // The same message from another origin while the app has it: one copy
                    // for the app, one settlement for both.
                    h.twins.push(Twin {
                        reply: a.reply,
                        producer: a.producer,
                        offset: a.offset,
                        attempt: a.attempt,
                        incarnation: a.incarnation,
                    });
                    self.by_origin.insert(origin, held);
                    continue;
                }
                self.held_ids.insert(a.delivery.message_id.clone(), a.seq);
            }
            self.by_origin.insert(origin, a.seq);
            self.held.insert(
                a.seq,
                Held {
                    reply: a.reply,
                    producer: a.producer,
                    offset: a.offset,
                    attempt: a.attempt,
                    incarnation: a.incarnation,
                    earlier: Vec::new(),
                    twins: Vec::new(),
                    ack_wait: a.ack_wait,
                    message_id: a.delivery.message_id.clone(),
                    delivery: Some(a.delivery),
                    state: HeldState::Queued { since: now },
                },
            );
            self.queue.push_back(a.seq);
        }
        self.pump(now);
    }

    /// A repeat of a delivery still held (queued or handed to the app) becomes its new
    /// upstream: settlements go to the repeat's stream with its attempt number, and the app
    /// keeps the copy it has, under the same delivery id, instead of getting a second one.
    /// A producer repeats a delivery it still holds after a restart (it cannot know what
    /// the previous process sent), or after an ack timeout when this sidecar did not answer
    /// its query. False if `old` is another message (see `accept`): the same offset names
    /// the same message only with the same message id. The incarnation may differ (a
    /// restarted producer resending what its log held): that is still the message the app
    /// has, now awaited by the new process.
    fn relink(&mut self, old: u64, a: &Arrival) -> bool {
        let Some(h) = self.held.get_mut(&old) else {
            return false;
        };
        if h.message_id != a.delivery.message_id {
            return false;
        }
        if let Some(t) = h
            .twins
            .iter_mut()
            .find(|t| t.producer == a.producer && t.offset == a.offset)
        {
            // A repeat from a twin's origin: answer it where it now waits.
            t.reply = a.reply.clone();
            t.attempt = a.attempt;
            t.incarnation = a.incarnation;
            return true;
        }
        h.reply = a.reply.clone();
        let named = (a.incarnation, a.attempt);
        if named != (h.incarnation, h.attempt) && !h.earlier.contains(&named) {
            if h.earlier.len() >= MAX_EARLIER_ATTEMPTS {
                h.earlier.remove(0);
            }
            h.earlier.push((h.incarnation, h.attempt));
            h.incarnation = a.incarnation;
            h.attempt = a.attempt;
        }
        h.ack_wait = a.ack_wait;
        if let Some(d) = &mut h.delivery {
            // Not handed out yet: the app sees the highest attempt number it was sent with.
            d.attempt = d.attempt.max(a.attempt);
        }
        true
    }

    /// Hands queued deliveries to sessions with credit, round robin.
    pub fn pump(&mut self, now: Instant) {
        while let Some(&seq) = self.queue.front() {
            let n = self.sessions.len();
            let Some(k) = (0..n)
                .map(|i| (self.rr + i) % n.max(1))
                .find(|&k| self.sessions[k].credit > 0)
            else {
                return;
            };
            self.queue.pop_front();
            let Some(h) = self.held.get_mut(&seq) else {
                continue;
            };
            let Some(delivery) = h.delivery.take() else {
                continue;
            };
            let session = &mut self.sessions[k];
            match session.tx.send(delivery) {
                Ok(()) => {
                    session.credit -= 1;
                    h.state = HeldState::Handed {
                        session: session.id,
                        deadline: now + h.ack_wait,
                    };
                    self.handed += 1;
                    self.rr = k + 1;
                }
                Err(mpsc::error::SendError(delivery)) => {
                    // The session's receiver is gone: forget it, keep the delivery.
                    h.delivery = Some(delivery);
                    self.sessions.remove(k);
                    self.queue.push_front(seq);
                }
            }
        }
    }

    /// Remembers ids the app acked before a restart (ExactlyOnce), each until its instant.
    pub fn seed_acked(&mut self, ids: Vec<(String, Instant)>) {
        for (id, until) in ids {
            self.acked_ids.insert(&id, until);
        }
    }

    /// `namespace/name` of the subscription.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Bounds the ExactlyOnce acked ids (see `acked_ids.rs`).
    pub fn limit_acked_ids(&mut self, max: usize, size: Gauge, evicted: Counter) {
        self.acked_ids.limit(max, size, evicted);
    }

    /// Deliveries handed out since the last call.
    pub fn take_handed(&mut self) -> u64 {
        std::mem::take(&mut self.handed)
    }

    /// Adds a session with `credit`.
    pub fn open_session(
        &mut self,
        id: u64,
        credit: u64,
        tx: mpsc::UnboundedSender<Delivery>,
        nack_on_close: bool,
        now: Instant,
    ) {
        self.sessions.push(Session {
            id,
            credit,
            tx,
            nack_on_close,
        });
        self.pump(now);
    }

    /// Grants `n` more deliveries to session `id`.
    pub fn add_credit(&mut self, id: u64, n: u64, now: Instant) {
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == id) {
            s.credit = s.credit.saturating_add(n);
        }
        self.pump(now);
    }

    /// Removes session `id`; deliveries it holds go back to their producers if it asked so.
    pub fn close_session(&mut self, id: u64, out: &mut Vec<Reply>) {
        let Some(pos) = self.sessions.iter().position(|s| s.id == id) else {
            return;
        };
        let s = self.sessions.remove(pos);
        if !s.nack_on_close {
            return;
        }
        let mine: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h.state, HeldState::Handed { session, .. } if session == id))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in mine {
            if let Some(h) = self.finish(seq, Finish::Returned) {
                self.reply(
                    &h,
                    Outcome::Nacked,
                    0,
                    "consume stream closed before ack",
                    out,
                );
            }
        }
    }

    /// Acks (`nack = None`) or nacks (`Some(delay)`) a delivery handed out. An ExactlyOnce
    /// ack returns its message id: the caller persists it before sending the replies.
    pub fn settle(
        &mut self,
        seq: u64,
        nack: Option<u64>,
        now: Instant,
        out: &mut Vec<Reply>,
    ) -> Result<Option<String>, Finish> {
        if let Some(h) = self.held.get(&seq)
            && matches!(h.state, HeldState::Queued { .. })
        {
            // Never handed out, so nobody could have the id: treat it as unknown.
            return Err(Finish::Returned);
        }
        let how = if nack.is_some() {
            Finish::Nacked
        } else {
            Finish::Acked
        };
        match self.finish(seq, how) {
            Some(h) => {
                match nack {
                    None => {
                        self.acked_origins.insert(
                            (h.producer.clone(), h.offset),
                            &h.message_id,
                            now,
                        );
                        for t in &h.twins {
                            self.acked_origins.insert(
                                (t.producer.clone(), t.offset),
                                &h.message_id,
                                now,
                            );
                        }
                        self.reply(&h, Outcome::Acked, 0, "", out);
                        if let Some(w) = self.exactly_once_window {
                            self.acked_ids.insert(&h.message_id, now + w);
                            return Ok(Some(h.message_id));
                        }
                    }
                    Some(delay) => {
                        self.reply(&h, Outcome::Nacked, delay, "nacked by the app", out);
                    }
                }
                Ok(None)
            }
            None => Err(self.finished.get(&seq).copied().unwrap_or(Finish::Returned)),
        }
    }

    /// Whether `seq` was issued and settled (for telling "expired" from "unknown").
    pub fn finished(&self, seq: u64) -> Option<Finish> {
        self.finished.get(&seq).copied()
    }

    /// What the producer's sidecar asks before redelivering: about the message
    /// `message_id` it sent from `offset`, as `attempt` of its `incarnation`.
    ///
    /// ACKED only if the app acked that very message from that origin: an ack of another
    /// message once at the same offset (before the producer restarted and numbered from 0
    /// again) answers nothing. Any incarnation's delivery of the same message counts, as
    /// for a repeat (see `relink`). IN_PROGRESS only for the delivery held under that
    /// attempt and incarnation; anything else is UNKNOWN, and the producer redelivers.
    ///
    /// Incarnation 0 (which no sidecar draws) is a producer sidecar of an older version,
    /// during a rolling upgrade: it names no message, and is answered by offset as before,
    /// rather than with UNKNOWN and a redelivery of everything its app is working on.
    pub fn query(
        &self,
        producer: &str,
        offset: Offset,
        attempt: u32,
        message_id: &str,
        incarnation: u64,
    ) -> DeliveryState {
        let key = (Arc::<str>::from(producer), offset);
        let unnamed = incarnation == 0;
        if self.acked_origins.acked(&key, message_id)
            || (unnamed && self.acked_origins.contains(&key))
        {
            return DeliveryState::Acked;
        }
        let named = (incarnation, attempt);
        match self.by_origin.get(&key).and_then(|s| self.held.get(s)) {
            Some(h) if h.message_id != message_id && !unnamed => DeliveryState::Unknown,
            Some(h)
                if (h.producer == key.0 && h.offset == offset)
                    && ((h.incarnation, h.attempt) == named || h.earlier.contains(&named)) =>
            {
                DeliveryState::InProgress
            }
            Some(h)
                if h.twins.iter().any(|t| {
                    t.producer == key.0 && t.offset == offset && (t.incarnation, t.attempt) == named
                }) =>
            {
                DeliveryState::InProgress
            }
            _ => DeliveryState::Unknown,
        }
    }

    /// Expires deliveries past their ackWait and forgets old acks.
    pub fn sweep(&mut self, now: Instant, out: &mut Vec<Reply>) {
        let mut expired = Vec::new();
        let mut stale = Vec::new();
        for (seq, h) in &self.held {
            match h.state {
                HeldState::Handed { deadline, .. } if now >= deadline => expired.push(*seq),
                HeldState::Queued { since } if now.duration_since(since) >= h.ack_wait => {
                    stale.push(*seq)
                }
                _ => {}
            }
        }
        for seq in expired {
            if let Some(h) = self.finish(seq, Finish::Expired) {
                self.reply(
                    &h,
                    Outcome::Nacked,
                    0,
                    "ackWait passed on the consumer",
                    out,
                );
            }
        }
        if !stale.is_empty() {
            self.queue.retain(|s| !stale.contains(s));
            for seq in stale {
                if let Some(h) = self.finish(seq, Finish::Returned) {
                    self.reply(
                        &h,
                        Outcome::Rejected,
                        0,
                        "no consume session took it within ackWait",
                        out,
                    );
                }
            }
        }
        self.acked_origins.expire(now);
        self.acked_ids.expire(now);
    }

    /// Returns every held delivery to its producer (shutdown, subscription gone).
    pub fn return_all(&mut self, reason: &str, out: &mut Vec<Reply>) {
        let all: Vec<u64> = self.held.keys().copied().collect();
        self.queue.clear();
        for seq in all {
            if let Some(h) = self.finish(seq, Finish::Returned) {
                self.reply(&h, Outcome::Rejected, 0, reason, out);
            }
        }
    }

    /// Deliveries held (queued or handed out).
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
#[path = "inbox_tests.rs"]
mod tests;
