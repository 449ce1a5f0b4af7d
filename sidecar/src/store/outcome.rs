//! What became of a message for each subscription, for publishes with ack level
//! `DELIVERED`: the dispatchers say how each settled, the store collects it per message,
//! and the publish answers with it (`PublishResponse.deliveries`).

use std::sync::Arc;

use ferry_api::proto::v1::{DeliveryOutcome, SubscriptionOutcome};

use crate::log::Settlement;

/// How one subscription settled a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The group's app acked it (for a broadcast group, every member's app).
    Acked,
    /// `AtMostOnce`: sent, and never redelivered; the app's answer is reported after
    /// (`Acked`, or `Dropped` when it nacked or the delivery failed).
    Sent,
    /// The subscription's filter does not match it: never meant for this group.
    Filtered,
    /// Moved to the dead-letter topic after `maxDeliveries`.
    DeadLettered,
    /// Its TTL or `retention.maxAge` passed before delivery; `dead_lettered` says what the
    /// subscription's `deadLetterTopic` made of it.
    Expired { dead_lettered: bool },
    /// Given up without a dead-letter topic, or an `AtMostOnce` delivery that failed.
    Dropped,
    /// The sidecar stopped and handed it to a peer before this subscription settled it.
    HandedOff,
}

impl Outcome {
    /// What the log keeps of it.
    pub fn settlement(self) -> Settlement {
        match self {
            Outcome::Acked | Outcome::Sent | Outcome::Filtered => Settlement::Acked,
            Outcome::DeadLettered
            | Outcome::Expired {
                dead_lettered: true,
            } => Settlement::DeadLettered,
            Outcome::Expired {
                dead_lettered: false,
            }
            | Outcome::Dropped
            | Outcome::HandedOff => Settlement::Dropped,
        }
    }

    /// Whether nothing more is to come (an `AtMostOnce` send waits for the app's answer).
    pub fn is_final(self) -> bool {
        self != Outcome::Sent
    }

    /// How bad it is, to pick one outcome for a broadcast group's copies.
    pub fn severity(self) -> u8 {
        match self {
            Outcome::Acked | Outcome::Sent | Outcome::Filtered => 0,
            Outcome::HandedOff => 1,
            Outcome::Dropped => 2,
            Outcome::DeadLettered => 3,
            Outcome::Expired { .. } => 4,
        }
    }

    /// The app proto's name for it.
    pub fn to_proto(self) -> DeliveryOutcome {
        match self {
            Outcome::Acked => DeliveryOutcome::Acked,
            // Only reported while unanswered, when the wait times out.
            Outcome::Sent => DeliveryOutcome::TimedOut,
            Outcome::Filtered => DeliveryOutcome::Filtered,
            Outcome::DeadLettered => DeliveryOutcome::DeadLettered,
            Outcome::Expired { .. } => DeliveryOutcome::Expired,
            Outcome::Dropped => DeliveryOutcome::Dropped,
            Outcome::HandedOff => DeliveryOutcome::HandedOff,
        }
    }
}

/// What a `DELIVERED` publish is told, built up by the store as subscriptions settle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The subscriptions registered when the message was stored, which it waits for.
    pub expected: Vec<Arc<str>>,
    /// Each one's outcome so far.
    pub outcomes: Vec<(Arc<str>, Outcome)>,
    /// Every expected subscription settled it for good.
    pub done: bool,
}

impl DeliveryReport {
    /// Records `sub`'s outcome (a later one replaces an earlier `Sent`, or a milder one for
    /// another copy of a broadcast group).
    pub fn record(&mut self, sub: &str, outcome: Outcome) {
        match self.outcomes.iter_mut().find(|(s, _)| &**s == sub) {
            Some((_, o)) if !o.is_final() || outcome.severity() > o.severity() => *o = outcome,
            Some(_) => {}
            None => self.outcomes.push((Arc::from(sub), outcome)),
        }
    }

    /// `sub`'s outcome, if final.
    pub fn final_outcome(&self, sub: &str) -> Option<Outcome> {
        self.outcomes
            .iter()
            .find(|(s, o)| &**s == sub && o.is_final())
            .map(|(_, o)| *o)
    }

    /// Per expected subscription, its final outcome or `TIMED_OUT`, in the order they
    /// were registered.
    pub fn to_proto(&self) -> Vec<SubscriptionOutcome> {
        self.expected
            .iter()
            .map(|s| SubscriptionOutcome {
                subscription: s.to_string(),
                outcome: self
                    .final_outcome(s)
                    .map_or(DeliveryOutcome::TimedOut, Outcome::to_proto)
                    as i32,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_answer_replaces_a_send_and_the_worst_copy_wins() {
        let mut r = DeliveryReport {
            expected: vec![Arc::from("a"), Arc::from("b"), Arc::from("c")],
            ..DeliveryReport::default()
        };
        r.record("a", Outcome::Sent);
        assert_eq!(r.final_outcome("a"), None);
        r.record("a", Outcome::Dropped);
        assert_eq!(r.final_outcome("a"), Some(Outcome::Dropped));
        r.record("b", Outcome::Acked);
        r.record("b", Outcome::DeadLettered);
        r.record("b", Outcome::Acked);
        assert_eq!(r.final_outcome("b"), Some(Outcome::DeadLettered));
        let p = r.to_proto();
        assert_eq!(p[0].outcome, DeliveryOutcome::Dropped as i32);
        assert_eq!(p[1].outcome, DeliveryOutcome::DeadLettered as i32);
        assert_eq!(p[2].outcome, DeliveryOutcome::TimedOut as i32);
    }
}
