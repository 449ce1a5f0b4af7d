//! `ferryctl publish`: publishes messages to a topic through a sidecar's gRPC app API.

use std::collections::HashMap;
use std::io::Read;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use ferry_api::proto::v1::{AckLevel, DeliveryOutcome, PublishRequest};

use crate::client;

/// Arguments of `ferryctl publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The sidecar's app gRPC address (`ferryctl dev` prints one per sidecar).
    #[arg(long, env = "FERRY_TO", default_value = "127.0.0.1:7700")]
    pub to: String,
    /// The topic, `namespace/name` (or `name` in the sidecar's namespace).
    pub topic: String,
    /// The payload; `-` reads it from standard input. `{i}` is replaced by the message's
    /// number (1, 2, ...), so `--count 3 'order {i}'` sends three different payloads.
    pub payload: String,
    /// Message key (ordered topics keep per-key order).
    #[arg(long, env = "FERRY_KEY")]
    pub key: Option<String>,
    /// A header `name=value`; repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = header)]
    pub headers: Vec<(String, String)>,
    /// How many messages to publish.
    #[arg(long, env = "FERRY_COUNT", default_value_t = 1)]
    pub count: u64,
    /// Message id (deduplicated within the topic's dedupWindow); with --count N, `-<i>` is
    /// appended. Default: the sidecar generates one.
    #[arg(long)]
    pub id: Option<String>,
    /// When the sidecar answers: once `stored` (the topic's durability was met), at once
    /// (`none`), or once every subscription settled it (`delivered`: each one's outcome is
    /// printed; an error unless every subscription it was for acked it).
    #[arg(long, value_enum, env = "FERRY_ACK_LEVEL", default_value_t = Level::Stored)]
    pub ack_level: Level,
}

/// The ack level of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    None,
    Stored,
    Delivered,
}

impl From<Level> for AckLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::None => AckLevel::None,
            Level::Stored => AckLevel::Stored,
            Level::Delivered => AckLevel::Delivered,
        }
    }
}

fn header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

/// Lines printed one per message before switching to a summary.
const PRINTED: u64 = 20;

/// Runs `ferryctl publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let payload = if args.payload == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("reading the payload from standard input")?;
        buf
    } else {
        args.payload.clone()
    };
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let mut app = client::connect(&args.to).await?;
    let headers: HashMap<String, String> = args.headers.iter().cloned().collect();
    let start = Instant::now();
    for i in 1..=args.count {
        let message_id = match (&args.id, args.count) {
            (Some(id), 1) => id.clone(),
            (Some(id), _) => format!("{id}-{i}"),
            (None, _) => String::new(),
        };
        let request = PublishRequest {
            topic: args.topic.clone(),
            message_id,
            key: args.key.clone(),
            headers: headers.clone(),
            payload: payload.replace("{i}", &i.to_string()).into_bytes().into(),
            ack_level: AckLevel::from(args.ack_level).into(),
            ..PublishRequest::default()
        };
        let response = app
            .publish(request)
            .await
            .with_context(|| {
                format!(
                    "publishing message {i} of {} to {} via {}",
                    args.count, args.topic, args.to
                )
            })?
            .into_inner();
        if i <= PRINTED {
            let dup = if response.duplicate {
                " (duplicate: already stored)"
            } else {
                ""
            };
            let outcomes: Vec<String> = response
                .deliveries
                .iter()
                .map(|d| {
                    let outcome = DeliveryOutcome::try_from(d.outcome)
                        .unwrap_or(DeliveryOutcome::Unspecified)
                        .as_str_name();
                    let outcome = outcome.strip_prefix("DELIVERY_OUTCOME_").unwrap_or(outcome);
                    format!("{} {outcome}", d.subscription)
                })
                .collect();
            let delivered = if outcomes.is_empty() {
                String::new()
            } else {
                format!(" delivered: {}", outcomes.join(", "))
            };
            println!(
                "published {} id={} offset={}{dup}{delivered}",
                args.topic, response.message_id, response.offset
            );
        }
    }
    if args.count > PRINTED {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "published {} messages to {} in {secs:.2}s ({:.0} msg/s)",
            args.count,
            args.topic,
            args.count as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
