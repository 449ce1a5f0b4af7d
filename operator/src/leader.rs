//! Leader election on a `coordination.k8s.io/v1` Lease, written by hand with the kube
//! client (acquire and renew are replaces with a `resourceVersion` precondition, so two
//! candidates can never both win the same round).
//!
//! Rules, after client-go's `leaderelection`:
//! - a Lease held by another identity is taken over only once its record (resourceVersion)
//!   has not changed for the holder's `leaseDurationSeconds`, measured on *this* process's
//!   monotonic clock from when it first saw that record, so that clock skew between nodes
//!   does not matter;
//! - an empty holder (released on shutdown) or this process's own identity is taken at once;
//! - the leader renews every `--retry-period`; it treats the lease as lost, and stops
//!   writing, `--renew-deadline` after the *start* of its last successful renewal, which is
//!   before any standby may take over (`--lease-duration` after it observed that renewal);
//! - every takeover raises `leaseTransitions`, which is the leader's **term**. The term is
//!   also kept above the term in etcd's fencing key (see [`crate::etcd`]), so that a Lease
//!   deleted and recreated cannot hand out a term that etcd would refuse.
//!
//! The [`LeaseGuard`] is what the etcd writer checks before each write; the fencing key in
//! etcd covers the window in which a paused leader resumes with a guard it has not yet
//! found to be stale.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::etcd::EtcdStore;

/// Proof of leadership that the etcd writer checks before every write.
///
/// It goes bad for good when the renewals stop succeeding for the renew deadline, when a
/// renewal finds another holder, or when a fenced write is refused ([`LeaseGuard::step_down`]).
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    inner: Arc<GuardInner>,
}

#[derive(Debug)]
struct GuardInner {
    lost: CancellationToken,
    valid_until: Mutex<Instant>,
}

impl LeaseGuard {
    /// A guard valid for `valid_for` from now, until extended or stepped down.
    pub fn new(valid_for: Duration) -> Self {
        Self {
            inner: Arc::new(GuardInner {
                lost: CancellationToken::new(),
                valid_until: Mutex::new(Instant::now() + valid_for),
            }),
        }
    }

    /// `Ok` while this instance may write: not stepped down and not past its deadline.
    pub fn check(&self) -> Result<()> {
        if self.inner.lost.is_cancelled() {
            return Err(Error::NotLeader);
        }
        let valid_until = *self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if Instant::now() >= valid_until {
            if !self.inner.lost.is_cancelled() {
                warn!("no lease renewal within the renew deadline: stepping down");
            }
            self.step_down();
            return Err(Error::NotLeader);
        }
        Ok(())
    }

    /// Gives up leadership: every later [`LeaseGuard::check`] fails and [`LeaseGuard::lost`]
    /// completes.
    pub fn step_down(&self) {
        self.inner.lost.cancel();
    }

    /// Whether leadership is gone.
    pub fn is_lost(&self) -> bool {
        self.inner.lost.is_cancelled()
    }

    /// Completes once leadership is gone.
    pub async fn lost(&self) {
        self.inner.lost.cancelled().await;
    }

    /// A token cancelled once leadership is gone.
    pub fn token(&self) -> CancellationToken {
        self.inner.lost.clone()
    }

    fn extend_to(&self, until: Instant) {
        let mut valid_until = self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if until > *valid_until {
            *valid_until = until;
        }
    }
}

/// Lease timings, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// Acquires, renews and releases one Lease for one identity.
#[derive(Debug, Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
}

/// This process holds the Lease.
#[derive(Debug)]
pub struct Leadership {
    /// The term (`leaseTransitions` after this process took the Lease).
    pub term: u64,
    /// Valid while the Lease is held.
    pub guard: LeaseGuard,
    renewer: JoinHandle<()>,
}

impl Drop for Leadership {
    /// A leadership dropped without [`LeaderElector::release`] (a task aborted) stops
    /// renewing and writing; the Lease then expires and a standby takes over.
    fn drop(&mut self) {
        self.guard.step_down();
        self.renewer.abort();
    }
}

/// What one acquisition attempt saw of another holder's record.
#[derive(Debug, Default)]
struct Observed {
    record: Option<String>,
    since: Option<Instant>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timings,
        }
    }

    /// Waits until this process holds the Lease, or `None` once `shutdown` is cancelled.
    /// `store` and `fence_key` give the term in etcd that the new term must exceed.
    pub async fn acquire(
        &self,
        store: &EtcdStore,
        fence_key: &str,
        shutdown: &CancellationToken,
    ) -> Option<Leadership> {
        let mut observed = Observed::default();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let attempt = tokio::time::timeout(
                self.timings.renew_deadline,
                self.try_acquire(store, fence_key, &mut observed),
            )
            .await;
            match attempt {
                Ok(Ok(Some(leadership))) => return Some(leadership),
                Ok(Ok(None)) => {}
                Ok(Err(error)) => warn!(lease = %self.name, %error, "acquiring the lease failed"),
                Err(_) => warn!(lease = %self.name, "acquiring the lease timed out"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(self.timings.retry_period) => {}
            }
        }
    }

    async fn try_acquire(
        &self,
        store: &EtcdStore,
        fence_key: &str,
        observed: &mut Observed,
    ) -> Result<Option<Leadership>> {
        let now = Instant::now();
        let current = self.api.get_opt(&self.name).await?;
        let (transitions, record) = match &current {
            None => (0, None),
            Some(lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
                if let Some(holder) = holder
                    && holder != self.identity
                {
                    let rv = lease.resource_version();
                    if observed.record != rv {
                        observed.record = rv;
                        observed.since = Some(now);
                    }
                    let duration = spec
                        .lease_duration_seconds
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or(self.timings.lease_duration, Duration::from_secs);
                    let expired = observed
                        .since
                        .is_some_and(|t| now.duration_since(t) >= duration);
                    if !expired {
                        debug!(lease = %self.name, %holder, "the lease is held");
                        return Ok(None);
                    }
                    info!(lease = %self.name, %holder, "the lease expired: taking over");
                }
                (spec.lease_transitions.unwrap_or(0), Some(lease.clone()))
            }
        };
        // The fence read comes before the write so that the new term is above both.
        let fence_term = store
            .read_fence(fence_key)
            .await?
            .map_or(0, |f| f.value.term);
        let term = u64::try_from(transitions)
            .unwrap_or(0)
            .max(fence_term)
            .saturating_add(1);
        let lease_transitions = i32::try_from(term).map_err(|_| {
            Error::Config(format!("lease term {term} does not fit leaseTransitions"))
        })?;
        let sent = Instant::now();
        let spec = self.spec(lease_transitions, true);
        let written = match record {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => {}
            // Another candidate won this round (409 Conflict or 409 AlreadyExists).
            Err(kube::Error::Api(status)) if status.code == 409 => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        info!(lease = %self.name, identity = %self.identity, term, "acquired the lease");
        let guard = LeaseGuard::new(Duration::ZERO);
        guard.extend_to(sent + self.timings.renew_deadline);
        let renewer = tokio::spawn(self.clone().renew_loop(guard.clone()));
        Ok(Some(Leadership {
            term,
            guard,
            renewer,
        }))
    }

    fn spec(&self, lease_transitions: i32, acquire: bool) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            lease_transitions: Some(lease_transitions),
            acquire_time: acquire.then(|| now.clone()),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }
    }

    /// Renews until the guard is lost; steps the guard down when the Lease is gone to
    /// another holder or could not be renewed within the renew deadline.
    async fn renew_loop(self, guard: LeaseGuard) {
        loop {
            tokio::select! {
                () = guard.lost() => return,
                () = tokio::time::sleep(self.timings.retry_period) => {}
            }
            let sent = Instant::now();
            let result = tokio::time::timeout(self.timings.renew_deadline, self.renew_once()).await;
            match result {
                Ok(Ok(true)) => guard.extend_to(sent + self.timings.renew_deadline),
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "the lease has another holder: stepping down");
                    guard.step_down();
                    return;
                }
                Ok(Err(error)) => warn!(lease = %self.name, %error, "renewing the lease failed"),
                Err(_) => warn!(lease = %self.name, "renewing the lease timed out"),
            }
            // `check` logs the step-down when the deadline has passed.
            if guard.check().is_err() {
                return;
            }
        }
    }

    /// `Ok(true)`: renewed; `Ok(false)`: someone else holds the Lease now.
    async fn renew_once(&self) -> Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let mut renewed = self.spec(spec.lease_transitions.unwrap_or(0), false);
        renewed.acquire_time = spec.acquire_time;
        lease.spec = Some(renewed);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Changed under us; the next round reads it again and sees who holds it.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                Err(Error::Kube(kube::Error::Api(status)))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Stops renewing and, if this process still holds the Lease, hands it back (empty
    /// holder) so that a standby takes over at once instead of after the lease duration.
    pub async fn release(&self, leadership: Leadership) {
        leadership.guard.step_down();
        leadership.renewer.abort();
        let release = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok::<_, Error>(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
            info!(lease = %self.name, identity = %self.identity, "released the lease");
            Ok(())
        };
        match tokio::time::timeout(self.timings.renew_deadline, release).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(lease = %self.name, %error, "releasing the lease failed"),
            Err(_) => warn!(lease = %self.name, "releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_past_its_deadline_steps_down() {
        let guard = LeaseGuard::new(Duration::from_secs(60));
        assert!(guard.check().is_ok());
        let expired = LeaseGuard::new(Duration::ZERO);
        assert!(matches!(expired.check(), Err(Error::NotLeader)));
        assert!(expired.is_lost());
        guard.step_down();
        assert!(matches!(guard.check(), Err(Error::NotLeader)));
    }
}
