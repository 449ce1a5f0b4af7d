//! What a producer tells its replicas about settled messages (trims), and their wire form.
//!
//! A trim names a message id (of a copy this producer sent, in any incarnation) and either
//! every subscription (the replica drops the copy) or one (the replica keeps the copy and
//! remembers that this subscription settled it, so that a takeover delivers it to the
//! others only). Trims queue per replica while it does not answer; both kinds count
//! against the same bound.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_api::proto::v1::SubscriptionSettled;

use crate::store::SettledReport;

/// One trim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trim {
    /// Every subscription settled the message: drop its copies.
    All(String),
    /// This subscription settled it; others may not have yet.
    By(Arc<str>, String),
}

/// The trims of a store's report, those of every subscription first.
pub fn from_report(report: SettledReport) -> Vec<Trim> {
    let mut trims: Vec<Trim> = report.ids.into_iter().map(Trim::All).collect();
    trims.extend(
        report
            .by_subscription
            .into_iter()
            .map(|(sub, id)| Trim::By(sub, id)),
    );
    trims
}

/// Trims dropping every copy of `ids`.
pub fn all(ids: impl IntoIterator<Item = String>) -> Vec<Trim> {
    ids.into_iter().map(Trim::All).collect()
}

/// The `settled_ids` and `settled_by` fields of a `ReplicateRequest` carrying `trims`:
/// per-subscription trims grouped by subscription, in the order of their first trim, ids
/// in queue order.
pub fn to_request(trims: &[Trim]) -> (Vec<String>, Vec<SubscriptionSettled>) {
    let mut ids = Vec::new();
    let mut by: Vec<SubscriptionSettled> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for t in trims {
        match t {
            Trim::All(id) => ids.push(id.clone()),
            Trim::By(sub, id) => {
                let i = *index.entry(sub).or_insert_with(|| {
                    by.push(SubscriptionSettled {
                        subscription: sub.to_string(),
                        ids: Vec::new(),
                    });
                    by.len() - 1
                });
                by[i].ids.push(id.clone());
            }
        }
    }
    (ids, by)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_become_trims_and_requests_group_them_by_subscription() {
        let report = SettledReport {
            topic: "ns/t".into(),
            ids: vec!["m1".into()],
            by_subscription: vec![
                (Arc::from("ns/a"), "m2".into()),
                (Arc::from("ns/b"), "m2".into()),
                (Arc::from("ns/a"), "m3".into()),
            ],
        };
        let mut trims = from_report(report);
        assert_eq!(trims[0], Trim::All("m1".into()));
        trims.extend(all(["m4".to_owned()]));
        let (ids, by) = to_request(&trims);
        assert_eq!(ids, ["m1", "m4"]);
        let by: Vec<(&str, Vec<&str>)> = by
            .iter()
            .map(|s| {
                (
                    s.subscription.as_str(),
                    s.ids.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(by, [("ns/a", vec!["m2", "m3"]), ("ns/b", vec!["m2"])]);
    }
}
