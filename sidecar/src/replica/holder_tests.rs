use super::*;
use crate::log::tests::msg;
use ferry_api::proto::v1::SubscriptionSettled;

const P: &str = "ns/producer";
const T: &str = "ns/orders";

fn ids(page: &HeldPage) -> Vec<String> {
    page.copies
        .iter()
        .map(|c| c.moved.message.id.clone())
        .collect()
}

#[test]
fn copies_survive_reopen_trims_drop_only_named_ids_and_incarnations_filter() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    // Trims for a producer never seen create nothing.
    assert_eq!(
        logs.replicate(P, "", T, 1, vec![], &["x".into()], &[])
            .unwrap()
            .held,
        0
    );
    assert!(logs.producers().is_empty());

    let held = logs
        .replicate(P, "p:7710", T, 7, vec![msg(1), msg(2), msg(3)], &[], &[])
        .unwrap()
        .held;
    assert_eq!(held, 3);
    let held = logs
        .replicate(P, "p:7710", T, 8, vec![msg(4)], &[msg(2).id], &[])
        .unwrap()
        .held;
    assert_eq!(held, 3);

    // A new process finds the copies and the producer's address again.
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    logs.open_existing();
    let summary = logs.producers();
    assert_eq!(summary.len(), 1);
    assert_eq!(
        (summary[0].address.as_str(), summary[0].copies),
        ("p:7710", 3)
    );
    let all = logs.held(P, T, 0, 0, usize::MAX).unwrap();
    assert_eq!(ids(&all), [msg(1).id, msg(3).id, msg(4).id]);
    assert!(all.copies.iter().all(|c| {
        c.moved
            .message
            .headers
            .iter()
            .all(|(k, _)| k != INCARNATION_HEADER)
    }));
    // The asker's own incarnation is left out.
    assert_eq!(
        ids(&logs.held(P, T, 8, 0, usize::MAX).unwrap()),
        [msg(1).id, msg(3).id]
    );

    // Releasing after a takeover drops them for good.
    let offsets: Vec<Offset> = all.copies.iter().map(|c| c.offset).collect();
    logs.release(P, T, &offsets).unwrap();
    assert!(logs.held(P, T, 0, 0, usize::MAX).unwrap().copies.is_empty());
    assert!(logs.producers().is_empty());
}

#[test]
fn pages_are_bounded_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().to_owned());
    let copies = (0..10).map(msg).collect();
    logs.replicate(P, "", T, 1, copies, &[], &[]).unwrap();
    let mut seen = Vec::new();
    let mut from = 0;
    loop {
        let page = logs.held(P, T, 0, from, 1).unwrap();
        seen.extend(ids(&page));
        if !page.more {
            break;
        }
        from = page.next;
    }
    let want: Vec<String> = (0..10).map(|i| msg(i).id).collect();
    assert_eq!(seen, want);
}

#[test]
fn names_that_escape_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().to_owned());
    for bad in ["../x", "ns/..", "nons", "a/b/c"] {
        assert!(
            logs.replicate(bad, "", T, 1, vec![msg(1)], &[], &[])
                .is_err(),
            "{bad}"
        );
        assert!(
            logs.replicate(P, "", bad, 1, vec![msg(1)], &[], &[])
                .is_err(),
            "{bad}"
        );
    }
}

fn by(sub: &str, ids: &[u64]) -> SubscriptionSettled {
    SubscriptionSettled {
        subscription: sub.into(),
        ids: ids.iter().map(|i| msg(*i).id).collect(),
    }
}

/// Who settled each held copy, by id.
fn settled_by(logs: &ReplicaLogs) -> Vec<(String, Vec<String>)> {
    let page = logs.held(P, T, 0, 0, usize::MAX).unwrap();
    page.copies
        .into_iter()
        .map(|c| (c.moved.message.id, c.moved.settled_by))
        .collect()
}

#[test]
fn per_subscription_trims_are_kept_across_a_restart_and_handed_on_with_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    logs.replicate(P, "p:7710", T, 7, (0..4).map(msg).collect(), &[], &[])
        .unwrap();
    // ns/a settled 0 and 1, ns/b settled 1; an id not held and a bad name are ignored.
    let done = logs
        .replicate(
            P,
            "",
            T,
            7,
            vec![],
            &[],
            &[by("ns/a", &[0, 1, 9]), by("ns/b", &[1]), by("bad", &[2])],
        )
        .unwrap();
    assert_eq!(done.settled_by_subscription, 3);
    // Again: nothing new.
    let again = logs
        .replicate(P, "", T, 7, vec![], &[], &[by("ns/b", &[1])])
        .unwrap();
    assert_eq!(again.settled_by_subscription, 0);

    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    logs.open_existing();
    let want = |i: u64, subs: &[&str]| (msg(i).id, subs.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        settled_by(&logs),
        [
            want(0, &["ns/a"]),
            want(1, &["ns/a", "ns/b"]),
            want(2, &[]),
            want(3, &[]),
        ]
    );
    // A trim of every subscription drops the copy whoever settled it before.
    logs.replicate(P, "", T, 7, vec![], &[msg(1).id], &[])
        .unwrap();
    assert_eq!(settled_by(&logs).len(), 3);
}

#[test]
fn a_subscription_settles_the_oldest_open_copy_of_an_id_of_the_trimming_incarnation_first() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    // The same id sent by incarnation 7, and again (published anew) by 7 and then by 8.
    for inc in [7, 7, 8] {
        logs.replicate(P, "", T, inc, vec![msg(1)], &[], &[])
            .unwrap();
    }
    let subs = |logs: &ReplicaLogs| -> Vec<Vec<String>> {
        settled_by(logs).into_iter().map(|(_, s)| s).collect()
    };
    logs.replicate(P, "", T, 8, vec![], &[], &[by("ns/a", &[1])])
        .unwrap();
    let a = vec!["ns/a".to_owned()];
    assert_eq!(subs(&logs), [vec![], vec![], a.clone()]);
    logs.replicate(P, "", T, 9, vec![], &[], &[by("ns/a", &[1])])
        .unwrap();
    assert_eq!(subs(&logs), [a.clone(), vec![], a.clone()]);
}

#[test]
fn copies_gone_before_a_subscription_is_first_named_do_not_keep_their_segment() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    logs.replicate(P, "", T, 1, (0..3).map(msg).collect(), &[], &[])
        .unwrap();
    // 1 trimmed out of order, then ns/a appears: it must count 1 as settled.
    logs.replicate(P, "", T, 1, vec![], &[msg(1).id], &[by("ns/a", &[2])])
        .unwrap();
    logs.replicate(P, "", T, 1, vec![], &[msg(0).id, msg(2).id], &[])
        .unwrap();
    let c = logs.get(P, T, false).unwrap().unwrap();
    let c = c.lock().unwrap();
    assert_eq!(c.log.acknowledged(), c.log.written());
}

#[test]
fn a_subscription_that_settles_before_the_copy_comes_is_applied_when_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    logs.replicate(P, "", T, 1, vec![msg(0)], &[], &[]).unwrap();
    // ns/a acked 1 before its copy reached this replica.
    let done = logs
        .replicate(P, "", T, 1, vec![], &[], &[by("ns/a", &[1])])
        .unwrap();
    assert_eq!(done.settled_by_subscription, 0);
    let done = logs.replicate(P, "", T, 1, vec![msg(1)], &[], &[]).unwrap();
    assert_eq!(done.settled_by_subscription, 1);
    assert_eq!(
        settled_by(&logs),
        [(msg(0).id, vec![]), (msg(1).id, vec!["ns/a".to_owned()])]
    );
}

#[test]
fn copies_past_the_limit_are_refused_whole_and_trims_free_room() {
    let dir = tempfile::tempdir().unwrap();
    let logs = ReplicaLogs::new(dir.path().join("replicas"));
    let one = message_record_len(&msg(0)) as u64 + 64;
    let within =
        |copies, trims: &[String]| logs.replicate_within(3 * one, P, "", T, 1, copies, trims, &[]);
    assert_eq!(within(vec![msg(0), msg(1)], &[]).unwrap().held, 2);
    let err = within(vec![msg(2), msg(3)], &[]).unwrap_err();
    assert!(matches!(err, Error::BacklogFull { .. }), "{err}");
    assert!(err.to_string().contains(T), "{err}");
    assert_eq!(logs.held(P, T, 0, 0, usize::MAX).unwrap().copies.len(), 2);
    // A trim in the same request makes room first.
    assert_eq!(within(vec![msg(2), msg(3)], &[msg(0).id]).unwrap().held, 3);
}
