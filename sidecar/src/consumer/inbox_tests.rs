//! Unit tests of `InboxState`.

use super::*;
use crate::consumer::ReplyTo;

/// What a producer of incarnation 1 asks about the message `m<offset>`.
fn query(s: &InboxState, producer: &str, offset: Offset, attempt: u32) -> DeliveryState {
    s.query(producer, offset, attempt, &format!("m{offset}"), 1)
}

fn arrival(seq: u64, offset: Offset, attempt: u32) -> Arrival {
    Arrival {
        seq,
        reply: ReplyTo::Remote("ns/producer".into()),
        producer: "ns/producer".into(),
        offset,
        attempt,
        incarnation: 1,
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
    assert_eq!(query(&s, "ns/producer", 0, 1), DeliveryState::InProgress);
    s.settle(7, None, now, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].settled.outcome, Outcome::Acked as i32);
    assert_eq!(s.settle(7, None, now, &mut out), Err(Finish::Acked));
    assert_eq!(out.len(), 1, "no double settle");
    assert_eq!(query(&s, "ns/producer", 0, 1), DeliveryState::Acked);
    assert_eq!(query(&s, "ns/producer", 1, 1), DeliveryState::Unknown);
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
    assert_eq!(query(&s, "ns/producer", 0, 2), DeliveryState::InProgress);
    assert_eq!(query(&s, "ns/producer", 0, 1), DeliveryState::InProgress);
    assert_eq!(query(&s, "ns/producer", 0, 3), DeliveryState::Unknown);
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
    assert_eq!(
        s.query("ns/replica", 9, 2, "m5", 1),
        DeliveryState::InProgress
    );
    assert_eq!(s.query("ns/replica", 9, 1, "m5", 1), DeliveryState::Unknown);

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
    assert_eq!(s.query("ns/replica", 9, 2, "m5", 1), DeliveryState::Acked);
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

/// The delivery of `message_id` from offset `offset`, attempt 1 of producer `incarnation`.
fn named(seq: u64, offset: Offset, message_id: &str, incarnation: u64) -> Arrival {
    let mut a = arrival(seq, offset, 1);
    a.delivery.message_id = message_id.into();
    a.incarnation = incarnation;
    a
}

#[test]
fn an_ack_of_another_message_at_a_reused_offset_answers_no_query() {
    // A Memory topic's producer restarted (incarnation 1 -> 2) and numbers from 0 again.
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![named(1, 0, "old", 1)], now, &mut out);
    s.settle(1, None, now, &mut out).unwrap();
    let _ = rx.try_recv();
    assert_eq!(s.query("ns/producer", 0, 1, "old", 1), DeliveryState::Acked);

    s.accept(vec![named(2, 0, "new", 2)], now, &mut out);
    assert_eq!(rx.try_recv().unwrap().message_id, "new");
    // The app still works on it: not settled by the ack of "old".
    assert_eq!(
        s.query("ns/producer", 0, 1, "new", 2),
        DeliveryState::InProgress
    );
    // Asked under the incarnation that did not send it, or about another message: unknown.
    assert_eq!(
        s.query("ns/producer", 0, 1, "new", 1),
        DeliveryState::Unknown
    );
    assert_eq!(
        s.query("ns/producer", 0, 1, "third", 2),
        DeliveryState::Unknown
    );
    // Once the new delivery expired, nothing answers ACKED for it.
    s.sweep(now + Duration::from_secs(11), &mut out);
    assert_eq!(
        s.query("ns/producer", 0, 1, "new", 2),
        DeliveryState::Unknown
    );
    // The acked message itself is still known as acked, whichever incarnation asks.
    assert_eq!(s.query("ns/producer", 0, 1, "old", 2), DeliveryState::Acked);
    // A producer too old to name its message is answered by offset, as it always was.
    assert_eq!(s.query("ns/producer", 0, 1, "", 0), DeliveryState::Acked);
}

#[test]
fn settlements_name_the_message_and_the_current_incarnation() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.open_session(1, 10, tx, true, now);
    s.accept(vec![named(1, 4, "m", 7)], now, &mut out);
    let _ = rx.try_recv();
    // The producer restarted (a Disk log keeps the message) and sends it again as its
    // attempt 2: the app keeps its copy, and the new process's attempt is answered.
    let mut again = named(2, 4, "m", 8);
    again.attempt = 2;
    s.accept(vec![again], now, &mut out);
    assert!(rx.try_recv().is_err(), "no second copy");
    assert_eq!(
        s.query("ns/producer", 4, 2, "m", 8),
        DeliveryState::InProgress
    );
    assert_eq!(s.query("ns/producer", 4, 2, "m", 7), DeliveryState::Unknown);
    s.settle(1, None, now, &mut out).unwrap();
    let names: Vec<(u64, u32, &str, u64)> = out
        .iter()
        .map(|r| {
            let t = &r.settled;
            (t.offset, t.attempt, t.message_id.as_str(), t.incarnation)
        })
        .collect();
    assert_eq!(names, [(4, 2, "m", 8)], "the dead process is not answered");
    // A repeat after the ack, from either incarnation, is answered with its own names.
    out.clear();
    let mut late = named(3, 4, "m", 7);
    late.attempt = 3;
    s.accept(vec![late], now, &mut out);
    let t = &out[0].settled;
    assert_eq!(
        (t.outcome, t.attempt, t.message_id.as_str(), t.incarnation),
        (Outcome::Acked as i32, 3, "m", 7)
    );
}

#[test]
fn a_rejection_names_the_message_it_refuses() {
    // Queued and never taken within ackWait: returned to the producer under its names.
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    s.accept(vec![named(1, 2, "x", 5)], now, &mut out);
    s.sweep(now + Duration::from_secs(11), &mut out);
    let t = &out[0].settled;
    assert_eq!(
        (t.outcome, t.offset, t.message_id.as_str(), t.incarnation),
        (Outcome::Rejected as i32, 2, "x", 5)
    );
}

#[test]
fn a_full_inbox_refuses_instead_of_growing() {
    let now = Instant::now();
    let mut s = InboxState::new("ns/sub".into());
    let mut out = Vec::new();
    let n = MAX_HELD as u64;
    s.accept(
        (0..n + 2).map(|i| arrival(i, i, 1)).collect(),
        now,
        &mut out,
    );
    assert_eq!(out.len(), 2, "only the two past the bound are answered");
    for r in &out {
        assert_eq!(r.settled.outcome, Outcome::Rejected as i32);
        assert!(
            r.settled.reason.contains("inbox full"),
            "{}",
            r.settled.reason
        );
    }
    assert_eq!(out[0].settled.offset, n);
}
