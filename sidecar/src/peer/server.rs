//! The `ferry.v1.Peer` service: deliveries from producer sidecars go to this sidecar's
//! consumer; settlements go back on the producer's newest stream, coalesced into batches.

use std::sync::Arc;

use ferry_api::proto::v1::peer_server::Peer;
use ferry_api::proto::v1::{
    ForwardRequest, ForwardResponse, QueryDeliveryRequest, QueryDeliveryResponse, Settled,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::consumer::{Consumer, Incoming, ReplyTo};

/// Settlements coalesced into one `ForwardResponse`.
const SETTLED_BATCH: usize = 4096;

/// The peer service of one sidecar.
#[derive(Debug, Clone)]
pub struct PeerService {
    consumer: Arc<Consumer>,
    stop: CancellationToken,
}

impl PeerService {
    /// Serves `consumer` until `stop`.
    pub fn new(consumer: Arc<Consumer>, stop: CancellationToken) -> Self {
        Self { consumer, stop }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
        let (out_tx, out_rx) = mpsc::channel(16);
        let consumer = self.consumer.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut producers: Vec<Arc<str>> = Vec::new();
            loop {
                let req = tokio::select! {
                    r = inbound.message() => r,
                    _ = stop.cancelled() => break,
                };
                let req = match req {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "forward stream from a producer ended");
                        break;
                    }
                };
                let mut incoming = Vec::with_capacity(req.deliveries.len());
                for deliver in req.deliveries {
                    let producer = match producers.iter().find(|p| ***p == *deliver.producer) {
                        Some(p) => p.clone(),
                        None => {
                            let p: Arc<str> = deliver.producer.as_str().into();
                            consumer.attach_producer(p.clone(), settled_tx.clone());
                            producers.push(p.clone());
                            p
                        }
                    };
                    incoming.push(Incoming {
                        reply: ReplyTo::Remote(producer),
                        deliver,
                    });
                }
                consumer.accept(incoming);
            }
            for p in producers {
                consumer.detach_producer(&p, &settled_tx);
            }
        });
        tokio::spawn(async move {
            while let Some(first) = settled_rx.recv().await {
                let mut settled = vec![first];
                while settled.len() < SETTLED_BATCH {
                    match settled_rx.try_recv() {
                        Ok(s) => settled.push(s),
                        Err(_) => break,
                    }
                }
                if out_tx.send(Ok(ForwardResponse { settled })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn query_delivery(
        &self,
        request: Request<QueryDeliveryRequest>,
    ) -> Result<Response<QueryDeliveryResponse>, Status> {
        let r = request.into_inner();
        let state = self
            .consumer
            .query(&r.producer, &r.subscription, r.offset, r.attempt);
        Ok(Response::new(QueryDeliveryResponse {
            state: state as i32,
        }))
    }
}
