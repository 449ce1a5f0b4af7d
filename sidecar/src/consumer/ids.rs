//! Delivery ids: unique on this sidecar and hard to guess, without a lock or a random draw
//! per delivery. An id is `<inbox>.<sequence>.<tag>` in hex, where the tag is a SipHash of
//! the other two under a key drawn at start; an id whose tag does not verify was never issued
//! here (a guess, or an id of an earlier run) and is refused as unknown.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// Issues and checks delivery ids.
#[derive(Debug)]
pub struct DeliveryIds {
    key: std::collections::hash_map::RandomState,
    next: AtomicU64,
}

impl Default for DeliveryIds {
    fn default() -> Self {
        Self::new()
    }
}

/// The parts of a valid delivery id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryRef {
    pub inbox: u32,
    pub seq: u64,
}

impl DeliveryIds {
    /// A generator with a fresh random key.
    pub fn new() -> Self {
        Self {
            key: std::collections::hash_map::RandomState::new(),
            next: AtomicU64::new(1),
        }
    }

    /// A new id for a delivery held by `inbox`.
    pub fn issue(&self, inbox: u32) -> (DeliveryRef, String) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let r = DeliveryRef { inbox, seq };
        (r, self.format(r))
    }

    /// The text form of `r`.
    pub fn format(&self, r: DeliveryRef) -> String {
        format!("{:x}.{:x}.{:016x}", r.inbox, r.seq, self.tag(r))
    }

    fn tag(&self, r: DeliveryRef) -> u64 {
        self.key.hash_one((r.inbox, r.seq))
    }

    /// The parts of `id` if this generator issued it.
    pub fn parse(&self, id: &str) -> Option<DeliveryRef> {
        let mut parts = id.split('.');
        let inbox = u32::from_str_radix(parts.next()?, 16).ok()?;
        let seq = u64::from_str_radix(parts.next()?, 16).ok()?;
        let tag = u64::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() {
            return None;
        }
        let r = DeliveryRef { inbox, seq };
        (self.tag(r) == tag).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_parse_and_guesses_do_not() {
        let ids = DeliveryIds::new();
        let (r, s) = ids.issue(3);
        assert_eq!(ids.parse(&s), Some(r));
        let (r2, s2) = ids.issue(3);
        assert_ne!(s, s2);
        assert_eq!(r2.seq, r.seq + 1);
        // Same inbox and sequence, another tag: refused.
        assert_eq!(ids.parse(&format!("3.{:x}.0000000000000000", r.seq)), None);
        assert_eq!(ids.parse("garbage"), None);
        assert_eq!(ids.parse(""), None);
        // Another sidecar's (or an earlier run's) id does not verify here.
        let other = DeliveryIds::new();
        assert_eq!(other.parse(&s), None);
    }
}
