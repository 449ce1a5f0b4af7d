//! What the inbox holds per delivery (`Held`, its `Twin`s from other origins), why a
//! delivery id ends (`Finish`), and the messages in and out of the inbox (`Arrival`,
//! `Reply`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::proto::v1::{Delivery, Outcome, Settled};

use super::ReplyTo;
use crate::log::Offset;

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
pub(super) enum HeldState {
    Queued { since: Instant },
    Handed { session: u64, deadline: Instant },
}

#[derive(Debug)]
pub(super) struct Held {
    pub(super) reply: ReplyTo,
    pub(super) producer: Arc<str>,
    pub(super) offset: Offset,
    pub(super) attempt: u32,
    /// The producer incarnation that sent `attempt`.
    pub(super) incarnation: u64,
    /// Other (incarnation, attempt) pairs of the same message that were re-linked here
    /// (repeats from a restarted producer, or a dead process's forward read late).
    /// Settlements answer each of the latest incarnation, so that whichever the current
    /// producer process waits for is answered; a producer ignores attempts it does not
    /// hold in flight, and those of another incarnation (which are kept only so that a
    /// late forward of a dead process is not taken for a new attempt).
    pub(super) earlier: Vec<(u64, u32)>,
    pub(super) ack_wait: Duration,
    pub(super) message_id: String,
    /// ExactlyOnce: copies of the same message id from other origins (a replica that took
    /// custody, a peer a backlog was handed to) that arrived while this one was held. The
    /// app gets one copy; its settlement answers every origin.
    pub(super) twins: Vec<Twin>,
    /// The delivery to hand out; taken when handed.
    pub(super) delivery: Option<Delivery>,
    pub(super) state: HeldState,
}

/// Another origin's copy of a held message (see `Held::twins`).
#[derive(Debug)]
pub(super) struct Twin {
    pub(super) reply: ReplyTo,
    pub(super) producer: Arc<str>,
    pub(super) offset: Offset,
    pub(super) attempt: u32,
    pub(super) incarnation: u64,
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
    /// The sending producer's incarnation (`Deliver::incarnation`).
    pub incarnation: u64,
    pub ack_wait: Duration,
    pub delivery: Delivery,
}

impl Arrival {
    /// How a settlement names this arrival to its producer.
    pub(super) fn name(&self) -> Name<'_> {
        Name {
            offset: self.offset,
            attempt: self.attempt,
            message_id: &self.delivery.message_id,
            incarnation: self.incarnation,
        }
    }
}

/// What names one delivery to its producer: the offset and attempt it was sent with, and
/// the message id and producer incarnation, without which an offset reused by the
/// producer could settle another message.
#[derive(Debug, Clone, Copy)]
pub(super) struct Name<'a> {
    pub(super) offset: Offset,
    pub(super) attempt: u32,
    pub(super) message_id: &'a str,
    pub(super) incarnation: u64,
}

pub(super) fn settled(
    subscription: &str,
    name: Name<'_>,
    outcome: Outcome,
    delay_ms: u64,
    reason: &str,
) -> Settled {
    Settled {
        subscription: subscription.to_owned(),
        offset: name.offset,
        attempt: name.attempt,
        outcome: outcome as i32,
        delay_ms,
        reason: reason.to_owned(),
        message_id: name.message_id.to_owned(),
        incarnation: name.incarnation,
    }
}
