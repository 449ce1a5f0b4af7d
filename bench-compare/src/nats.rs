//! JetStream: publish with acks, a durable pull consumer with explicit acks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::drive::{Publisher, Receiver};

/// Unacked deliveries the consumer may hold: Ferry's bench subscription has `maxInFlight: 4096`.
const MAX_ACK_PENDING: i64 = 4096;

fn context(client: async_nats::Client) -> jetstream::Context {
    ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_ack_inflight(8192)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Creates stream `B<n>` on subject `bench.<n>` (file storage, one replica) and its consumer;
/// [`teardown`] deletes it.
pub async fn setup(addr: SocketAddr, n: u64) -> anyhow::Result<(NatsPublisher, NatsReceiver)> {
    let url = format!("nats://{addr}");
    let producer = async_nats::connect(&url).await.context("connecting")?;
    let consumer = async_nats::connect(&url).await.context("connecting")?;
    let js = context(producer);
    let name = format!("B{n}");
    let subject = format!("bench.{n}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .context("creating the stream")?;
    let cjs = context(consumer);
    let pull = cjs
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            },
            name.as_str(),
        )
        .await
        .context("creating the consumer")?;
    let messages = pull
        .stream()
        .max_messages_per_batch(1024)
        .messages()
        .await
        .context("starting to pull")?;
    Ok((
        NatsPublisher {
            js,
            subject,
            stream: name,
        },
        NatsReceiver { messages },
    ))
}

/// Deletes the scenario's stream.
pub async fn teardown(p: &NatsPublisher) -> anyhow::Result<()> {
    p.js.delete_stream(&p.stream)
        .await
        .context("deleting the stream")?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct NatsPublisher {
    js: jetstream::Context,
    subject: String,
    stream: String,
}

impl Publisher for NatsPublisher {
    async fn publish(&self, payload: Bytes) -> anyhow::Result<()> {
        self.js
            .publish(self.subject.clone(), payload)
            .await?
            .await?;
        Ok(())
    }

    /// JetStream async publish: send the whole batch, then collect its acks.
    async fn publish_batch(&self, payloads: Vec<Bytes>) -> anyhow::Result<u64> {
        let mut acks = Vec::with_capacity(payloads.len());
        for p in payloads {
            acks.push(self.js.publish(self.subject.clone(), p).await?);
        }
        let mut ok = 0;
        for a in acks {
            if a.await.is_ok() {
                ok += 1;
            }
        }
        Ok(ok)
    }
}

pub struct NatsReceiver {
    messages: pull::Stream,
}

impl std::fmt::Debug for NatsReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsReceiver")
    }
}

impl Receiver for NatsReceiver {
    async fn receive(&mut self, wait: Duration, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(()),
            Ok(None) => anyhow::bail!("the pull stream ended"),
            Ok(Some(m)) => m,
        };
        let m = first.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        out.push(m.message.payload.clone());
        Ok(())
    }
}
