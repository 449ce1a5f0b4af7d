//! Unit tests of `InboxState`.

use super::*;
use crate::consumer::ReplyTo;

fn arrival(seq: u64, offset: Offset, attempt: u32) -> Arrival {
    Arrival {
        seq,
        reply: ReplyTo::Remote("ns/producer".into()),
        producer: "ns/producer".into(),
        offset,
        attempt,
        ack_wait: Duration::from_secs(10),
        delivery: Delivery {
            delivery_id: format!("d{seq}"),
            message_id: format!("m{offset}"),
            ..Default::default()
        },
    }
}

#[test]
fn credits_bound_what_is_handed_out() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept((0..5).map(|i| arrival(i, i, 1)).collect(), now, &mut out);
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 2, tx, true, now);
    assert_eq!(s.take_handed(), 2);
    assert_eq!(rx.try_recv().unwrap().delivery_id, "d0");
    assert_eq!(rx.try_recv().unwrap().delivery_id, "d1");
    assert!(rx.try_recv().is_err());
    s.add_credit(1, 10, now);
    assert_eq!(s.take_handed(), 3);
    assert!(out.is_empty());
}

#[test]
fn ack_once_then_precise_errors() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept(vec![arrival(7, 0, 1)], now, &mut out);
    let (tx, _rx) = mpsc::unbounded_channel();
    s.open_session(1, 1, tx, true, now);
    assert_eq!(s.query("ns/producer", 0, 1), DeliveryState::InProgress);
    s.settle(7, None, now, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].settled.outcome, Outcome::Acked as i32);
    assert_eq!(s.settle(7, None, now, &mut out), Err(Finish::Acked));
    assert_eq!(out.len(), 1, "no double settle");
    assert_eq!(s.query("ns/producer", 0, 1), DeliveryState::Acked);
    assert_eq!(s.query("ns/producer", 1, 1), DeliveryState::Unknown);
}

#[test]
fn expiry_nacks_and_late_ack_is_refused() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    let (tx, _rx) = mpsc::unbounded_channel();
    s.open_session(1, 1, tx, true, now);
    s.sweep(now + Duration::from_secs(11), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].settled.outcome, Outcome::Nacked as i32);
    assert_eq!(s.settle(1, None, now, &mut out), Err(Finish::Expired));
    assert_eq!(out.len(), 1);
}

#[test]
fn a_repeat_of_a_held_delivery_relinks_without_a_second_copy() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    assert_eq!(rx.try_recv().unwrap().delivery_id, "d1");
    // The producer restarted and sends it again: the app keeps its copy, and the new
    // attempt is the one answered and queried.
    s.accept(vec![arrival(2, 0, 2)], now, &mut out);
    assert!(rx.try_recv().is_err(), "no second copy");
    assert_eq!(s.take_handed(), 1);
    assert_eq!(s.held_len(), 1);
    assert_eq!(s.query("ns/producer", 0, 2), DeliveryState::InProgress);
    assert_eq!(s.query("ns/producer", 0, 1), DeliveryState::InProgress);
    assert_eq!(s.query("ns/producer", 0, 3), DeliveryState::Unknown);
    s.settle(1, None, now, &mut out).unwrap();
    // Whichever attempt the producer's current process holds in flight gets the ack.
    let answered: Vec<(u32, i32)> = out
        .iter()
        .map(|r| (r.settled.attempt, r.settled.outcome))
        .collect();
    let acked = Outcome::Acked as i32;
    assert_eq!(answered, vec![(1, acked), (2, acked)]);
}

#[test]
fn a_repeat_of_a_queued_delivery_carries_the_new_attempt() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    s.accept(vec![arrival(2, 0, 2)], now, &mut out);
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    let d = rx.try_recv().unwrap();
    assert_eq!((d.delivery_id.as_str(), d.attempt), ("d1", 2));
    assert!(rx.try_recv().is_err(), "no second copy");
    // A late forward of a dead process (a lower attempt) does not lower it.
    s.accept(vec![arrival(3, 0, 1)], now, &mut out);
    s.close_session(1, &mut out);
    let attempts: Vec<u32> = out.iter().map(|r| r.settled.attempt).collect();
    assert_eq!(attempts, vec![1, 2], "each attempt answered once");
    assert_eq!(s.held_len(), 0);
}

#[test]
fn a_repeat_of_an_acked_delivery_is_answered_acked() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    s.settle(1, None, now, &mut out).unwrap();
    out.clear();
    let _ = rx.try_recv();
    s.accept(vec![arrival(2, 0, 2)], now, &mut out);
    assert!(rx.try_recv().is_err(), "not handed again");
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].settled.attempt, out[0].settled.outcome),
        (2, Outcome::Acked as i32)
    );
}

#[test]
fn another_message_at_a_known_offset_is_new() {
    // A producer whose data dir was wiped numbers from 0 again: not the same message.
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    s.settle(1, None, now, &mut out).unwrap();
    out.clear();
    let _ = rx.try_recv();
    let mut other = arrival(2, 0, 1);
    other.delivery.message_id = "fresh".into();
    s.accept(vec![other], now, &mut out);
    assert!(out.is_empty());
    assert_eq!(rx.try_recv().unwrap().message_id, "fresh");
    let mut third = arrival(3, 0, 1);
    third.delivery.message_id = "newer".into();
    s.accept(vec![third], now, &mut out);
    assert_eq!(s.finished(2), Some(Finish::Superseded));
    assert_eq!(s.held_len(), 1);
}

#[test]
fn exactly_once_suppresses_acked_ids() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    s.exactly_once_window = Some(Duration::from_secs(60));
    let mut out = Vec::new();
    let (tx, _rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![arrival(1, 0, 1)], now, &mut out);
    s.settle(1, None, now, &mut out).unwrap();
    // The producer lost the ack and redelivers: answered at once, not handed out.
    s.accept(vec![arrival(2, 0, 2)], now, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(s.take_handed(), 1);
}

#[test]
fn exactly_once_links_another_origins_copy_to_the_held_one() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    s.exactly_once_window = Some(Duration::from_secs(60));
    let mut out = Vec::new();
    s.accept(vec![arrival(1, 5, 1)], now, &mut out);
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    assert_eq!(rx.try_recv().unwrap().message_id, "m5");
    // The same message from a replica that took custody: another origin, attempt 2.
    let mut twin = arrival(2, 9, 2);
    twin.producer = "ns/replica".into();
    twin.reply = ReplyTo::Remote("ns/replica".into());
    twin.delivery.message_id = "m5".into();
    s.accept(vec![twin], now, &mut out);
    assert!(rx.try_recv().is_err(), "the app gets one copy");
    assert_eq!(s.held_len(), 1);
    assert_eq!(s.query("ns/replica", 9, 2), DeliveryState::InProgress);
    assert_eq!(s.query("ns/replica", 9, 1), DeliveryState::Unknown);

    // One ack answers both origins.
    s.settle(1, None, now, &mut out).unwrap();
    let answered: Vec<(u64, u32, i32)> = out
        .iter()
        .map(|r| (r.settled.offset, r.settled.attempt, r.settled.outcome))
        .collect();
    assert_eq!(
        answered,
        [(5, 1, Outcome::Acked as i32), (9, 2, Outcome::Acked as i32)]
    );
    assert_eq!(s.query("ns/replica", 9, 2), DeliveryState::Acked);
    assert_eq!(s.held_len(), 0);
}

#[test]
fn without_exactly_once_another_origins_copy_is_its_own_delivery() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept(vec![arrival(1, 5, 1)], now, &mut out);
    let mut twin = arrival(2, 9, 2);
    twin.producer = "ns/replica".into();
    twin.delivery.message_id = "m5".into();
    s.accept(vec![twin], now, &mut out);
    assert_eq!(s.held_len(), 2);
}
