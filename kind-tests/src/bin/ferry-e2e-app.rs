//! `ferry-e2e-app`: the small app of the end-to-end suite. It runs inside a pod's network
//! namespace next to that pod's sidecar, publishes or consumes through the sidecar's app
//! API on the namespace's loopback, and writes what it saw as JSON lines
//! (`ferry_kind_tests::app_events`) for the test to check.
//!
//! `publish` sends `--count` messages (ids `<prefix>-<i>`), each retried with the same id
//! until the sidecar acks it (the topic's dedup window makes a retry after a lost ack
//! harmless), then writes `done` and exits. `consume` subscribes (retrying until the
//! sidecar knows the subscription), writes `subscribed`, and acks (or nacks) every
//! delivery until it is killed; a broken stream is reopened.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferry_api::proto::v1::{AckLevel, PublishRequest};
use ferry_kind_tests::app_events::{AppEvent, EventWriter};
use ferryctl::client::{self, App, Consumer, Event};
use tokio::time::{Instant, sleep};

/// How long the app keeps retrying to reach its sidecar, or one message's publish.
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(
    name = "ferry-e2e-app",
    about = "Publishes or consumes through a pod's sidecar, recording a JSON-lines history"
)]
struct Cli {
    /// The sidecar's app gRPC endpoint (the pod's loopback).
    #[arg(long, default_value = "127.0.0.1:7700")]
    sidecar: String,
    /// Where the JSON-lines history goes (appended).
    #[arg(long)]
    history: PathBuf,
    /// This pod's name (the producer or member name in the history).
    #[arg(long)]
    pod: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Publish {
        /// `namespace/name` of the topic.
        #[arg(long)]
        topic: String,
        /// Message ids are `<prefix>-<i>`.
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Index of the first message.
        #[arg(long, default_value_t = 1)]
        first: u64,
        /// Keys `k0..k<keys-1>`, round robin (0: no key).
        #[arg(long, default_value_t = 0)]
        keys: u64,
        /// One key for every message (instead of `--keys`).
        #[arg(long, conflicts_with = "keys")]
        key: Option<String>,
        /// `name=value` headers on every message.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Pause between two publishes.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    Consume {
        /// `namespace/name` of the subscription.
        #[arg(long)]
        subscription: String,
        /// The group name written in the history.
        #[arg(long)]
        group: String,
        /// Nack every delivery (a poison-message app).
        #[arg(long)]
        nack: bool,
        #[arg(long, default_value_t = 16)]
        credit: u32,
        /// Ack only this many deliveries, then keep receiving without settling (an app
        /// that hangs with messages in flight).
        #[arg(long)]
        stop_acking_after: Option<u64>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut out = EventWriter::open(&cli.history)
        .with_context(|| format!("opening {}", cli.history.display()))?;
    let mut app = connect(&cli.sidecar).await?;
    match cli.command {
        Command::Publish {
            topic,
            prefix,
            count,
            first,
            keys,
            key: fixed_key,
            headers,
            interval_ms,
        } => {
            let headers = parse_headers(&headers)?;
            let (mut acked, mut failed) = (0, 0);
            for i in first..first + count {
                let id = format!("{prefix}-{i}");
                let key = fixed_key
                    .clone()
                    .or_else(|| (keys > 0).then(|| format!("k{}", i % keys)));
                out.write(&AppEvent::Attempt {
                    producer: cli.pod.clone(),
                    topic: topic.clone(),
                    id: id.clone(),
                    key: key.clone(),
                })?;
                let request = PublishRequest {
                    topic: topic.clone(),
                    message_id: id.clone(),
                    key,
                    headers: headers.clone(),
                    payload: format!("{id} payload").into_bytes().into(),
                    ack_level: AckLevel::Stored.into(),
                    ..PublishRequest::default()
                };
                let deadline = Instant::now() + PATIENCE;
                loop {
                    match app.publish(request.clone()).await {
                        Ok(_) => {
                            out.write(&AppEvent::Acked { id: id.clone() })?;
                            acked += 1;
                            break;
                        }
                        Err(status) => {
                            failed += 1;
                            out.write(&AppEvent::PublishFailed {
                                id: id.clone(),
                                error: format!("{:?}: {}", status.code(), status.message()),
                            })?;
                            if Instant::now() >= deadline {
                                bail!("publishing {id}: {status}");
                            }
                            sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                if interval_ms > 0 {
                    sleep(Duration::from_millis(interval_ms)).await;
                }
            }
            out.write(&AppEvent::Done { acked, failed })?;
        }
        Command::Consume {
            subscription,
            group,
            nack,
            credit,
            stop_acking_after,
        } => loop {
            let mut consumer = subscribe(&mut app, &subscription, credit).await?;
            out.write(&AppEvent::Subscribed {
                subscription: subscription.clone(),
            })?;
            if let Err(error) = consume(
                &mut consumer,
                &mut out,
                &group,
                &cli.pod,
                nack,
                stop_acking_after,
            )
            .await
            {
                eprintln!("consume stream ended ({error:#}); subscribing again");
                sleep(Duration::from_millis(200)).await;
                app = connect(&cli.sidecar).await?;
            }
        },
    }
    Ok(())
}

/// Connects to the sidecar, waiting while it starts.
async fn connect(addr: &str) -> Result<App> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client::connect(addr).await {
            Ok(app) => return Ok(app),
            Err(error) if Instant::now() >= deadline => {
                return Err(error).with_context(|| format!("connecting to {addr}"));
            }
            Err(_) => sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Subscribes, retrying while the sidecar does not know the subscription yet (its routing
/// table arrives by etcd watch).
async fn subscribe(app: &mut App, subscription: &str, credit: u32) -> Result<Consumer> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match Consumer::subscribe(app, subscription, credit).await {
            Ok(consumer) => return Ok(consumer),
            Err(error) if Instant::now() >= deadline => {
                return Err(error).with_context(|| format!("subscribing to {subscription}"));
            }
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Records and settles deliveries until the stream fails.
async fn consume(
    consumer: &mut Consumer,
    out: &mut EventWriter,
    group: &str,
    member: &str,
    nack: bool,
    stop_acking_after: Option<u64>,
) -> Result<()> {
    let mut settled = 0u64;
    loop {
        match consumer.next(Duration::from_secs(1)).await? {
            Some(Event::Delivery(d)) => {
                out.write(&AppEvent::Delivered {
                    group: group.to_owned(),
                    member: member.to_owned(),
                    id: d.message_id.clone(),
                    attempt: d.attempt,
                    key_sequence: d.key_sequence,
                    headers: d
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<BTreeMap<_, _>>(),
                })?;
                if stop_acking_after.is_some_and(|n| settled >= n) {
                    // Hung: received, never settled; the credit is not refilled either.
                } else if nack {
                    settled += 1;
                    consumer.nack(&d.delivery_id, 0)?;
                    consumer.credit(1)?;
                } else {
                    settled += 1;
                    consumer.ack_and_refill(&d.delivery_id)?;
                    out.write(&AppEvent::ConsumerAcked {
                        group: group.to_owned(),
                        member: member.to_owned(),
                        id: d.message_id,
                    })?;
                }
            }
            Some(Event::SettleError(e)) => {
                eprintln!("settle error for {}: {:?}", e.delivery_id, e.error);
            }
            None => {}
        }
    }
}

fn parse_headers(headers: &[String]) -> Result<HashMap<String, String>> {
    headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("header {h:?} is not name=value"))
        })
        .collect()
}
