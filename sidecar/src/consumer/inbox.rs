//! One subscription's deliveries on the consuming sidecar: the queue waiting for credit,
//! the deliveries handed to the app, the app's sessions and their credit, and what was
//! settled recently (to answer late acks precisely and the producer's `QueryDelivery`).
//!
//! Pure state: methods return the settlements to send back to producers, which the caller
//! sends after releasing the lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::proto::v1::{Delivery, DeliveryState, Outcome, Settled};
use tokio::sync::mpsc;

use super::ReplyTo;
use crate::log::Offset;

/// How many settled delivery ids are remembered for precise "expired"/"already settled"
/// answers.
const FINISHED_MEMORY: usize = 100_000;
/// How long an acked (producer, offset) is remembered for `QueryDelivery`.
const ACKED_MEMORY: Duration = Duration::from_secs(600);

/// Why a delivery id is no longer valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Acked,
    Nacked,
    Expired,
    Superseded,
    Returned,
}

impl Finish {
    /// The text of the NOT_FOUND answer to a late ack or nack.
    pub fn why(self) -> &'static str {
        match self {
            Finish::Acked => "it was already acked",
            Finish::Nacked => "it was already nacked",
            Finish::Expired => "its ackWait passed and it was returned for redelivery",
            Finish::Superseded => "it was superseded by a redelivery of the same message",
            Finish::Returned => {
                "the consume stream that received it closed and it was returned for redelivery"
            }
        }
    }
}

#[derive(Debug)]
enum HeldState {
    Queued { since: Instant },
    Handed { session: u64, deadline: Instant },
}

#[derive(Debug)]
struct Held {
    reply: ReplyTo,
    producer: Arc<str>,
    offset: Offset,
    attempt: u32,
    ack_wait: Duration,
    message_id: String,
    /// The delivery to hand out; taken when handed.
    delivery: Option<Delivery>,
    state: HeldState,
}

#[derive(Debug)]
struct Session {
    id: u64,
    credit: u64,
    tx: mpsc::UnboundedSender<Delivery>,
    nack_on_close: bool,
}

/// A settlement to send to a producer.
#[derive(Debug)]
pub struct Reply {
    pub to: ReplyTo,
    pub settled: Settled,
}

/// A delivery arriving for this subscription.
#[derive(Debug)]
pub struct Arrival {
    pub seq: u64,
    pub reply: ReplyTo,
    pub producer: Arc<str>,
    pub offset: Offset,
    pub attempt: u32,
    pub ack_wait: Duration,
    pub delivery: Delivery,
}

/// State of one subscription's inbox.
#[derive(Debug, Default)]
pub struct InboxState {
    subscription: Arc<str>,
    held: HashMap<u64, Held>,
    by_origin: HashMap<(Arc<str>, Offset), u64>,
    queue: VecDeque<u64>,
    sessions: Vec<Session>,
    rr: usize,
    finished: HashMap<u64, Finish>,
    finished_order: VecDeque<u64>,
    acked_origins: HashMap<(Arc<str>, Offset), Instant>,
    /// ExactlyOnce: message ids the app acked, with when.
    acked_ids: HashMap<String, Instant>,
    pub exactly_once_window: Option<Duration>,
    /// Deliveries handed to the app since the last call of `take_handed`.
    handed: u64,
}

fn settled(
    subscription: &str,
    offset: Offset,
    attempt: u32,
    outcome: Outcome,
    delay_ms: u64,
    reason: &str,
) -> Settled {
    Settled {
        subscription: subscription.to_owned(),
        offset,
        attempt,
        outcome: outcome as i32,
        delay_ms,
        reason: reason.to_owned(),
    }
}

impl InboxState {
    /// Empty state for `subscription`.
    pub fn new(subscription: Arc<str>) -> Self {
        Self {
            subscription,
            ..Self::default()
        }
    }

    fn reply(&self, h: &Held, outcome: Outcome, delay_ms: u64, reason: &str) -> Reply {
        Reply {
            to: h.reply.clone(),
            settled: settled(
                &self.subscription,
                h.offset,
                h.attempt,
                outcome,
                delay_ms,
                reason,
            ),
        }
    }

    fn finish(&mut self, seq: u64, how: Finish) -> Option<Held> {
        let h = self.held.remove(&seq)?;
        if self.by_origin.get(&(h.producer.clone(), h.offset)) == Some(&seq) {
            self.by_origin.remove(&(h.producer.clone(), h.offset));
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
            if self.exactly_once_window.is_some()
                && self.acked_ids.contains_key(&a.delivery.message_id)
            {
                out.push(Reply {
                    to: a.reply,
                    settled: settled(
                        &self.subscription,
                        a.offset,
                        a.attempt,
                        Outcome::Acked,
                        0,
                        "already acked (ExactlyOnce)",
                    ),
                });
                continue;
            }
            let origin = (a.producer.clone(), a.offset);
            if let Some(old) = self.by_origin.get(&origin).copied() {
                // A redelivery of a message we still hold: the older delivery id is void.
                self.finish(old, Finish::Superseded);
                self.queue.retain(|s| *s != old);
            }
            self.by_origin.insert(origin, a.seq);
            self.held.insert(
                a.seq,
                Held {
                    reply: a.reply,
                    producer: a.producer,
                    offset: a.offset,
                    attempt: a.attempt,
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
                out.push(self.reply(&h, Outcome::Nacked, 0, "consume stream closed before ack"));
            }
        }
    }

    /// Acks (`nack = None`) or nacks (`Some(delay)`) a delivery handed out.
    pub fn settle(
        &mut self,
        seq: u64,
        nack: Option<u64>,
        now: Instant,
        out: &mut Vec<Reply>,
    ) -> Result<(), Finish> {
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
                        self.acked_origins
                            .insert((h.producer.clone(), h.offset), now);
                        if self.exactly_once_window.is_some() {
                            self.acked_ids.insert(h.message_id.clone(), now);
                        }
                        out.push(self.reply(&h, Outcome::Acked, 0, ""));
                    }
                    Some(delay) => {
                        out.push(self.reply(&h, Outcome::Nacked, delay, "nacked by the app"))
                    }
                }
                Ok(())
            }
            None => Err(self.finished.get(&seq).copied().unwrap_or(Finish::Returned)),
        }
    }

    /// Whether `seq` was issued and settled (for telling "expired" from "unknown").
    pub fn finished(&self, seq: u64) -> Option<Finish> {
        self.finished.get(&seq).copied()
    }

    /// What the producer's sidecar asks before redelivering.
    pub fn query(&self, producer: &str, offset: Offset, attempt: u32) -> DeliveryState {
        let key = (Arc::<str>::from(producer), offset);
        if self.acked_origins.contains_key(&key) {
            return DeliveryState::Acked;
        }
        match self.by_origin.get(&key).and_then(|s| self.held.get(s)) {
            Some(h) if h.attempt == attempt => DeliveryState::InProgress,
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
                out.push(self.reply(&h, Outcome::Nacked, 0, "ackWait passed on the consumer"));
            }
        }
        if !stale.is_empty() {
            self.queue.retain(|s| !stale.contains(s));
            for seq in stale {
                if let Some(h) = self.finish(seq, Finish::Returned) {
                    out.push(self.reply(
                        &h,
                        Outcome::Rejected,
                        0,
                        "no consume session took it within ackWait",
                    ));
                }
            }
        }
        self.acked_origins
            .retain(|_, at| now.duration_since(*at) < ACKED_MEMORY);
        if let Some(w) = self.exactly_once_window {
            self.acked_ids.retain(|_, at| now.duration_since(*at) < w);
        }
    }

    /// Returns every held delivery to its producer (shutdown, subscription gone).
    pub fn return_all(&mut self, reason: &str, out: &mut Vec<Reply>) {
        let all: Vec<u64> = self.held.keys().copied().collect();
        self.queue.clear();
        for seq in all {
            if let Some(h) = self.finish(seq, Finish::Returned) {
                out.push(self.reply(&h, Outcome::Rejected, 0, reason));
            }
        }
    }

    /// Deliveries held (queued or handed out).
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(seq: u64, offset: Offset, attempt: u32) -> Arrival {
        Arrival {
            seq,
            reply: ReplyTo::Remote("ns/producer".into()),
            producer: "ns/producer".into(),
            offset,
            attempt,
            ack_wait: Duration::from_secs(10),
            delivery: Delivery {
                delivery_id: format!("d{seq}"),
                message_id: format!("m{offset}"),
                ..Default::default()
            },
        }
    }

    #[test]
    fn credits_bound_what_is_handed_out() {
        let now = Instant::now();
        let mut s = InboxState::new("ns/sub".into());
        let mut out = Vec::new();
        s.accept((0..5).map(|i| arrival(i, i, 1)).collect(), now, &mut out);
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.open_session(1, 2, tx, true, now);
        assert_eq!(s.take_handed(), 2);
        assert_eq!(rx.try_recv().unwrap().delivery_id, "d0");
        assert_eq!(rx.try_recv().unwrap().delivery_id, "d1");
        assert!(rx.try_recv().is_err());
        s.add_credit(1, 10, now);
        assert_eq!(s.take_handed(), 3);
        assert!(out.is_empty());
    }

    #[test]
    fn ack_once_then_precise_errors() {
        let now = Instant::now();
        let mut s = InboxState::new("ns/sub".into());
        let mut out = Vec::new();
        s.accept(vec![arrival(7, 0, 1)], now, &mut out);
        let (tx, _rx) = mpsc::unbounded_channel();
        s.open_session(1, 1, tx, true, now);
        assert_eq!(s.query("ns/producer", 0, 1), DeliveryState::InProgress);
        s.settle(7, None, now, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].settled.outcome, Outcome::Acked as i32);
        assert_eq!(s.settle(7, None, now, &mut out), Err(Finish::Acked));
        assert_eq!(out.len(), 1, "no double settle");
        assert_eq!(s.query("ns/producer", 0, 1), DeliveryState::Acked);
        assert_eq!(s.query("ns/producer", 1, 1), DeliveryState::Unknown);
    }

    #[test]
    fn expiry_nacks_and_late_ack_is_refused() {
        let now = Instant::now();
        let mut s = InboxState::new("ns/sub".into());
        let mut out = Vec::new();
        s.accept(vec![arrival(1, 0, 1)], now, &mut out);
        let (tx, _rx) = mpsc::unbounded_channel();
        s.open_session(1, 1, tx, true, now);
        s.sweep(now + Duration::from_secs(11), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].settled.outcome, Outcome::Nacked as i32);
        assert_eq!(s.settle(1, None, now, &mut out), Err(Finish::Expired));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn redelivery_supersedes_and_closing_returns() {
        let now = Instant::now();
        let mut s = InboxState::new("ns/sub".into());
        let mut out = Vec::new();
        let (tx, _rx) = mpsc::unbounded_channel();
        s.open_session(1, 10, tx, true, now);
        s.accept(vec![arrival(1, 0, 1)], now, &mut out);
        s.accept(vec![arrival(2, 0, 2)], now, &mut out);
        assert_eq!(s.finished(1), Some(Finish::Superseded));
        assert_eq!(s.held_len(), 1);
        s.close_session(1, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].settled.attempt, 2);
        assert_eq!(s.held_len(), 0);
    }

    #[test]
    fn exactly_once_suppresses_acked_ids() {
        let now = Instant::now();
        let mut s = InboxState::new("ns/sub".into());
        s.exactly_once_window = Some(Duration::from_secs(60));
        let mut out = Vec::new();
        let (tx, _rx) = mpsc::unbounded_channel();
        s.open_session(1, 10, tx, true, now);
        s.accept(vec![arrival(1, 0, 1)], now, &mut out);
        s.settle(1, None, now, &mut out).unwrap();
        // The producer lost the ack and redelivers: answered at once, not handed out.
        s.accept(vec![arrival(2, 0, 2)], now, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(s.take_handed(), 1);
    }
}
