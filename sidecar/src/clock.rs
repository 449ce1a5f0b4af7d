//! The sidecar's clock for everything that turns a wall-clock timestamp into a timer: TTL,
//! delayed delivery, `retention.maxAge`, the dedup window and the ExactlyOnce acked-id
//! window (docs/reliability.md row 14).
//!
//! The wall clock is read **once**, when the process first asks for the time (startup);
//! from then on "now" is that reading plus the monotonic time elapsed since. So:
//!
//! - a message published by this process carries `publish_time_ms` on this clock, and its
//!   TTL or delay turns into an `Instant` that no later wall-clock step (NTP, an operator,
//!   a VM resume) can move: nothing expires or is released early or late;
//! - a timestamp written by an *earlier* process (a message recovered from the log, a
//!   persisted dedup or acked id) is converted with the wall clock as read at this startup.
//!   If the wall clock stepped between the two processes, that step shifts those timers once
//!   (a step back keeps them longer, which only suppresses more duplicates; a step forward
//!   shortens them). This is the documented limit of timestamps that survive a restart.
//!
//! The price: `publish_time_ms` drifts from the host's wall clock by any step taken while
//! the process runs. It is informational for the app; no timer of another process uses it.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A wall-clock reading and the monotonic instant it was taken at.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    instant: Instant,
    wall_ms: u64,
}

static ANCHOR: OnceLock<Anchor> = OnceLock::new();

/// The host's wall clock now, in milliseconds since the Unix epoch (0 before 1970).
pub fn system_wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Anchor {
    /// An anchor reading `wall_ms` at `instant`.
    pub fn new(instant: Instant, wall_ms: u64) -> Self {
        Self { instant, wall_ms }
    }

    /// The wall time of `at` on this clock.
    pub fn wall_ms_at(&self, at: Instant) -> u64 {
        if at >= self.instant {
            let d = u64::try_from(at.duration_since(self.instant).as_millis()).unwrap_or(u64::MAX);
            self.wall_ms.saturating_add(d)
        } else {
            let d = u64::try_from(self.instant.duration_since(at).as_millis()).unwrap_or(u64::MAX);
            self.wall_ms.saturating_sub(d)
        }
    }

    /// How long from `now` until the wall time `wall_ms` on this clock; zero if it passed.
    pub fn until(&self, wall_ms: u64, now: Instant) -> Duration {
        Duration::from_millis(wall_ms.saturating_sub(self.wall_ms_at(now)))
    }

    /// The instant of the wall time `wall_ms`, or `now` if it already passed (an instant
    /// before `now` is never needed: every caller only asks "has it passed yet").
    pub fn instant_of(&self, wall_ms: u64, now: Instant) -> Instant {
        now + self.until(wall_ms, now)
    }
}

/// The process-wide anchor, read on first use.
pub fn anchor() -> Anchor {
    *ANCHOR.get_or_init(|| Anchor::new(Instant::now(), system_wall_ms()))
}

/// Wall time now on the sidecar's clock (see the module documentation).
pub fn now_ms() -> u64 {
    anchor().wall_ms_at(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_follows_the_monotonic_clock_from_the_anchor() {
        let t0 = Instant::now();
        let a = Anchor::new(t0, 1_000_000);
        assert_eq!(a.wall_ms_at(t0 + Duration::from_secs(5)), 1_005_000);
        assert_eq!(a.wall_ms_at(t0), 1_000_000);
    }

    #[test]
    fn deadlines_become_instants_once_and_passed_ones_are_now() {
        let t0 = Instant::now();
        let a = Anchor::new(t0, 1_000_000);
        assert_eq!(a.instant_of(1_030_000, t0), t0 + Duration::from_secs(30));
        // Asked later, the same deadline is the same instant: no wall clock involved.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(a.instant_of(1_030_000, later), t0 + Duration::from_secs(30));
        assert_eq!(a.instant_of(900_000, later), later);
        assert_eq!(a.until(900_000, later), Duration::ZERO);
    }

    #[test]
    fn the_process_clock_never_goes_back() {
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
    }
}
