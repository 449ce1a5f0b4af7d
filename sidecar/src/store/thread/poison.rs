//! What the store does when its log is poisoned by a failed fsync (docs/reliability.md
//! row 10): the records not made durable are cut from the log, so that neither a
//! dispatcher now nor a recovery after the restart delivers a message whose publisher was
//! refused; the topic is flagged (`ferry_sidecar_log_poisoned`, `/readyz`) and one line
//! says what to do.

use std::sync::atomic::Ordering as AtomicOrdering;

use ferry_api::crd::Durability;

use super::StoreThread;
use crate::log::LogError;

impl StoreThread {
    /// Called after a failed `sync`: acts once, when the log reports itself poisoned.
    pub(super) fn poisoned(&mut self, e: &LogError) {
        if !self.log.poisoned() || self.stats.poisoned.load(AtomicOrdering::Relaxed) {
            return;
        }
        // A `DiskAsync` publisher was acked at the write and its record may have been
        // delivered already: keep it (it survives unless the machine loses power).
        if matches!(self.durability, Durability::Disk | Durability::Replicated) {
            let durable = self.log.durable();
            match self.log.discard_unsynced() {
                Ok(_) => {}
                Err(cut) => {
                    tracing::error!(topic = %self.topic, error = %cut, "could not cut the records whose fsync failed; they are not delivered by this process")
                }
            }
            if let Some(tail) = &mut self.tail {
                tail.truncate(durable);
            }
        }
        self.stats.poisoned.store(true, AtomicOrdering::Relaxed);
        tracing::error!(
            topic = %self.topic,
            error = %e,
            "the log of topic {} is poisoned: an fsync failed, so the kernel may have dropped \
             written data; it refuses every publish and cannot read its backlog until the \
             sidecar restarts. Check the disk (dmesg, free space), then restart the sidecar: \
             recovery re-reads what is really on disk and delivers the acked backlog",
            self.topic
        );
    }
}
