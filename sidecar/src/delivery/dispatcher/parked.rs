//! Parking: messages that cannot be sent for a while wait outside the window.
//!
//! The window (`WINDOW` messages, `WINDOW_BYTES` of payload) bounds what a dispatcher holds
//! in memory, and it is filled in offset order. A message that waits there for minutes
//! holds a place: 8,192 messages published or nacked with a long delay, or Broadcast
//! messages whose last copy waits for a member that is down, and nothing after them was
//! read, so nothing after them was delivered. The promise is key-scoped head-of-line only.
//!
//! So a message leaves the window when
//! - its first delivery is delayed, or every copy still to deliver backs off (a nack with a
//!   delay, a retry's backoff), for more than [`PARK_AFTER`]; it comes back when the
//!   earliest of them is due, or when it expires (TTL, `retention.maxAge`) if sooner;
//! - (Broadcast) every copy still to deliver is for a member that is in the group but not
//!   live; it comes back when liveness or membership changes;
//! - (ordered topics) more than [`KEY_WINDOW`] messages of its key are already held: only
//!   one message of a key is in flight at a time, so the rest of a hot key, or of a key
//!   whose head waits for ten minutes, would fill the window and hold up every other key.
//!   They are parked in offset order and come back, oldest first, as the key's held
//!   messages settle; a key with parked messages parks its newer ones too, so that the
//!   held messages of a key are always its oldest and order is kept.
//!
//! A parked message keeps its delivery state (attempts, history, deadlines), not its
//! payload: when it is due its record is read back from the log by offset. An ordered
//! topic's key stays busy while the message that holds it is parked, so later messages of
//! that key still wait (key-scoped). Messages waiting for room at a member (`maxInFlight`)
//! or, in a Unicast group, for any eligible member stay in the window: those hold every
//! message of the subscription alike, and parking them would free nothing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use ferry_api::crd::Ordering;

use super::{Copy, CopyState, Dispatcher, Entry, READ_BATCH, WINDOW};
use crate::log::{Offset, StoredMessage};

/// Waits shorter than this are left in the window (parking costs a read back).
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);
/// Most messages of one key held in the window (ordered topics).
pub(super) const KEY_WINDOW: usize = 64;

/// What a parked message keeps.
#[derive(Debug)]
struct Stub {
    copies: Vec<Copy>,
    not_before: Option<Instant>,
    expires: Option<(Instant, &'static str)>,
    recovered: bool,
    publish_time_ms: u64,
    /// When it is due by itself (its delay or backoff, or its expiry).
    at: Option<Instant>,
    /// Whether a change of membership or liveness makes it due.
    on_members: bool,
    /// Parked behind this key's held messages (ordered topics).
    behind_key: Option<String>,
}

/// The parked messages of one dispatcher.
#[derive(Debug, Default)]
pub(super) struct Parked {
    stubs: BTreeMap<Offset, Stub>,
    timers: BinaryHeap<Reverse<(Instant, Offset)>>,
    /// Parked messages to read back and return to the window.
    due: BTreeSet<Offset>,
    /// Ordered topics: messages parked behind their key's held ones, per key.
    by_key: foldhash::HashMap<String, BTreeSet<Offset>>,
}

impl Parked {
    /// When the next parked message falls due by itself.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Whether parked messages are waiting to be read back.
    pub(super) fn has_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Messages parked (`ferry_sidecar_parked_messages`).
    pub(super) fn len(&self) -> usize {
        self.stubs.len()
    }

    /// Publish time of the oldest parked message (for the oldest-age gauge).
    pub(super) fn oldest_publish_ms(&self) -> Option<u64> {
        self.stubs.values().next().map(|s| s.publish_time_ms)
    }
}

impl Dispatcher {
    /// Parks the message at `offset` if nothing can happen to it for a while; returns
    /// whether it did.
    pub(super) fn try_park(&mut self, offset: Offset, now: Instant) -> bool {
        let Some(e) = self.entries.get(&offset) else {
            return false;
        };
        if e.expires.is_some_and(|(t, _)| t <= now) {
            // Expired, but a copy still backs off: it is given up once that wait is over.
            return false;
        }
        let far = now + PARK_AFTER;
        let mut at: Option<Instant> = None;
        let mut on_members = false;
        if let Some(t) = e.not_before {
            if t <= far || !e.copies.is_empty() {
                return false;
            }
            at = Some(t);
        } else {
            let mut pending = false;
            for c in &e.copies {
                match &c.state {
                    CopyState::Done(_) => {}
                    CopyState::Waiting(t) if *t > far => {
                        pending = true;
                        at = Some(at.map_or(*t, |a| a.min(*t)));
                    }
                    CopyState::Idle if self.member_down(c.pinned.as_deref()) => {
                        pending = true;
                        on_members = true;
                    }
                    _ => return false,
                }
            }
            if !pending {
                return false;
            }
        }
        if let Some((t, _)) = e.expires {
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        let Some(entry) = self.entries.remove(&offset) else {
            return false;
        };
        let Entry {
            message,
            copies,
            not_before,
            expires,
            recovered,
        } = *entry;
        self.entry_bytes = self.entry_bytes.saturating_sub(message.payload.len());
        self.ready.remove(&offset);
        if let Some(k) = &message.key
            && self.key_busy.get(k) != Some(&offset)
            && let Some(offsets) = self.by_key.get_mut(k)
        {
            // Not holding its key: the key's later messages need not wait for it.
            offsets.remove(&offset);
            if offsets.is_empty() {
                self.by_key.remove(k);
            }
        }
        if let Some(t) = at {
            self.parked.timers.push(Reverse((t, offset)));
        }
        self.parked.stubs.insert(
            offset,
            Stub {
                copies,
                not_before,
                expires,
                recovered,
                publish_time_ms: message.publish_time_ms,
                at,
                on_members,
                behind_key: None,
            },
        );
        if let Some(k) = &message.key {
            self.refill_key(k);
        }
        true
    }

    /// Parks a message just read from the log behind the held messages of its key, if the
    /// key already holds [`KEY_WINDOW`] of them or has parked ones (ordered topics).
    pub(super) fn park_behind_key(&mut self, offset: Offset) {
        if self.setup.topic.ordering != Ordering::Key {
            return;
        }
        let Some(e) = self.entries.get(&offset) else {
            return;
        };
        let Some(k) = e.message.key.clone() else {
            return;
        };
        let held = self.by_key.get(&k).map_or(0, BTreeSet::len);
        let parked = self.parked.by_key.get(&k).is_some_and(|p| !p.is_empty());
        if (held <= KEY_WINDOW && !parked) || !e.copies.is_empty() {
            return;
        }
        let Some(entry) = self.entries.remove(&offset) else {
            return;
        };
        let Entry {
            message,
            copies,
            not_before,
            expires,
            recovered,
        } = *entry;
        self.entry_bytes = self.entry_bytes.saturating_sub(message.payload.len());
        self.ready.remove(&offset);
        if let Some(offsets) = self.by_key.get_mut(&k) {
            offsets.remove(&offset);
        }
        // Its expiry still ends it on time.
        let at = expires.map(|(t, _)| t);
        if let Some(t) = at {
            self.parked.timers.push(Reverse((t, offset)));
        }
        self.parked
            .by_key
            .entry(k.clone())
            .or_default()
            .insert(offset);
        self.parked.stubs.insert(
            offset,
            Stub {
                copies,
                not_before,
                expires,
                recovered,
                publish_time_ms: message.publish_time_ms,
                at,
                on_members: false,
                behind_key: Some(k),
            },
        );
    }

    /// Marks the oldest messages parked behind `key` due once few of its messages are held.
    pub(super) fn refill_key(&mut self, key: &str) {
        let held = self.by_key.get(key).map_or(0, BTreeSet::len);
        if held > KEY_WINDOW / 2 {
            return;
        }
        let Some(parked) = self.parked.by_key.get(key) else {
            return;
        };
        let wake: Vec<Offset> = parked.iter().take(KEY_WINDOW - held).copied().collect();
        self.parked.due.extend(wake);
    }

    /// Whether a copy pinned to `pod` waits for a member that is in the group but down.
    fn member_down(&self, pod: Option<&str>) -> bool {
        pod.is_some_and(|pod| self.members.iter().any(|m| m.pod == pod && !m.live))
    }

    /// Marks the parked messages whose time came as due.
    pub(super) fn wake_parked(&mut self, now: Instant) {
        while let Some(Reverse((at, offset))) = self.parked.timers.peek().copied() {
            if at > now {
                break;
            }
            self.parked.timers.pop();
            if self
                .parked
                .stubs
                .get(&offset)
                .is_some_and(|s| s.at == Some(at))
            {
                self.parked.due.insert(offset);
            }
        }
    }

    /// Marks the messages parked for a member as due: membership or liveness changed.
    pub(super) fn wake_members(&mut self) {
        let woken = self
            .parked
            .stubs
            .iter()
            .filter(|(_, s)| s.on_members)
            .map(|(o, _)| *o);
        self.parked.due.extend(woken);
    }

    /// Reads due parked messages back from the log into the window.
    pub(super) async fn readmit(&mut self) {
        let room = WINDOW.saturating_sub(self.entries.len()).min(READ_BATCH);
        let offsets: Vec<Offset> = self.parked.due.iter().take(room).copied().collect();
        if offsets.is_empty() {
            return;
        }
        let records = match self.store.read_at(self.sub.clone(), offsets.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(subscription = %self.sub, error = %e, "reading parked messages back failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        };
        let mut found = records.into_iter().peekable();
        for offset in offsets {
            self.parked.due.remove(&offset);
            let Some(stub) = self.parked.stubs.remove(&offset) else {
                continue;
            };
            if let Some(k) = &stub.behind_key
                && let Some(parked) = self.parked.by_key.get_mut(k)
            {
                parked.remove(&offset);
                if parked.is_empty() {
                    self.parked.by_key.remove(k);
                }
            }
            match found.next_if(|(o, _)| *o == offset) {
                Some((_, message)) => self.admit(offset, message, stub),
                None => {
                    // Settled or lost meanwhile: nothing is left to deliver.
                    tracing::debug!(subscription = %self.sub, offset, "parked message no longer in the log");
                }
            }
        }
    }

    fn admit(&mut self, offset: Offset, message: StoredMessage, stub: Stub) {
        let Stub {
            mut copies,
            not_before,
            expires,
            recovered,
            ..
        } = stub;
        let now = Instant::now();
        for c in &mut copies {
            // A copy whose wait is over goes through the usual choice of member again; one
            // still waiting (woken early by a member's return) keeps its time.
            if let CopyState::Waiting(t) = c.state {
                if t <= now {
                    c.state = CopyState::Idle;
                } else {
                    self.timers.push(Reverse((t, offset)));
                }
            }
        }
        if self.setup.topic.ordering == Ordering::Key
            && let Some(k) = &message.key
        {
            self.by_key.entry(k.clone()).or_default().insert(offset);
        }
        self.entry_bytes += message.payload.len();
        self.entries.insert(
            offset,
            Box::new(Entry {
                message,
                copies,
                not_before,
                expires,
                recovered,
            }),
        );
        self.ready.insert(offset);
    }
}
