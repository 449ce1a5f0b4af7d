use super::*;
use crate::routing::fixtures::member;
use ferry_api::routing::RoutingTable;

fn table_with(addresses: &[&str]) -> RoutingTable {
    let mut t = RoutingTable::default();
    for (i, a) in addresses.iter().enumerate() {
        let pod = format!("p{i}");
        t.members
            .entry("ns/g".into())
            .or_default()
            .insert(pod.clone(), member("ns", "g", &pod, "z", a));
    }
    t
}

fn ids(n: usize) -> Vec<Trim> {
    trims::all((0..n).map(|i| format!("id-{i}")))
}

#[test]
fn trims_of_replicas_that_left_the_table_are_dropped_with_what_they_hold() {
    let (gauge, dropped) = (Gauge::default(), Counter::default());
    let r = Replicator::new(1, gauge.clone(), dropped.clone());
    with(&r.holders, |h| {
        h.entry("ns/t".into())
            .or_default()
            .extend(["a:1".to_owned(), "b:1".to_owned()])
    });
    r.put_back("a:1", "ns/t", ids(3));
    r.put_back("b:1", "ns/t", ids(5));
    r.put_back("b:1", "ns/u", ids(2));
    assert_eq!(gauge.get(), 10);

    let now = Instant::now();
    assert_eq!(r.forget_departed_at(&table_with(&["a:1", "b:1"]), now), 0);
    // b:1 leaves the table: its trims wait out the grace (a readiness flap keeps them).
    let only_a = table_with(&["a:1"]);
    assert_eq!(r.forget_departed_at(&only_a, now), 0);
    assert_eq!(
        r.forget_departed_at(&table_with(&["a:1", "b:1"]), now + DEPARTED_GRACE),
        0
    );
    assert_eq!(r.forget_departed_at(&only_a, now + DEPARTED_GRACE), 0);
    assert_eq!(gauge.get(), 10);
    assert_eq!(r.forget_departed_at(&only_a, now + DEPARTED_GRACE * 2), 7);
    assert_eq!((gauge.get(), dropped.get()), (3, 7));
    assert_eq!(r.take_pending("a:1", "ns/t").len(), 3);
    assert!(r.take_pending("b:1", "ns/t").is_empty());
    let holders = with(&r.holders, |h| h.get("ns/t").cloned()).flatten();
    assert_eq!(holders, Some(BTreeSet::from(["a:1".to_owned()])));
}

#[test]
fn a_replica_that_does_not_answer_keeps_at_most_the_newest_trims() {
    let (gauge, dropped) = (Gauge::default(), Counter::default());
    let r = Replicator::new(1, gauge.clone(), dropped.clone());
    r.put_back("a:1", "ns/t", ids(MAX_PENDING_TRIMS));
    r.put_back("a:1", "ns/t", trims::all(["newest".to_owned()]));
    assert_eq!(gauge.get(), MAX_PENDING_TRIMS as i64);
    assert_eq!(dropped.get(), 1);
    assert_eq!(r.take_pending("a:1", "ns/t")[0], Trim::All("newest".into()));
}
