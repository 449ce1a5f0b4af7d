//! Ack level `DELIVERED`: the answer says what each subscription made of the message, and
//! succeeds only when it reached every subscription it was for.
//!
//! - OK: every subscription registered when it was stored acked it, or filters it out,
//!   and at least one acked it.
//! - ABORTED: some subscription gave it up (dead-lettered, dropped, expired, handed off).
//! - DEADLINE_EXCEEDED: some subscription did not settle it within the wait.
//! - FAILED_PRECONDITION: no subscription takes it (none at all, or every filter excludes
//!   it): nothing will ever deliver it as things stand.
//!
//! The message is stored in every case; `deliveries` lists each subscription's outcome.

use std::time::Duration;

use ferry_api::proto::v1::{DeliveryOutcome, PublishResponse};
use tokio::sync::watch;

use crate::error::{Error, NotDelivered};
use crate::store::DeliveryReport;

/// Waits up to `timeout` for every subscription to settle the message of `response`.
pub(super) async fn wait(
    response: PublishResponse,
    mut rx: watch::Receiver<DeliveryReport>,
    timeout: Duration,
) -> Result<PublishResponse, Error> {
    let waited = tokio::time::timeout(timeout, async {
        rx.wait_for(|r| r.done).await.map(|r| r.clone())
    })
    .await;
    match waited {
        Ok(Ok(report)) => verdict(response, &report, None),
        Ok(Err(_)) => Err(Error::Internal("the store stopped before delivery".into())),
        Err(_) => {
            let report = rx.borrow().clone();
            verdict(response, &report, Some(timeout))
        }
    }
}

/// How a message read in an error: "dead-lettered".
fn words(o: DeliveryOutcome) -> &'static str {
    match o {
        DeliveryOutcome::Acked => "acked",
        DeliveryOutcome::Filtered => "filtered out",
        DeliveryOutcome::DeadLettered => "dead-lettered",
        DeliveryOutcome::Dropped => "dropped",
        DeliveryOutcome::Expired => "expired",
        DeliveryOutcome::TimedOut => "timed out",
        DeliveryOutcome::HandedOff => "handed off to a peer",
        DeliveryOutcome::Unspecified => "unknown",
    }
}

/// The answer for `report` (`waited`: the wait ended at this timeout).
pub(super) fn verdict(
    mut response: PublishResponse,
    report: &DeliveryReport,
    waited: Option<Duration>,
) -> Result<PublishResponse, Error> {
    response.deliveries = report.to_proto();
    let outcomes: Vec<DeliveryOutcome> = response
        .deliveries
        .iter()
        .map(|d| DeliveryOutcome::try_from(d.outcome).unwrap_or(DeliveryOutcome::Unspecified))
        .collect();
    let any = |want: &[DeliveryOutcome]| outcomes.iter().any(|o| want.contains(o));
    let listed = || {
        response
            .deliveries
            .iter()
            .zip(&outcomes)
            .map(|(d, o)| format!("{} {}", d.subscription, words(*o)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (kind, summary) = if outcomes.is_empty() {
        (
            NotDelivered::NoReceiver,
            "is stored, but its topic has no subscription to deliver it to".to_owned(),
        )
    } else if any(&[
        DeliveryOutcome::DeadLettered,
        DeliveryOutcome::Dropped,
        DeliveryOutcome::Expired,
        DeliveryOutcome::HandedOff,
    ]) {
        (
            NotDelivered::GaveUp,
            format!("was not acked by every subscription: {}", listed()),
        )
    } else if any(&[DeliveryOutcome::TimedOut]) {
        let ms = waited.map_or(0, |t| t.as_millis() as u64);
        (
            NotDelivered::TimedOut,
            format!(
                "was not settled by every subscription within {ms} ms: {}",
                listed()
            ),
        )
    } else if !any(&[DeliveryOutcome::Acked]) {
        (
            NotDelivered::NoReceiver,
            format!(
                "is stored, but every subscription's filter excludes it: {}",
                listed()
            ),
        )
    } else {
        return Ok(response);
    };
    Err(Error::NotDelivered {
        message_id: response.message_id,
        offset: response.offset,
        kind,
        summary,
        deliveries: response.deliveries,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Outcome;

    fn report(outcomes: &[(&str, Option<Outcome>)]) -> DeliveryReport {
        let mut r = DeliveryReport {
            expected: outcomes.iter().map(|(s, _)| Arc::from(*s)).collect(),
            ..DeliveryReport::default()
        };
        for (s, o) in outcomes {
            if let Some(o) = o {
                r.record(s, *o);
            }
        }
        r
    }

    fn code(r: &Result<PublishResponse, Error>) -> tonic::Code {
        r.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok)
    }

    #[test]
    fn success_only_when_every_subscription_it_was_for_acked() {
        let ok = PublishResponse::default;
        let acked = Some(Outcome::Acked);
        let filtered = Some(Outcome::Filtered);
        let r = verdict(ok(), &report(&[("a", acked), ("b", filtered)]), None);
        assert_eq!(code(&r), tonic::Code::Ok);
        assert_eq!(r.unwrap().deliveries.len(), 2);
        let r = verdict(ok(), &report(&[("a", filtered)]), None);
        assert_eq!(code(&r), tonic::Code::FailedPrecondition);
        let r = verdict(ok(), &report(&[]), None);
        assert_eq!(code(&r), tonic::Code::FailedPrecondition);
        assert!(r.unwrap_err().to_string().contains("no subscription"));
        let dead = Some(Outcome::DeadLettered);
        let r = verdict(
            ok(),
            &report(&[("a", acked), ("b", dead), ("c", None)]),
            None,
        );
        assert_eq!(code(&r), tonic::Code::Aborted);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("b dead-lettered"), "{e}");
        assert_eq!(e.deliveries()[2].outcome, DeliveryOutcome::TimedOut as i32);
        let r = verdict(
            ok(),
            &report(&[("a", acked), ("b", Some(Outcome::Sent))]),
            Some(Duration::from_millis(500)),
        );
        assert_eq!(code(&r), tonic::Code::DeadlineExceeded);
        let expired = Some(Outcome::Expired {
            dead_lettered: true,
        });
        let r = verdict(ok(), &report(&[("a", expired)]), None);
        assert!(r.unwrap_err().to_string().contains("a expired"));
    }
}
