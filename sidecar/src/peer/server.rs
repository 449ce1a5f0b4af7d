//! The `ferry.v1.Peer` service: deliveries from producer sidecars go to this sidecar's
//! consumer; settlements go back on the producer's newest stream, coalesced into batches.
//! It also holds replicated copies for other producers and takes custody of messages
//! handed to it (see `crate::replica`).

use std::sync::Arc;

use ferry_api::proto::v1::peer_server::Peer;
use ferry_api::proto::v1::{
    ForwardRequest, ForwardResponse, HeldRequest, HeldResponse, QueryDeliveryRequest,
    QueryDeliveryResponse, ReplicateRequest, ReplicateResponse, Settled, TakeCustodyRequest,
    TakeCustodyResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use ferry_api::identity::SpiffeId;

use super::authz;
use super::tls::PeerInfo;
use crate::consumer::{Consumer, Incoming, ReplyTo, rejected};
use crate::engine::Engine;
use crate::error::Error;
use crate::replica::pins::Claim;
use crate::replica::{Moved, custody, from_wire};

/// Settlements coalesced into one `ForwardResponse`.
const SETTLED_BATCH: usize = 4096;
/// Payload bytes of one `Held` answer.
const HELD_PAGE_BYTES: usize = 4 << 20;

/// The peer service of one sidecar.
#[derive(Debug, Clone)]
pub struct PeerService {
    consumer: Arc<Consumer>,
    engine: Arc<Engine>,
    stop: CancellationToken,
}

impl PeerService {
    /// Serves `engine` until `stop`.
    pub fn new(engine: Arc<Engine>, stop: CancellationToken) -> Self {
        Self {
            consumer: engine.consumer.clone(),
            engine,
            stop,
        }
    }
}

/// The identity the caller's certificate proved; `None` on a plaintext peer port.
fn caller<T>(request: &Request<T>) -> Option<SpiffeId> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|info| info.identity.clone())
}

impl PeerService {
    /// Counts and logs a refusal, and turns it into `PERMISSION_DENIED`.
    fn deny(&self, rpc: &str, caller: &SpiffeId, denied: authz::Denied) -> Status {
        self.engine.metrics.denied(rpc);
        tracing::warn!(rpc, %caller, reason = %denied, "peer call refused");
        Error::PermissionDenied(denied.to_string()).into()
    }

    /// `authz::holding` for a call by `caller`, if known, against the identity that
    /// `producer`'s copies here belong to.
    fn check_holding(
        &self,
        rpc: &str,
        caller: Option<&SpiffeId>,
        topic: &str,
        producer: &str,
    ) -> Result<(), Status> {
        let Some(caller) = caller else { return Ok(()) };
        let pinned = self.engine.replicas.pins().get(producer)?;
        let table = self.engine.table();
        authz::holding(
            &table,
            caller,
            &self.engine.identity.producer_id,
            topic,
            producer,
            pinned.as_deref(),
        )
        .map_err(|d| self.deny(rpc, caller, d))
    }

    /// Gives `producer`'s copies here to `caller` (the first to place any), or refuses a
    /// caller they do not belong to.
    fn claim(&self, caller: Option<&SpiffeId>, producer: &str) -> Result<(), Status> {
        let Some(caller) = caller else { return Ok(()) };
        match self
            .engine
            .replicas
            .pins()
            .claim(producer, &caller.to_string())?
        {
            Claim::Granted => Ok(()),
            Claim::Taken(owner) => Err(self.deny(
                "Replicate",
                caller,
                authz::Denied(format!(
                    "{caller} may not act for {producer:?}, whose copies here belong to {owner}"
                )),
            )),
        }
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("replica task failed: {e}"))
}

#[tonic::async_trait]
impl Peer for PeerService {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let caller = caller(&request);
        let mut inbound = request.into_inner();
        let engine = self.engine.clone();
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
                let table = caller.as_ref().map(|_| engine.table());
                for deliver in req.deliveries {
                    if let (Some(caller), Some(table)) = (&caller, &table) {
                        let verdict = authz::forward(
                            table,
                            caller,
                            &deliver.subscription,
                            &deliver.topic,
                            &deliver.producer,
                        );
                        if let Err(denied) = verdict {
                            engine.metrics.denied("Forward");
                            tracing::warn!(%caller, reason = %denied, "forwarded delivery refused");
                            let _ = settled_tx.send(rejected(deliver, denied.to_string()));
                            continue;
                        }
                    }
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
        if let Some(caller) = caller(&request) {
            authz::query(&self.engine.table(), &caller, &request.get_ref().producer)
                .map_err(|d| self.deny("QueryDelivery", &caller, d))?;
        }
        let state = self.consumer.query(request.get_ref());
        Ok(Response::new(QueryDeliveryResponse {
            state: state as i32,
        }))
    }

    async fn replicate(
        &self,
        request: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        self.check_holding("Replicate", caller.as_ref(), &r.topic, &r.producer)?;
        if !self.engine.table().topics.contains_key(&r.topic) && !r.copies.is_empty() {
            return Err(Error::UnknownTopic(r.topic).into());
        }
        if !r.copies.is_empty() {
            self.claim(caller.as_ref(), &r.producer)?;
        }
        let replicas = self.engine.replicas.clone();
        let topic = r.topic.clone();
        let max_bytes = match self.engine.table().topics.get(&r.topic) {
            Some(t) if t.retention_max_bytes > 0 => t.retention_max_bytes,
            _ => self.engine.config.replica_max_bytes,
        };
        let done = tokio::task::spawn_blocking(move || {
            let copies = r.copies.into_iter().map(from_wire).collect();
            replicas.replicate_within(
                max_bytes,
                &r.producer,
                &r.producer_address,
                &r.topic,
                r.incarnation,
                copies,
                &r.settled_ids,
                &r.settled_by,
            )
        })
        .await
        .map_err(blocking_failed)?;
        let done = match done {
            Ok(done) => done,
            Err(e @ Error::BacklogFull { .. }) => {
                self.engine
                    .metrics
                    .replica_full
                    .get_or_create(&crate::metrics::Metrics::topic(&topic))
                    .inc();
                tracing::warn!(%topic, error = %e, "copies refused: the replica is full");
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if done.settled_by_subscription > 0 {
            self.engine
                .metrics
                .replica_settled
                .get_or_create(&crate::metrics::Metrics::topic(&topic))
                .inc_by(done.settled_by_subscription);
        }
        Ok(Response::new(ReplicateResponse { held: done.held }))
    }

    async fn held(&self, request: Request<HeldRequest>) -> Result<Response<HeldResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        if r.topic.is_empty() {
            return Ok(Response::new(HeldResponse::default()));
        }
        self.check_holding("Held", caller.as_ref(), &r.topic, &r.producer)?;
        let replicas = self.engine.replicas.clone();
        let page = tokio::task::spawn_blocking(move || {
            replicas.held(
                &r.producer,
                &r.topic,
                r.exclude_incarnation,
                r.from,
                HELD_PAGE_BYTES,
            )
        })
        .await
        .map_err(blocking_failed)??;
        Ok(Response::new(HeldResponse {
            copies: page.copies.iter().map(|c| c.moved.to_wire()).collect(),
            next: page.next,
            more: page.more,
        }))
    }

    async fn take_custody(
        &self,
        request: Request<TakeCustodyRequest>,
    ) -> Result<Response<TakeCustodyResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        self.check_holding("TakeCustody", caller.as_ref(), &r.topic, &r.from)?;
        if self.engine.draining() {
            return Err(Error::ShuttingDown("custody of messages").into());
        }
        if !self.engine.table().topics.contains_key(&r.topic) {
            return Err(Error::UnknownTopic(r.topic).into());
        }
        let messages = r.messages.into_iter().map(Moved::from_wire).collect();
        let stored = custody::take_custody(&self.engine, &r.topic, &r.from, messages).await?;
        Ok(Response::new(TakeCustodyResponse { stored }))
    }
}
