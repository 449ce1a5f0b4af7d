//! `ferry.v1.App` over tonic.

use std::pin::Pin;
use std::sync::Arc;

use ferry_api::proto::v1::app_server::App;
use ferry_api::proto::v1::consume_request::Frame as In;
use ferry_api::proto::v1::consume_response::Frame as Out;
use ferry_api::proto::v1::publish_result::Result as PubResult;
use ferry_api::proto::v1::*;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::error::{Error, to_proto};
use crate::routing::qualify;

/// Publish batches of one stream in flight at once.
const PIPELINE: usize = 64;

/// The app service of one sidecar.
#[derive(Debug, Clone)]
pub struct AppService {
    engine: Arc<Engine>,
}

impl AppService {
    /// Serves `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn consume_error(delivery_id: String, e: &Error) -> ConsumeResponse {
    ConsumeResponse {
        frame: Some(Out::SettleError(SettleError {
            delivery_id,
            error: Some(to_proto(e)),
        })),
    }
}

#[tonic::async_trait]
impl App for AppService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let mut results = self.engine.publish(vec![request.into_inner()]).await;
        match results.pop() {
            Some(Ok(r)) => Ok(Response::new(r)),
            Some(Err(e)) => Err(e.into()),
            None => Err(Status::internal("no publish result")),
        }
    }

    type PublishStreamStream = ReceiverStream<Result<PublishBatchResult, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishBatch>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(PIPELINE);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let mut pending = FuturesOrdered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    m = inbound.message(), if reading && pending.len() < PIPELINE => match m {
                        Ok(Some(batch)) => {
                            let engine = engine.clone();
                            pending.push_back(async move {
                                let results = engine.publish(batch.messages).await;
                                PublishBatchResult {
                                    batch_id: batch.batch_id,
                                    results: results.into_iter().map(|r| PublishResult {
                                        result: Some(match r {
                                            Ok(ok) => PubResult::Ok(ok),
                                            Err(e) => PubResult::Error(to_proto(&e)),
                                        }),
                                    }).collect(),
                                }
                            });
                        }
                        Ok(None) => reading = false,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    },
                    Some(result) = pending.next(), if !pending.is_empty() => {
                        if tx.send(Ok(result)).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ConsumeStream = BoxStream<ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("consume stream closed before its subscribe frame")
        })?;
        let Some(In::Subscribe(subscribe)) = first.frame else {
            return Err(Status::invalid_argument(
                "the first frame of a consume stream must be subscribe",
            ));
        };
        let name = qualify(&self.engine.identity.namespace, &subscribe.subscription);
        let (session, deliveries) =
            self.engine
                .consumer
                .open_session(&name, u64::from(subscribe.initial_credit), true)?;
        let subscribed = ConsumeResponse {
            frame: Some(Out::Subscribed(Subscribed {
                subscription: session.subscription().to_owned(),
                topic: session.topic().to_owned(),
            })),
        };
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel::<ConsumeResponse>();
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let stop = engine.stop.clone();
            loop {
                let m = tokio::select! {
                    m = inbound.message() => m,
                    _ = stop.cancelled() => break,
                };
                let frame = match m {
                    Ok(Some(ConsumeRequest { frame: Some(f) })) => f,
                    Ok(Some(ConsumeRequest { frame: None })) => continue,
                    Ok(None) | Err(_) => break,
                };
                let results = match frame {
                    In::Credit(c) => {
                        session.add_credit(u64::from(c.n));
                        continue;
                    }
                    In::Ack(a) => {
                        let ids = (!a.delivery_id.is_empty())
                            .then_some(a.delivery_id)
                            .into_iter()
                            .chain(a.delivery_ids);
                        let mut results: Vec<_> = ids
                            .map(|id| {
                                let r = engine.consumer.settle(&id, None);
                                (id, r)
                            })
                            .collect();
                        if results.is_empty() && a.credit == 0 {
                            results.push((
                                String::new(),
                                Err(Error::InvalidArgument(
                                    "an ack frame names no delivery id".into(),
                                )),
                            ));
                        }
                        if a.credit > 0 {
                            session.add_credit(u64::from(a.credit));
                        }
                        results
                    }
                    In::Nack(n) => {
                        let r = engine.consumer.settle(&n.delivery_id, Some(n.delay_ms));
                        vec![(n.delivery_id, r)]
                    }
                    In::Subscribe(_) => vec![(
                        String::new(),
                        Err(Error::InvalidArgument(
                            "a consume stream subscribes once; open another stream".into(),
                        )),
                    )],
                };
                let failed = results
                    .into_iter()
                    .filter_map(|(id, r)| r.err().map(|e| (id, e)));
                let mut answered = true;
                for (id, e) in failed {
                    answered &= ctl_tx.send(consume_error(id, &e)).is_ok();
                }
                if !answered {
                    break;
                }
            }
            // Dropping the session returns its unacked deliveries for redelivery.
            drop(session);
        });
        let deliveries = UnboundedReceiverStream::new(deliveries).map(|d| ConsumeResponse {
            frame: Some(Out::Delivery(d)),
        });
        let out = futures::stream::once(async move { subscribed })
            .chain(futures::stream::select(
                deliveries,
                UnboundedReceiverStream::new(ctl_rx),
            ))
            .map(Ok);
        Ok(Response::new(Box::pin(out)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.engine
            .consumer
            .settle(&request.into_inner().delivery_id, None)?;
        Ok(Response::new(AckResponse {}))
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let r = request.into_inner();
        self.engine
            .consumer
            .settle(&r.delivery_id, Some(r.delay_ms))?;
        Ok(Response::new(NackResponse {}))
    }
}
