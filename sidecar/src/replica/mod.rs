//! `durability: Replicated`, custody takeover and the SIGTERM handoff.
//!
//! - **Copies** (`replicator.rs`, producer side): a publish to a `Replicated` topic is
//!   acked only after the local fsync and then `replicas - 1` replicas answered that their
//!   copy is fsynced (copies are made of what the local log stored, so a replica never
//!   holds an id that the producer refused). Replicas are chosen by `choose.rs`: another
//!   node first, then another zone, in an order fixed per producer (rendezvous hashing), so
//!   a restarted producer finds them again. A replica that does not answer within
//!   [`replicator::REPLICATE_TIMEOUT`] is passed over for the next candidate; if fewer than
//!   `replicas - 1` answer, the publish fails with UNAVAILABLE naming how many did (as
//!   Kafka's `min.insync.replicas` with `acks=all`). The message stays in the local log and
//!   may still be delivered: the client saw no ack, so it is an "attempted" publish.
//! - **Trims** (`trims.rs`): when every subscription settled a message, the producer's store
//!   reports its id (`store/settled_index.rs`) and the replicator tells the replicas to drop
//!   copies with that id. When one subscription settled it and another has not yet, it
//!   reports (subscription, id), and the replica keeps the copy, noting who settled it. A
//!   producer only ever names ids it holds settled; it never tells a replica to drop
//!   anything else (no "truncate to offset", no "forget me").
//! - **Replica storage** (`holder.rs`): one `DiskLog` per (producer, topic) under
//!   `<data-dir>/replicas/`, fsynced before a `Replicate` is answered.
//! - **Takeover** (`takeover.rs`, replica side): a replica takes custody of a producer's
//!   copies when the producer does not answer a probe and either its member record left
//!   the routing table (after this replica saw it there) or it has not answered for
//!   `--replica-takeover-after` (default 60 s). Custody means the copies are appended to the
//!   replica's own log of the topic and delivered by its dispatchers like its own messages,
//!   to the subscriptions that had not settled them (as far as the trims told).
//!   Two replicas of one producer (`replicas: 3`) may both take over: each copy is then
//!   delivered up to `replicas - 1` times, every time after the first with attempt >= 2.
//! - **Re-learn** (`replicator.rs`): a producer that starts asks every sidecar what it holds
//!   for it from earlier starts; copies whose id its own log did not store or lost are
//!   appended to its log again. A settled id is recognised through the dedup window (which
//!   forgets the ids of records recovery lost); past the window, a settled id whose trim
//!   was lost is taken back and delivered again. Nothing is dropped at the replica until
//!   the producer holds the id settled.
//! - **Handoff** (`handoff.rs`): on SIGTERM, after the drain window, the backlog still
//!   undelivered is sent with `TakeCustody` to a live peer, which stores it durably before
//!   answering; only then does the stopping sidecar settle it locally. Each record carries
//!   the subscriptions that settled it here, and the peer delivers it to the others only.
//!
//! Every custody move goes through [`custody::take_custody`]: messages are stored with the
//! header [`CUSTODY_HEADER`] naming where they came from, settled at once for the
//! subscriptions that had settled them ([`Moved::settled_by`]), and their first delivery by
//! the new holder is numbered attempt 2, like a redelivery after a restart.
//!
//! Duplicates these moves can cause, and their bound, per subscription: a takeover or
//! re-learn redelivers to a subscription the messages it settled whose trims had not
//! reached the replica (those settled in the last trim interval, [`replicator::TRIM_EVERY`],
//! and those settled while the replica was unreachable, whose trims wait in the producer's
//! memory and die with it; a replica that predates per-subscription trims redelivers every
//! copy it holds to every subscription) and the deliveries in flight when the producer died
//! (at most `maxInFlight` x members per subscription: the consuming sidecars still hand
//! them to their apps). A takeover of a producer that was only partitioned, not dead,
//! duplicates at most the copies taken over. A handoff duplicates at most the deliveries in
//! flight when it starts, whatever other subscriptions still lacked. A message that moves
//! twice keeps who settled it only as far as the second holder's trims reached its own
//! replicas. Each such delivery after the first carries attempt >= 2. `ExactlyOnce`
//! subscriptions do not see these duplicates: the consuming side remembers the message ids
//! its app acked, whoever sends them again (`consumer/acked_ids.rs`).
//!
//! Who may call: with peer mTLS, `Replicate`, `Held` and `TakeCustody` act only for the
//! caller's own pod (the service account its member record gives, or for a producer in no
//! group the identity that placed its first copies here, `pins.rs`), of this sidecar's own
//! namespace, on a sidecar that is a member of some group, as the replica chooser picks
//! them (`choose.rs`, `peer/authz.rs`). A replica holds at most the topic's
//! `retention.maxBytes` of unsettled copies per producer (`--replica-max-bytes` for an
//! entry without one); more gets RESOURCE_EXHAUSTED (`holder.rs`).
//!
//! Not covered: a copy read back from a replica with a bad CRC is reported by the log like
//! any corrupt record (no refetch from another replica yet).

pub mod choose;
pub mod custody;
pub mod early;
pub mod handoff;
pub mod holder;
pub mod pins;
pub mod replicator;
pub mod takeover;
pub mod trims;

use ferry_api::proto::v1::PeerMessage;

use crate::log::StoredMessage;
use crate::store::AppendOutcome;

/// Header of a message whose custody moved: the producer id (`namespace/pod`) it came from.
pub const CUSTODY_HEADER: &str = "ferry-custody-from";

/// The wire form of a stored message, delay included (copies and custody transfers).
pub fn to_wire(m: &StoredMessage) -> PeerMessage {
    PeerMessage {
        id: m.id.clone(),
        key: m.key.clone(),
        headers: m.headers.iter().cloned().collect(),
        payload: m.payload.clone(),
        publish_time_ms: m.publish_time_ms,
        key_sequence: m.key_sequence,
        ttl_ms: m.ttl_ms,
        delay_ms: m.delay_ms,
        settled_by: Vec::new(),
    }
}

/// A message whose custody moves (handoff, takeover, re-learn), with the subscriptions
/// that settled it where it comes from: its new holder delivers it to the others only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub message: StoredMessage,
    pub settled_by: Vec<String>,
}

impl Moved {
    /// A message no subscription settled yet (or of a sender that does not say).
    pub fn unsettled(message: StoredMessage) -> Self {
        Self {
            message,
            settled_by: Vec::new(),
        }
    }

    /// Its wire form, with `settled_by`.
    pub fn to_wire(&self) -> PeerMessage {
        PeerMessage {
            settled_by: self.settled_by.clone(),
            ..to_wire(&self.message)
        }
    }

    /// From its wire form.
    pub fn from_wire(mut m: PeerMessage) -> Self {
        let settled_by = std::mem::take(&mut m.settled_by);
        Self {
            message: from_wire(m),
            settled_by,
        }
    }
}

/// A stored message from its wire form (headers sorted, as the publish path stores them).
pub fn from_wire(m: PeerMessage) -> StoredMessage {
    let mut headers: Vec<(String, String)> = m.headers.into_iter().collect();
    headers.sort();
    StoredMessage {
        id: m.id,
        key: m.key,
        headers,
        payload: m.payload,
        publish_time_ms: m.publish_time_ms,
        key_sequence: 0,
        ttl_ms: m.ttl_ms,
        delay_ms: m.delay_ms,
    }
}

/// Whether a message came to this sidecar by a custody move.
pub fn moved_custody(m: &StoredMessage) -> bool {
    m.headers.iter().any(|(k, _)| k == CUSTODY_HEADER)
}

/// The messages of a batch that the log stored (not duplicates), in order.
pub fn newly_stored(messages: &[StoredMessage], outcomes: &[AppendOutcome]) -> Vec<StoredMessage> {
    messages
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| matches!(o, AppendOutcome::Stored(_)))
        .map(|(m, _)| m.clone())
        .collect()
}
