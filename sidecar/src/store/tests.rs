//! Store thread: group commit, dedup, backlog limit, delivered waiters, restart.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::crd::{Durability, Ordering};
use ferry_api::routing::TopicEntry;

use super::*;
use crate::log::tests::msg;

fn entry(durability: Durability) -> TopicEntry {
    let mut t = crate::routing::tests::topic("ns", "t");
    t.durability = durability;
    t
}

fn opts() -> StoreOptions {
    StoreOptions {
        settled_ids: None,
        async_sync_interval: Duration::from_millis(5),
        fsyncs: Default::default(),
        dedup_max_ids: 1 << 10,
        dedup_evicted: Default::default(),
        ordered_max_keys: 1 << 10,
        ordered_keys: Default::default(),
        ordered_keys_evicted: Default::default(),
    }
}

fn items(ids: &[u64]) -> Vec<AppendItem> {
    ids.iter()
        .map(|i| AppendItem {
            message: msg(*i),
            delivered: None,
            bypass_dedup: false,
            settled_by: Vec::new(),
        })
        .collect()
}

async fn append(s: &TopicStore, ids: &[u64]) -> Result<Vec<AppendOutcome>, Error> {
    s.append(items(ids)).unwrap().await.unwrap()
}

#[tokio::test]
async fn concurrent_appends_get_dense_offsets_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let s = TopicStore::open(&entry(Durability::Disk), dir.path(), &opts()).unwrap();
    // Many publishers at once: one round, one fsync, every one answered.
    let rxs: Vec<_> = (0..50u64).map(|i| s.append(items(&[i])).unwrap()).collect();
    let mut offsets = Vec::new();
    for rx in rxs {
        match rx.await.unwrap().unwrap()[..] {
            [AppendOutcome::Stored(o)] => offsets.push(o),
            ref other => panic!("{other:?}"),
        }
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..50).collect::<Vec<_>>());
    // Same id again, alone and twice within one request.
    let again = append(&s, &[7, 60, 60]).await.unwrap();
    assert_eq!(again[0], AppendOutcome::Duplicate(offsets[7]));
    assert_eq!(again[1], AppendOutcome::Stored(50));
    assert_eq!(again[2], AppendOutcome::Duplicate(50));
    assert_eq!(
        s.stats.written.load(std::sync::atomic::Ordering::Relaxed),
        51
    );
}

#[tokio::test]
async fn backlog_limit_refuses_naming_the_limit_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = entry(Durability::Disk);
    e.retention_max_bytes = 3 * crate::log::record::message_record_len(&msg(0)) as u64;
    let s = TopicStore::open(&e, dir.path(), &opts()).unwrap();
    s.set_subscriptions(vec!["ns/sub".into()]);
    append(&s, &[1, 2]).await.unwrap();
    let err = append(&s, &[3, 4]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.to_string().contains("retention.maxBytes"), "{err}");
    assert_eq!(
        s.stats.written.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Settling frees room.
    s.settle(vec![(Arc::from("ns/sub"), 0, Outcome::Acked)]);
    append(&s, &[3, 4]).await.unwrap();
}

#[tokio::test]
async fn delivered_waiter_hears_each_subscription_and_ends_when_all_settled() {
    let s = TopicStore::open(
        &entry(Durability::Memory),
        std::path::Path::new("/nonexistent"),
        &opts(),
    )
    .unwrap();
    s.set_subscriptions(vec!["ns/a".into(), "ns/b".into()]);
    let (tx, mut rx) = tokio::sync::watch::channel(DeliveryReport::default());
    let out = s
        .append(vec![AppendItem {
            message: msg(1),
            delivered: Some(tx),
            bypass_dedup: false,
            settled_by: Vec::new(),
        }])
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, vec![AppendOutcome::Stored(0)]);
    s.settle(vec![(Arc::from("ns/a"), 0, Outcome::Acked)]);
    s.flush().await.unwrap();
    assert!(!rx.borrow().done, "one subscription is not enough");
    s.settle(vec![(Arc::from("ns/b"), 0, Outcome::Dropped)]);
    let report = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|r| r.done))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(report.final_outcome("ns/a"), Some(Outcome::Acked));
    assert_eq!(report.final_outcome("ns/b"), Some(Outcome::Dropped));
    assert!(s.stats.drained());
}

#[tokio::test]
async fn unsettled_records_and_settlements_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let e = entry(Durability::Disk);
    {
        let s = TopicStore::open(&e, dir.path(), &opts()).unwrap();
        s.set_subscriptions(vec!["ns/sub".into()]);
        append(&s, &[1, 2, 3]).await.unwrap();
        s.settle(vec![(Arc::from("ns/sub"), 1, Outcome::Acked)]);
        s.close().await;
    }
    let s = TopicStore::open(&e, dir.path(), &opts()).unwrap();
    s.set_subscriptions(vec!["ns/sub".into()]);
    let batch = s.read(Arc::from("ns/sub"), 0, 10).await.unwrap();
    let offsets: Vec<u64> = batch.records.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        vec![0, 2],
        "settled offset 1 stays settled; 0 and 2 are redelivered"
    );
    assert_eq!(batch.next, 3);
}

#[tokio::test]
async fn ordered_topics_number_messages_per_key() {
    let mut e = entry(Durability::Memory);
    e.ordering = Ordering::Key;
    let dir = tempfile::tempdir().unwrap();
    let s = TopicStore::open(&e, dir.path(), &opts()).unwrap();
    let mut m = Vec::new();
    for (i, k) in ["a", "b", "a", "a"].iter().enumerate() {
        let mut x = msg(i as u64);
        x.key = Some((*k).into());
        m.push(AppendItem {
            message: x,
            delivered: None,
            bypass_dedup: false,
            settled_by: Vec::new(),
        });
    }
    s.append(m).unwrap().await.unwrap().unwrap();
    let batch = s.read(Arc::from("ns/x"), 0, 10).await.unwrap();
    let seqs: Vec<u64> = batch.records.iter().map(|(_, m)| m.key_sequence).collect();
    assert_eq!(seqs, vec![1, 1, 2, 3]);
}

#[tokio::test]
async fn replicated_store_reports_settled_ids_and_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut o = opts();
    o.settled_ids = Some(tx);
    let s = TopicStore::open(&entry(Durability::Replicated), dir.path(), &o).unwrap();
    s.set_subscriptions(vec!["ns/a".into(), "ns/b".into()]);
    append(&s, &[0, 1, 2]).await.unwrap();
    let held = s.holds(vec![msg(0).id, msg(9).id]).await.unwrap();
    assert_eq!(held, [true, false]);

    // Offset 2 settled by both (out of order), offset 0 by one only: 2 is reported
    // settled, 0 settled by ns/a.
    let settle = |o: u64, sub: &str| (Arc::<str>::from(sub), o, Outcome::Acked);
    s.settle(vec![
        settle(2, "ns/a"),
        settle(2, "ns/b"),
        settle(0, "ns/a"),
    ]);
    s.flush().await.unwrap();
    let report = rx.recv().await.unwrap();
    assert_eq!(
        report,
        SettledReport {
            topic: "ns/t".into(),
            ids: vec![msg(2).id],
            by_subscription: vec![(Arc::from("ns/a"), msg(0).id)],
        }
    );
    // Offset 0 completes: reported once acknowledged passes it.
    s.settle(vec![settle(0, "ns/b")]);
    s.flush().await.unwrap();
    let report = rx.recv().await.unwrap();
    assert_eq!(report.ids, [msg(0).id]);
    assert!(report.by_subscription.is_empty(), "{report:?}");
    // Settled ids are still "held": the dedup window remembers that this log stored them,
    // so a re-learn does not take them back (and deliver them twice).
    assert_eq!(
        s.holds(vec![msg(0).id, msg(1).id, msg(2).id, msg(9).id])
            .await
            .unwrap(),
        [true, true, true, false]
    );

    // After a restart the index is rebuilt from the log and the window from its journal.
    s.close().await;
    drop(s);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    o.settled_ids = Some(tx);
    let s = TopicStore::open(&entry(Durability::Replicated), dir.path(), &o).unwrap();
    assert_eq!(
        s.holds(vec![msg(0).id, msg(1).id, msg(9).id])
            .await
            .unwrap(),
        [true, true, false]
    );
}

#[tokio::test]
async fn bypassing_dedup_stores_a_remembered_id_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = TopicStore::open(&entry(Durability::Disk), dir.path(), &opts()).unwrap();
    append(&s, &[1]).await.unwrap();
    let mut again = items(&[1]);
    again[0].bypass_dedup = true;
    let out = s.append(again).unwrap().await.unwrap().unwrap();
    assert_eq!(out, [AppendOutcome::Stored(1)]);
}

/// A custody move stores a record settled already for the subscriptions that settled it
/// where it came from: only the others read it, and a `Replicated` topic reports who
/// settled it for its replicas.
#[tokio::test]
async fn an_append_settled_by_some_subscriptions_is_read_by_the_others_only() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut o = opts();
    o.settled_ids = Some(tx);
    let s = TopicStore::open(&entry(Durability::Replicated), dir.path(), &o).unwrap();
    s.set_subscriptions(vec!["ns/a".into(), "ns/b".into()]);
    let mut moved = items(&[0, 1]);
    moved[0].settled_by = vec!["ns/a".into(), "ns/gone".into()];
    s.append(moved).unwrap().await.unwrap().unwrap();
    let read = |sub: &str| {
        let sub = Arc::from(sub);
        let s = &s;
        async move {
            let batch = s.read(sub, 0, 10).await.unwrap();
            batch
                .records
                .into_iter()
                .map(|(o, _)| o)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read("ns/a").await, [1]);
    assert_eq!(read("ns/b").await, [0, 1]);
    let report = rx.recv().await.unwrap();
    assert_eq!(report.by_subscription, [(Arc::from("ns/a"), msg(0).id)]);
    assert!(report.ids.is_empty(), "{report:?}");

    // What a stopping sidecar hands off: each record with who settled it.
    let subs = [Arc::<str>::from("ns/a"), Arc::from("ns/b")];
    s.settle(vec![(Arc::from("ns/b"), 1, Outcome::Acked)]);
    let unsettled = s.unsettled(&subs).await.unwrap();
    let got: Vec<(u64, Vec<Arc<str>>)> = unsettled
        .into_iter()
        .map(|u| (u.offset, u.settled_by))
        .collect();
    assert_eq!(
        got,
        [(0, vec![Arc::from("ns/a")]), (1, vec![Arc::from("ns/b")])]
    );
}
