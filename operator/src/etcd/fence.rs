//! The fencing key: claiming it, reading it, and writing through it (see the module
//! documentation of [`crate::etcd`] for the scheme).

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tracing::{debug, warn};

use super::EtcdStore;
use crate::desired::Changes;
use crate::error::{Error, Result};
use crate::leader::LeaseGuard;

/// Operations per transaction: etcd refuses more than `--max-txn-ops` (128 by default) in
/// one, and one is the fence's compare.
const MAX_OPS_PER_TXN: usize = 100;

/// What the fencing key holds: the leader's term and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceValue {
    pub term: u64,
    pub identity: String,
}

impl FenceValue {
    /// `"<term, zero-padded to 20 digits>/<identity>"`: byte order is term order.
    pub fn encode(&self) -> String {
        format!("{:020}/{}", self.term, self.identity)
    }

    /// The inverse of [`FenceValue::encode`]; `None` for anything else.
    pub fn decode(value: &str) -> Option<Self> {
        let (term, identity) = value.split_once('/')?;
        if term.len() != 20 {
            return None;
        }
        Some(Self {
            term: term.parse().ok()?,
            identity: identity.into(),
        })
    }
}

/// The fencing key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFence {
    pub value: FenceValue,
    pub mod_revision: i64,
}

impl EtcdStore {
    /// The fencing key's value, `None` if it is absent. A value that does not decode counts
    /// as term 0, so that any leader may claim over it.
    pub async fn read_fence(&self, key: &str) -> Result<Option<ReadFence>> {
        let mut kv = self.client.kv_client();
        let response = kv.get(key, None).await?;
        Ok(response.kvs().first().map(|item| ReadFence {
            value: FenceValue::decode(&String::from_utf8_lossy(item.value())).unwrap_or(
                FenceValue {
                    term: 0,
                    identity: String::new(),
                },
            ),
            mod_revision: item.mod_revision(),
        }))
    }

    /// Claims the fencing key for `identity` at `term` and returns the writer that every
    /// routing-table write goes through. Fails with [`Error::StaleTerm`] if the key holds an
    /// equal or newer term of someone else.
    pub async fn claim(
        &self,
        key: &str,
        identity: &str,
        term: u64,
        guard: LeaseGuard,
    ) -> Result<FencedWriter> {
        guard.check()?;
        let mine = FenceValue {
            term,
            identity: identity.into(),
        };
        let encoded = mine.encode();
        let mut kv = self.client.kv_client();
        // Absent: create it.
        let created = kv
            .txn(
                Txn::new()
                    .when([Compare::version(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, encoded.as_str(), None)]),
            )
            .await?;
        let mut revision = created
            .succeeded()
            .then(|| created.header().map_or(0, |h| h.revision()));
        if revision.is_none() {
            // Present: overwrite only a claim of an older term. `"<term>/"` sorts above
            // every value of this term (whatever the identity) and below every newer term.
            let term_floor = format!("{term:020}/");
            let newer = kv
                .txn(
                    Txn::new()
                        .when([Compare::value(key, CompareOp::Less, term_floor.as_str())])
                        .and_then([TxnOp::put(key, encoded.as_str(), None)]),
                )
                .await?;
            revision = newer
                .succeeded()
                .then(|| newer.header().map_or(0, |h| h.revision()));
        }
        let revision = match revision {
            Some(revision) => revision,
            None => match self.read_fence(key).await? {
                // Our own claim whose response was lost: adopt it.
                Some(read) if read.value == mine => read.mod_revision,
                held => {
                    return Err(Error::StaleTerm {
                        key: key.into(),
                        term,
                        held: held.map(|r| r.value.encode()).unwrap_or_default(),
                    });
                }
            },
        };
        debug!(key, term, revision, "claimed the fencing key");
        Ok(FencedWriter {
            store: self.clone(),
            key: key.into(),
            term,
            revision,
            guard,
        })
    }
}

/// Writes to the routing table, each transaction guarded by the fencing key's
/// `mod_revision` being the one this leader's claim produced.
#[derive(Debug, Clone)]
pub struct FencedWriter {
    store: EtcdStore,
    key: String,
    term: u64,
    revision: i64,
    guard: LeaseGuard,
}

impl FencedWriter {
    /// The store, for reads.
    pub fn store(&self) -> &EtcdStore {
        &self.store
    }

    /// The term this writer claimed with.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The leadership this writer belongs to.
    pub fn guard(&self) -> &LeaseGuard {
        &self.guard
    }

    /// Applies the puts and deletes; a no-op (no request at all) when there are none.
    /// Changes above [`MAX_OPS_PER_TXN`] are split into several transactions, each fenced;
    /// each change is idempotent, so a failure midway is repaired by the retry.
    pub async fn apply(&self, changes: &Changes) -> Result<usize> {
        let ops: Vec<TxnOp> = changes
            .puts
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .chain(
                changes
                    .deletes
                    .iter()
                    .map(|k| TxnOp::delete(k.as_str(), None)),
            )
            .collect();
        let count = ops.len();
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_OPS_PER_TXN).collect();
            self.commit(chunk).await?;
        }
        Ok(count)
    }

    /// Puts one key (for tests and tools; reconciles go through [`FencedWriter::apply`]).
    pub async fn put(&self, key: &str, value: &str) -> Result<()> {
        let changes = Changes {
            puts: BTreeMap::from([(key.to_owned(), value.to_owned())]),
            deletes: BTreeSet::new(),
        };
        self.apply(&changes).await.map(drop)
    }

    async fn commit(&self, ops: Vec<TxnOp>) -> Result<()> {
        self.guard.check()?;
        let mut kv = self.store.client().kv_client();
        let response = kv
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        self.key.as_str(),
                        CompareOp::Equal,
                        self.revision,
                    )])
                    .and_then(ops),
            )
            .await?;
        if !response.succeeded() {
            warn!(key = %self.key, term = self.term, "fenced out by a newer leader: stepping down");
            self.guard.step_down();
            return Err(Error::Fenced {
                key: self.key.clone(),
                term: self.term,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_values_sort_by_term() {
        let a = FenceValue {
            term: 9,
            identity: "zzz".into(),
        };
        let b = FenceValue {
            term: 10,
            identity: "aaa".into(),
        };
        assert!(a.encode() < b.encode());
        // The claim's compare: every value of term 10 is >= "<10>/", every older one below.
        let floor = format!("{:020}/", 10);
        assert!(a.encode() < floor && b.encode() >= floor);
        assert_eq!(FenceValue::decode(&b.encode()), Some(b));
        assert_eq!(FenceValue::decode("7/x"), None);
        assert_eq!(FenceValue::decode("garbage"), None);
    }
}
