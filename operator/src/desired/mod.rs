//! Pure functions from what the cluster declares to what etcd should hold.
//!
//! Nothing here does I/O, so that every rule (which keys a resource owns, who is a member,
//! what a write must change) is unit-tested without a cluster:
//! - [`entries`]: a Topic, ConsumerGroup or Subscription → its key and JSON value;
//! - [`members`]: pods and nodes → a group's member entries and status counts;
//! - [`pods`]: pods and nodes → pod records (each sidecar's zone and node);
//! - [`diff`]: desired key/values against actual ones → the puts and deletes.

pub mod entries;
pub mod members;
pub mod pods;

use std::collections::{BTreeMap, BTreeSet};

/// Writes that take etcd from the actual state to the desired one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys to write, with their new values.
    pub puts: BTreeMap<String, String>,
    /// Keys to delete.
    pub deletes: BTreeSet<String>,
}

impl Changes {
    /// Whether nothing needs writing: a converged resource makes no etcd request.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Compares the keys a resource owns: `desired` and `actual` must cover the same scope
/// (one key, or one prefix). A key whose value is byte-identical is left alone, so that a
/// second reconcile writes nothing and etcd's revision stays put.
pub fn diff(desired: &BTreeMap<String, String>, actual: &BTreeMap<String, String>) -> Changes {
    Changes {
        puts: desired
            .iter()
            .filter(|(k, v)| actual.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: actual
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn diff_puts_changed_and_new_keys_and_deletes_the_rest() {
        let desired = map(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let actual = map(&[("a", "1"), ("b", "old"), ("d", "4")]);
        let changes = diff(&desired, &actual);
        assert_eq!(changes.puts, map(&[("b", "2"), ("c", "3")]));
        assert_eq!(changes.deletes, BTreeSet::from(["d".to_owned()]));
        assert!(diff(&desired, &desired).is_empty());
    }
}
