//! `ferryctl consume`: prints a subscription's deliveries and acks (or nacks) them.

use std::time::Duration;

use clap::Args;
use ferry_api::proto::v1::{AckRequest, Delivery, NackRequest};

use crate::client::{self, Consumer, Event};

/// Arguments of `ferryctl consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The sidecar's app gRPC address; the sidecar must be a member of the subscription's
    /// group to receive anything.
    #[arg(long, env = "FERRY_TO", default_value = "127.0.0.1:7700")]
    pub to: String,
    /// The subscription, `namespace/name` (or `name` in the sidecar's namespace).
    pub subscription: String,
    /// Stop after this many deliveries (default: run until Ctrl-C).
    #[arg(long, env = "FERRY_COUNT")]
    pub count: Option<u64>,
    /// Nack every delivery instead of acking it (to watch redelivery and dead-lettering).
    #[arg(long)]
    pub nack: bool,
    /// Delay asked for with each nack (Go duration); 0s uses the subscription's backoff.
    #[arg(long, value_parser = crate::cli::duration, default_value = "0s")]
    pub nack_delay: Duration,
    /// Deliveries in flight at once (the stream's credit).
    #[arg(long, default_value_t = 10)]
    pub credit: u32,
    /// Stop when nothing arrives for this long (Go duration, e.g. `5s`).
    #[arg(long, value_parser = crate::cli::duration)]
    pub idle_timeout: Option<Duration>,
}

/// One delivery as a line: ids, attempt, key, ordering sequence, headers, payload.
pub fn describe(d: &Delivery) -> String {
    let mut headers: Vec<_> = d.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    headers.sort();
    format!(
        "delivery {} sub={} msg={} topic={} attempt={} key={} seq={} producer={} headers={{{}}} payload={}",
        d.delivery_id,
        d.subscription,
        d.message_id,
        d.topic,
        d.attempt,
        d.key.as_deref().unwrap_or("-"),
        d.key_sequence,
        d.producer,
        headers.join(","),
        String::from_utf8_lossy(&d.payload).escape_debug()
    )
}

/// Runs `ferryctl consume`.
pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut app = client::connect(&args.to).await?;
    let mut consumer =
        Consumer::subscribe(&mut app, &args.subscription, args.credit.max(1)).await?;
    eprintln!(
        "consuming {} (topic {}) via {}",
        consumer.subscribed.subscription, consumer.subscribed.topic, args.to
    );
    let idle = args.idle_timeout.unwrap_or(Duration::from_secs(3600));
    let mut received = 0u64;
    while args.count.is_none_or(|n| received < n) {
        let event = tokio::select! {
            event = consumer.next(idle) => event?,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            None if args.idle_timeout.is_some() => {
                eprintln!("nothing for {idle:?}; stopping");
                break;
            }
            None => {}
            Some(Event::Delivery(d)) => {
                received += 1;
                println!("{}", describe(&d));
                // Unary settles, not stream frames: each is confirmed before the next
                // delivery is asked for, so none is lost when the command exits.
                let delivery_id = d.delivery_id.clone();
                if args.nack {
                    let delay_ms = u64::try_from(args.nack_delay.as_millis()).unwrap_or(u64::MAX);
                    app.nack(NackRequest {
                        delivery_id,
                        delay_ms,
                    })
                    .await?;
                } else {
                    app.ack(AckRequest { delivery_id }).await?;
                }
                consumer.credit(1)?;
            }
            Some(Event::SettleError(e)) => {
                let error = e
                    .error
                    .map(|e| format!("code {}: {}", e.code, e.message))
                    .unwrap_or_default();
                eprintln!("settling {} failed: {error}", e.delivery_id);
            }
        }
    }
    eprintln!(
        "{received} deliveries {}",
        if args.nack { "nacked" } else { "acked" }
    );
    Ok(())
}
