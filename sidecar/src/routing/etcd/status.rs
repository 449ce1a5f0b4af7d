//! What the etcd source tells the rest of the sidecar about itself: whether it reaches
//! etcd, which revision it applied, how often it re-listed and how many values it skipped.
//! Atomics written by the source task and read by `/metrics` and `/readyz`, so that a
//! scrape never waits on the source.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The state of an [`super::EtcdSource`], shared with the admin port.
#[derive(Debug, Default)]
pub struct SourceStatus {
    connected: AtomicBool,
    loaded: AtomicBool,
    revision: AtomicI64,
    lists: AtomicU64,
    relists: AtomicU64,
    bad_values: AtomicU64,
    /// Why etcd is not reachable, and since when (first failure of the current outage).
    outage: Mutex<Option<(Instant, String)>>,
}

impl SourceStatus {
    /// Whether the source holds a live watch on etcd.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whether a table was ever listed from etcd (since this process started).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// The etcd revision of the table last published (0 before the first list).
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::SeqCst)
    }

    /// Lists after the first one: after a compaction, a canceled watch, or a restart of
    /// the follow loop that lost its place.
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::SeqCst)
    }

    /// Keys or values under the prefix that could not be applied (skipped, counted).
    pub fn bad_values(&self) -> u64 {
        self.bad_values.load(Ordering::SeqCst)
    }

    /// The error of the current outage, if any.
    pub fn last_error(&self) -> Option<String> {
        self.lock().as_ref().map(|(_, e)| e.clone())
    }

    /// Whether `/readyz` should say ready, and a line saying why.
    ///
    /// Ready once a table was loaded, even while etcd is unreachable: the sidecar keeps
    /// routing with its last table (the design; docs/reliability.md row 15), and turning every
    /// sidecar NotReady during an etcd outage would take every pod out of its Services and,
    /// once the operator runs again, out of every group. Not ready before the first table:
    /// a sidecar that never saw the table cannot route, and must not become a member.
    pub fn readiness(&self) -> (bool, String) {
        let revision = self.revision();
        let outage = self.lock().clone();
        if !self.loaded() {
            let why = outage.map_or_else(|| "connecting".to_owned(), |(_, e)| e);
            return (false, format!("routing: no table from etcd yet ({why})"));
        }
        match outage {
            Some((since, error)) if !self.connected() => (
                true,
                format!(
                    "routing: etcd unreachable for {}s ({error}); routing with the last table, \
                     revision {revision}",
                    since.elapsed().as_secs()
                ),
            ),
            _ => (
                true,
                format!("routing: etcd connected, revision {revision}"),
            ),
        }
    }

    pub(crate) fn set_connected(&self) {
        self.connected.store(true, Ordering::SeqCst);
        *self.lock() = None;
    }

    /// Records a failure; the outage's start time is kept across retries.
    pub(crate) fn set_disconnected(&self, error: &str) {
        self.connected.store(false, Ordering::SeqCst);
        let mut outage = self.lock();
        let since = outage.as_ref().map_or_else(Instant::now, |(t, _)| *t);
        *outage = Some((since, error.to_owned()));
    }

    pub(crate) fn listed(&self) {
        if self.lists.fetch_add(1, Ordering::SeqCst) > 0 {
            self.relists.fetch_add(1, Ordering::SeqCst);
        }
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Ordering::SeqCst);
    }

    pub(crate) fn bad_value(&self) {
        self.bad_values.fetch_add(1, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        // A panic while holding this lock leaves a consistent value: keep using it.
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Exponential backoff with jitter between `min` and `max`: each delay is drawn from
/// `[base/2, base]` and `base` doubles, so that sidecars that lost etcd together do not
/// come back in lockstep, and a dead etcd costs at most one attempt per `max / 2`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            base: min,
        }
    }

    /// The next delay; grows until [`Backoff::reset`].
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (base * 2).min(self.max);
        let high = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let low = high / 2;
        Duration::from_millis(rand::random_range(low..=high))
    }

    /// Back to `min`, after a success.
    pub(crate) fn reset(&mut self) {
        self.base = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bases = vec![];
        for _ in 0..12 {
            let base = b.base;
            let d = b.next_delay();
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
            bases.push(base);
        }
        assert_eq!(bases[0], Duration::from_millis(100));
        assert_eq!(*bases.last().unwrap(), Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn readiness_tells_the_outage() {
        let s = SourceStatus::default();
        s.set_disconnected("connection refused");
        let (ready, why) = s.readiness();
        assert!(!ready);
        assert!(why.contains("connection refused"), "{why}");
        s.listed();
        s.set_revision(42);
        s.set_connected();
        let (ready, why) = s.readiness();
        assert!(ready);
        assert!(why.contains("connected, revision 42"), "{why}");
        s.set_disconnected("keepalive timeout");
        let (ready, why) = s.readiness();
        assert!(ready, "a loaded table keeps the sidecar ready");
        assert!(
            why.contains("unreachable") && why.contains("revision 42"),
            "{why}"
        );
        assert_eq!(s.relists(), 0);
        s.listed();
        assert_eq!(s.relists(), 1);
    }
}
