//! Sending: choosing a member for each idle copy of a message and building its `Deliver`.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::crd::{Delivery, Ordering, Qos};
use ferry_api::proto::v1::{Deliver, PeerMessage};

use super::{Copy, CopyState, Dispatcher, LOCAL_ADDR, Outbox};
use crate::consumer::Incoming;
use crate::delivery::select;
use crate::log::{Offset, StoredMessage};
use crate::store::Outcome;

impl Dispatcher {
    /// Sends the idle copies of `offset` where they can go now.
    pub(super) fn dispatch_one(&mut self, offset: Offset, now: Instant, out: &mut Outbox) {
        let ordered = self.setup.topic.ordering == Ordering::Key;
        // Checks first, on a shared borrow; the entry stays in place while it is sent.
        let (expired, not_before, key) = match self.entries.get(&offset) {
            None => {
                self.ready.remove(&offset);
                return;
            }
            Some(entry) => (
                entry.expires.filter(|(t, _)| *t <= now),
                entry.not_before.filter(|t| *t > now),
                entry.message.key.clone().filter(|_| ordered),
            ),
        };
        if let Some((_, why)) = expired {
            self.expire(offset, why);
            return;
        }
        if let Some(t) = not_before {
            if !self.try_park(offset, now) {
                self.ready.remove(&offset);
                self.timers.push(Reverse((t, offset)));
            }
            return;
        }
        if let Some(k) = &key
            && self.key_busy.get(k).is_some_and(|o| *o != offset)
        {
            return;
        }
        let Some(entry) = self.entries.get_mut(&offset) else {
            return;
        };
        if entry.copies.is_empty() {
            let policy = self.setup.group.zone_policy;
            let zone = self.engine.placement.zone();
            let pinned: Vec<Option<String>> = match self.setup.group.delivery {
                Delivery::Unicast => vec![None],
                Delivery::Broadcast => select::broadcast_targets(&self.members, policy, &zone)
                    .into_iter()
                    .map(|i| Some(self.members[i].pod.clone()))
                    .collect(),
            };
            let prior = u32::from(entry.recovered);
            entry.copies = pinned.into_iter().map(|p| Copy::new(p, prior)).collect();
        }
        let max = self.setup.subscription.max_in_flight;
        let ack_wait = Duration::from_millis(self.setup.subscription.ack_wait_ms);
        let mut sent = false;
        for copy in &mut entry.copies {
            if !matches!(copy.state, CopyState::Idle) {
                continue;
            }
            let chosen = match &copy.pinned {
                Some(pod) => match self.members.iter().position(|m| &m.pod == pod) {
                    None => {
                        // The member left the group: its copy is void.
                        copy.state = CopyState::Done(Outcome::Acked);
                        continue;
                    }
                    Some(i) if self.members[i].live && self.members[i].in_flight < max => Some(i),
                    Some(_) => None,
                },
                None => {
                    let zone = self.engine.placement.zone();
                    let cands =
                        select::eligible(&self.members, self.setup.group.zone_policy, &zone);
                    match &key {
                        Some(k) => select::by_key(&self.members, &cands, k)
                            .filter(|i| self.members[*i].in_flight < max),
                        None => select::pick(
                            &self.members,
                            &cands,
                            self.setup.group.balancing,
                            max,
                            &mut self.rr,
                        ),
                    }
                }
            };
            let Some(i) = chosen else { continue };
            let member = &mut self.members[i];
            member.in_flight += 1;
            copy.attempt += 1;
            copy.counted += 1;
            let addr: Arc<str> = if member.local {
                LOCAL_ADDR.into()
            } else {
                member.address.as_str().into()
            };
            copy.state = CopyState::InFlight {
                addr: addr.clone(),
                pod: member.pod.clone(),
                deadline: now + ack_wait,
                querying: false,
            };
            self.timers.push(Reverse((now + ack_wait, offset)));
            self.counters.forwarded.inc();
            if copy.attempt > 1 {
                self.counters.redelivered.inc();
            }
            sent = true;
            let deliver = Deliver {
                subscription: String::from(&*self.sub),
                producer: String::from(&*self.engine.identity.producer_id),
                offset,
                attempt: copy.attempt,
                message: Some(peer_message(&entry.message)),
                topic: String::from(&*self.topic),
                ack_wait_ms: self.setup.subscription.ack_wait_ms,
                incarnation: self.engine.identity.incarnation,
            };
            if member.local {
                out.local.push(Incoming {
                    reply: self.local_reply.clone(),
                    deliver,
                });
            } else {
                let hint = out.hint;
                out.remote
                    .entry(addr)
                    .or_insert_with(|| Vec::with_capacity(hint))
                    .push(deliver);
            }
        }
        if !entry
            .copies
            .iter()
            .any(|c| matches!(c.state, CopyState::Idle))
        {
            self.ready.remove(&offset);
        }
        let copies = entry.copies.len();
        if let Some(k) = key.filter(|_| sent) {
            self.key_busy.insert(k, offset);
        }
        if sent && self.setup.subscription.qos == Qos::AtMostOnce {
            // Never redelivered: settled as soon as it is sent.
            for k in 0..copies {
                if self.release_member(offset, k).is_empty() {
                    continue;
                }
                if let Some(e) = self.entries.get_mut(&offset) {
                    e.copies[k].state = CopyState::Done(Outcome::Sent);
                }
            }
        }
        self.maybe_finish(offset);
        if !sent {
            // Its copies may all wait for members that are down (Broadcast).
            self.try_park(offset, now);
        }
    }
}

/// The wire form of a stored message as forwarded to a consumer: the producer applies the
/// delay before forwarding, so none travels with it.
pub fn peer_message(m: &StoredMessage) -> PeerMessage {
    PeerMessage {
        delay_ms: 0,
        ..crate::replica::to_wire(m)
    }
}
