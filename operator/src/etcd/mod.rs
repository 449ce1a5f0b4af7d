//! A small store over the `etcd-client` crate: reads of the routing table, and writes
//! fenced by the leader's claim.
//!
//! # Fencing scheme
//!
//! The Lease in Kubernetes says who *should* write; etcd itself makes sure that nobody
//! else *can*. The fencing key (`--fence-key`, default `/ferry/leader`, outside the
//! routing table's `/ferry/v1/` prefix so that no sidecar parses it) holds
//! `"<term, 20 digits>/<identity>"`, where the term is the Lease's `leaseTransitions` after
//! the takeover (see [`crate::leader`]).
//!
//! 1. **Claim.** A new leader writes its value with a transaction that succeeds only if
//!    the key is absent (`version == 0`) or holds an *older term* (`value < "<term>/"`:
//!    etcd compares values byte-wise, and the zero-padded term makes that a numeric
//!    comparison; an equal term of another identity is refused too). A leader
//!    that was paused before claiming and resumes after a newer leader claimed cannot
//!    claim: its term is smaller. The claim's revision (the key's `mod_revision`) is
//!    remembered.
//! 2. **Write.** Every write is one transaction whose guard is
//!    `mod_revision(fence key) == claim revision`. As soon as a newer leader claims, the
//!    key's `mod_revision` changes and every write of the old leader fails with
//!    [`Error::Fenced`]; the old leader then steps down. No write of a stale leader can land
//!    after the new leader's claim, whatever its clocks or pauses.
//! 3. Before each transaction the writer also checks its [`LeaseGuard`], so that a leader
//!    that knows its Lease is lost stops at once, without a round trip.
//!
//! Claiming bumps etcd's global revision (one put to the fencing key) but touches no
//! routing key: a restart or failover with nothing changed leaves `/ferry/v1/` as it was.

mod fence;

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};

pub use fence::{FenceValue, FencedWriter, ReadFence};

use crate::error::Result;

/// Keys and values under a prefix, with the revision they were read at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Values by key; values that are not UTF-8 are read lossily, so they never equal a
    /// desired value and get rewritten.
    pub kvs: BTreeMap<String, String>,
    /// etcd's revision when the read was served.
    pub revision: i64,
    /// Highest `mod_revision` among the keys read (0 when there are none): it changes only
    /// when one of these keys is written.
    pub max_mod_revision: i64,
}

/// A connection to the etcd cluster that holds the routing table.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects lazily (an etcd that is down now is retried on each request); every request
    /// times out after `timeout`, so that a paused etcd fails a reconcile instead of hanging
    /// it.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout);
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self { client })
    }

    /// Every key under `prefix`.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot> {
        let mut kv = self.client.kv_client();
        let response = kv
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut snapshot = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for item in response.kvs() {
            snapshot.max_mod_revision = snapshot.max_mod_revision.max(item.mod_revision());
            snapshot.kvs.insert(
                String::from_utf8_lossy(item.key()).into_owned(),
                String::from_utf8_lossy(item.value()).into_owned(),
            );
        }
        Ok(snapshot)
    }

    /// The given keys that exist, with their values (one round trip per key).
    pub async fn get_keys(&self, keys: &[String]) -> Result<BTreeMap<String, String>> {
        let mut kv = self.client.kv_client();
        let mut found = BTreeMap::new();
        for key in keys {
            let response = kv.get(key.as_str(), None).await?;
            if let Some(item) = response.kvs().first() {
                found.insert(
                    key.clone(),
                    String::from_utf8_lossy(item.value()).into_owned(),
                );
            }
        }
        Ok(found)
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }
}
