//! Talking to a sidecar's app API over gRPC: connecting, and a consumer that wraps the
//! `Consume` stream's subscribe/credit/ack/nack frames.
//!
//! `ferryctl consume`, `ferryctl bench` and the process-level tests all consume through
//! [`Consumer`], so flow control is done one way everywhere: credit is granted up front and
//! topped up as deliveries are settled.

use std::time::Duration;

use ferry_api::proto::v1::app_client::AppClient;
use ferry_api::proto::v1::consume_request::Frame as RequestFrame;
use ferry_api::proto::v1::consume_response::Frame as ResponseFrame;
use ferry_api::proto::v1::{
    AckFrame, ConsumeRequest, ConsumeResponse, Credit, Delivery, NackFrame, SettleError, Subscribe,
    Subscribed,
};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// The gRPC client of the app API.
pub type App = AppClient<Channel>;

/// Why talking to a sidecar failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad sidecar address {addr:?}: {source}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to the sidecar at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the sidecar ended the consume stream")]
    StreamEnded,
    #[error("the sidecar answered the subscribe with {0} instead of `subscribed`")]
    UnexpectedFrame(String),
}

/// Connects to a sidecar's app gRPC endpoint (`host:port`, or a full `http://` URL).
pub async fn connect(addr: &str) -> Result<App, ClientError> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|source| ClientError::Address {
            addr: addr.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
    Ok(AppClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

/// What a consume stream yields besides deliveries.
#[derive(Debug)]
pub enum Event {
    Delivery(Delivery),
    /// An ack or nack frame the sidecar refused (unknown or expired delivery id).
    SettleError(SettleError),
}

/// One `Consume` stream of one subscription.
#[derive(Debug)]
pub struct Consumer {
    tx: mpsc::UnboundedSender<ConsumeRequest>,
    rx: Streaming<ConsumeResponse>,
    /// The sidecar's answer to the subscribe: the subscription's and topic's full names.
    pub subscribed: Subscribed,
}

impl Consumer {
    /// Opens the stream, subscribes with `credit`, and waits for `subscribed` (an unknown
    /// subscription fails here with the sidecar's status, e.g. NOT_FOUND).
    pub async fn subscribe(
        client: &mut App,
        subscription: &str,
        credit: u32,
    ) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let first = ConsumeRequest {
            frame: Some(RequestFrame::Subscribe(Subscribe {
                subscription: subscription.into(),
                initial_credit: credit,
            })),
        };
        // The receiver is alive: it is moved into the request stream below.
        let _ = tx.send(first);
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut rx = client.consume(stream).await?.into_inner();
        match rx.message().await? {
            Some(ConsumeResponse {
                frame: Some(ResponseFrame::Subscribed(subscribed)),
            }) => Ok(Self { tx, rx, subscribed }),
            Some(other) => Err(ClientError::UnexpectedFrame(format!("{:?}", other.frame))),
            None => Err(ClientError::StreamEnded),
        }
    }

    /// The next delivery or settle error; `Ok(None)` when nothing came within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        loop {
            let message = match tokio::time::timeout(timeout, self.rx.message()).await {
                Err(_) => return Ok(None),
                Ok(message) => message?,
            };
            match message.and_then(|m| m.frame) {
                Some(ResponseFrame::Delivery(d)) => return Ok(Some(Event::Delivery(d))),
                Some(ResponseFrame::SettleError(e)) => return Ok(Some(Event::SettleError(e))),
                // A repeated `subscribed` carries nothing new.
                Some(ResponseFrame::Subscribed(_)) => {}
                None => return Err(ClientError::StreamEnded),
            }
        }
    }

    fn send(&self, frame: RequestFrame) -> Result<(), ClientError> {
        self.tx
            .send(ConsumeRequest { frame: Some(frame) })
            .map_err(|_| ClientError::StreamEnded)
    }

    /// Acks a delivery on this stream.
    pub fn ack(&self, delivery_id: &str) -> Result<(), ClientError> {
        self.send(RequestFrame::Ack(AckFrame {
            delivery_id: delivery_id.into(),
            ..AckFrame::default()
        }))
    }

    /// Nacks a delivery on this stream; `delay_ms = 0` uses the subscription's backoff.
    pub fn nack(&self, delivery_id: &str, delay_ms: u64) -> Result<(), ClientError> {
        self.send(RequestFrame::Nack(NackFrame {
            delivery_id: delivery_id.into(),
            delay_ms,
        }))
    }

    /// Grants `n` more deliveries.
    pub fn credit(&self, n: u32) -> Result<(), ClientError> {
        self.send(RequestFrame::Credit(Credit { n }))
    }

    /// Acks `delivery_ids` and grants as many credits, in one frame: the steady state of a
    /// consumer that keeps its window full.
    pub fn ack_all_and_refill(&self, delivery_ids: Vec<String>) -> Result<(), ClientError> {
        let credit = u32::try_from(delivery_ids.len()).unwrap_or(u32::MAX);
        self.send(RequestFrame::Ack(AckFrame {
            delivery_ids,
            credit,
            ..AckFrame::default()
        }))
    }

    /// Acks and grants one more credit (two frames; see [`Self::ack_all_and_refill`]).
    pub fn ack_and_refill(&self, delivery_id: &str) -> Result<(), ClientError> {
        self.ack(delivery_id)?;
        self.credit(1)
    }
}
