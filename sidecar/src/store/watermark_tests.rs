//! The high watermark: dispatchers read only records that met the topic's durability.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use ferry_api::crd::Durability;

use super::*;
use crate::log::tests::msg;
use crate::log::{LogError, Settlement};

/// A memory log whose `sync` fails (and poisons it) while `fail` is set, as a disk's
/// fsync can: `durable()` stays where the last good sync left it.
#[derive(Debug)]
struct FlakySync {
    inner: MemoryLog,
    durable: Offset,
    poisoned: bool,
    fail: Arc<AtomicBool>,
}

impl Log for FlakySync {
    fn append(&mut self, m: &[StoredMessage]) -> Result<Range<Offset>, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        self.inner.append(m)
    }
    fn sync(&mut self) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if self.fail.load(AtomicOrdering::Relaxed) {
            self.poisoned = true;
            return Err(LogError::Io {
                op: "fsync",
                path: "flaky".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.durable = self.inner.written();
        Ok(())
    }
    fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, StoredMessage)>, LogError> {
        self.inner.read(from, max)
    }
    fn settle(&mut self, s: &str, o: Offset, how: Settlement) -> Result<(), LogError> {
        self.inner.settle(s, o, how)
    }
    fn is_settled(&self, s: &str, o: Offset) -> bool {
        self.inner.is_settled(s, o)
    }
    fn set_subscriptions(&mut self, s: &[String]) -> Result<(), LogError> {
        self.inner.set_subscriptions(s)
    }
    fn compact(&mut self) -> Result<u64, LogError> {
        self.inner.compact()
    }
    fn written(&self) -> Offset {
        self.inner.written()
    }
    fn durable(&self) -> Offset {
        self.durable
    }
    fn acknowledged(&self) -> Offset {
        self.inner.acknowledged()
    }
    fn backlog_bytes(&self) -> u64 {
        self.inner.backlog_bytes()
    }
    fn first(&self) -> Offset {
        self.inner.first()
    }
    fn cursor(&self, s: &str) -> Option<Offset> {
        self.inner.cursor(s)
    }
    fn poisoned(&self) -> bool {
        self.poisoned
    }
}

fn entry(durability: Durability, replicas: u32) -> ferry_api::routing::TopicEntry {
    let mut t = crate::routing::tests::topic("ns", "t");
    t.durability = durability;
    t.replicas = replicas;
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

async fn read_all(s: &TopicStore) -> Vec<Offset> {
    let batch = s.read(Arc::from("ns/sub"), 0, 100).await.unwrap();
    batch.records.iter().map(|(o, _)| *o).collect()
}

#[tokio::test]
async fn a_failed_fsync_refuses_the_publish_and_hides_its_records() {
    let fail = Arc::new(AtomicBool::new(false));
    let log = FlakySync {
        inner: MemoryLog::new(),
        durable: 0,
        poisoned: false,
        fail: fail.clone(),
    };
    let s = TopicStore::start(&entry(Durability::Disk, 1), Box::new(log), &opts()).unwrap();
    s.set_subscriptions(vec!["ns/sub".into()]);
    s.append(items(&[0, 1])).unwrap().await.unwrap().unwrap();
    assert_eq!(*s.watch_written().borrow(), 2);
    fail.store(true, AtomicOrdering::Relaxed);
    let err = s.append(items(&[2])).unwrap().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("fsync"), "{err}");
    assert_eq!(
        *s.watch_written().borrow(),
        2,
        "the mark stays at the durable end"
    );
    assert_eq!(
        read_all(&s).await,
        [0, 1],
        "the refused record is never read"
    );
    assert!(s.stats.poisoned());
    // The tail must not serve it either, from any starting point.
    let batch = s.read(Arc::from("ns/sub"), 2, 100).await.unwrap();
    assert!(batch.records.is_empty());
    assert!(batch.next <= 2);
}

#[tokio::test]
async fn held_records_wait_for_their_copies_and_refused_ones_never_come() {
    let s = TopicStore::start(
        &entry(Durability::Replicated, 2),
        Box::new(MemoryLog::new()),
        &opts(),
    )
    .unwrap();
    s.set_subscriptions(vec!["ns/sub".into()]);
    let (outcomes, first) = s.append_held(items(&[0])).unwrap().await.unwrap().unwrap();
    assert_eq!(outcomes, [AppendOutcome::Stored(0)]);
    let (_, second) = s.append_held(items(&[1])).unwrap().await.unwrap().unwrap();
    assert_eq!(*s.watch_written().borrow(), 0);
    assert!(
        read_all(&s).await.is_empty(),
        "nothing before its copies are made"
    );
    // The second is confirmed first: it waits behind the first (the mark is a prefix).
    second.confirm();
    let mut mark = s.watch_written();
    assert_eq!(*mark.borrow_and_update(), 0);
    first.refuse();
    tokio::time::timeout(Duration::from_secs(5), mark.wait_for(|m| *m == 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read_all(&s).await,
        [1],
        "the refused record is settled, never read"
    );
    assert_eq!(s.cursor(Arc::from("ns/sub")).await.unwrap(), Some(1));
    // A hold dropped unanswered (the publisher went away) refuses its records.
    let (_, dropped) = s.append_held(items(&[2])).unwrap().await.unwrap().unwrap();
    drop(dropped);
    tokio::time::timeout(Duration::from_secs(5), mark.wait_for(|m| *m == 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_all(&s).await, [1]);
}
