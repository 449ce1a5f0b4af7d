//! Sidecar-to-sidecar traffic. `server.rs` serves `ferry.v1.Peer` (the consuming side);
//! this file is the producing side's client pool: one long-lived `Forward` stream per
//! member address, fed by dispatchers with whole batches and coalescing what is queued into
//! as few stream messages as fit, so that one HTTP/2 frame carries many deliveries.
//!
//! A peer that cannot be reached is marked not live (dispatchers then prefer others, which
//! is how `PreferSameZone` spills over) and every delivery queued for it is handed back as
//! `SendFailed` at once instead of waiting for an ack timeout.
//!
//! Links to sidecars that left the routing table are closed (`departed.rs`), so that a
//! long-lived sidecar with pods coming and going keeps no link and reconnect loop per pod
//! it ever talked to.

pub mod authz;
mod departed;
mod expect;
pub mod server;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::identity::SpiffeId;
use ferry_api::identity::dial::connector;
use ferry_api::identity::tls::PeerTls;
use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{
    Deliver, DeliveryState, ForwardRequest, ForwardResponse, QueryDeliveryRequest,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::delivery::{Event, Registry};

pub use departed::{LINK_IDLE, SWEEP_EVERY};
pub use expect::expected_identities;

/// Largest peer gRPC message: a batch, or one maximal message with its envelope.
pub const PEER_MAX_MESSAGE: usize = 16 << 20;
/// Bytes of payload coalesced into one `ForwardRequest`.
const BATCH_BYTES: usize = 2 << 20;
/// Deliveries coalesced into one `ForwardRequest`.
const BATCH_COUNT: usize = 4096;
/// HTTP/2 receive window of peer streams. Throughput of one stream is at most a window per
/// round trip: with 4 KiB messages the defaults held a stream to ~13k msg/s on loopback.
const PEER_WINDOW: u32 = 8 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Link {
    addr: Arc<str>,
    tx: mpsc::UnboundedSender<Vec<Deliver>>,
    live: AtomicBool,
    channel: Channel,
    /// Deliveries written to the current stream whose settlement has not come back (reset
    /// when the stream breaks: their settlements cannot come back on another one).
    in_flight: AtomicU64,
    /// When the link was last asked for, in ms since the pool started: a send, a unary
    /// client or a query.
    last_used_ms: AtomicU64,
    /// Cancelled when the link is closed; its task then hands back what is queued.
    closed: CancellationToken,
}

impl Link {
    fn sent(&self, n: usize) {
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn settled(&self, n: usize) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n as u64))
            });
    }
}

/// Connections to other sidecars, by peer address.
#[derive(Debug)]
pub struct PeerPool {
    links: Mutex<HashMap<Arc<str>, Arc<Link>>>,
    registry: Arc<Registry>,
    liveness: watch::Sender<u64>,
    cancel: CancellationToken,
    /// The pool's clock for `Link::last_used_ms`.
    started: Instant,
    /// Open links (`ferry_sidecar_peer_links`).
    open_links: Gauge,
    /// Links closed because their sidecar left (`ferry_sidecar_peer_links_closed_total`).
    closed_links: Counter,
    /// Mutual TLS for every link; `None` dials plaintext (a sidecar started without
    /// `--tls-dir`).
    tls: Option<PeerTls>,
    /// The identity each address must prove (`expect.rs`).
    expected: Mutex<HashMap<Arc<str>, SpiffeId>>,
}

impl PeerPool {
    /// A pool that routes settlements to `registry` and stops at `cancel`; `open_links`
    /// follows how many links are open, `closed_links` counts those closed because their
    /// sidecar left the routing table.
    pub fn new(
        registry: Arc<Registry>,
        cancel: CancellationToken,
        open_links: Gauge,
        closed_links: Counter,
        tls: Option<PeerTls>,
    ) -> Arc<Self> {
        Arc::new(Self {
            links: Mutex::new(HashMap::new()),
            registry,
            liveness: watch::Sender::new(0),
            cancel,
            started: Instant::now(),
            open_links,
            closed_links,
            tls,
            expected: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn link(&self, addr: &str) -> Option<Arc<Link>> {
        let now = self.now_ms();
        let mut links = self.links.lock().ok()?;
        if let Some(l) = links.get(addr) {
            l.last_used_ms.store(now, Ordering::Relaxed);
            return Some(l.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Settlements and query answers flow to us; HTTP/2's default windows would make
            // a busy stream wait a round trip per window (see PEER_WINDOW).
            .initial_stream_window_size(PEER_WINDOW)
            .initial_connection_window_size(PEER_WINDOW * 2)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match &self.tls {
            Some(tls) => {
                let expect = self.expect_for(addr, tls.credentials.identity().trust_domain);
                match tls.client_config(expect) {
                    Ok(config) => endpoint.connect_with_connector_lazy(connector(config)),
                    Err(e) => {
                        tracing::error!(peer = %addr, error = %e, "peer TLS configuration failed");
                        return None;
                    }
                }
            }
            None => endpoint.connect_lazy(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            addr: addr.into(),
            tx,
            live: AtomicBool::new(true),
            channel,
            in_flight: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(now),
            closed: self.cancel.child_token(),
        });
        links.insert(link.addr.clone(), link.clone());
        self.open_links.set(links.len() as i64);
        tokio::spawn(run_link(
            link.clone(),
            rx,
            self.registry.clone(),
            self.liveness.clone(),
        ));
        Some(link)
    }

    /// Queues deliveries for the sidecar at `addr`.
    pub fn send(&self, addr: &Arc<str>, batch: Vec<Deliver>) {
        match self.link(addr) {
            Some(link) => {
                if let Err(mpsc::error::SendError(batch)) = link.tx.send(batch) {
                    fail(&self.registry, addr, batch, "peer link stopped");
                }
            }
            None => fail(&self.registry, addr, batch, "invalid peer address"),
        }
    }

    /// A unary client of the sidecar at `addr` on the pool's connection.
    pub fn client(&self, addr: &str) -> Option<PeerClient<Channel>> {
        self.link(addr).map(|l| {
            PeerClient::new(l.channel.clone())
                .max_decoding_message_size(PEER_MAX_MESSAGE)
                .max_encoding_message_size(PEER_MAX_MESSAGE)
        })
    }

    /// Whether the sidecar at `addr` is believed reachable (unknown peers are).
    pub fn is_live(&self, addr: &str) -> bool {
        self.links
            .lock()
            .ok()
            .and_then(|l| l.get(addr).map(|l| l.live.load(Ordering::Relaxed)))
            .unwrap_or(true)
    }

    /// Changes whenever some peer's liveness changes.
    pub fn watch_liveness(&self) -> watch::Receiver<u64> {
        self.liveness.subscribe()
    }

    /// Asks the sidecar at `addr` about a delivery.
    pub async fn query(
        &self,
        addr: &str,
        req: QueryDeliveryRequest,
    ) -> Result<DeliveryState, String> {
        let link = self
            .link(addr)
            .ok_or_else(|| format!("invalid peer address {addr:?}"))?;
        let mut client = PeerClient::new(link.channel.clone());
        let call = client.query_delivery(req);
        match tokio::time::timeout(QUERY_TIMEOUT, call).await {
            Ok(Ok(r)) => Ok(r.into_inner().state()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {QUERY_TIMEOUT:?}")),
        }
    }
}

/// Hands deliveries back to their dispatchers as not sent.
fn fail(registry: &Registry, addr: &Arc<str>, batch: Vec<Deliver>, reason: &str) {
    let mut by_sub: HashMap<String, Vec<(u64, u32)>> = HashMap::new();
    for d in batch {
        by_sub
            .entry(d.subscription)
            .or_default()
            .push((d.offset, d.attempt));
    }
    registry.route_many(
        by_sub
            .into_iter()
            .map(|(sub, items)| {
                let e = Event::SendFailed {
                    addr: addr.clone(),
                    items,
                    reason: reason.to_owned(),
                };
                (sub, e)
            })
            .collect(),
    );
}

fn route_settled(registry: &Registry, link: &Link, r: ForwardResponse) {
    link.settled(r.settled.len());
    let addr = &link.addr;
    registry.route_many(
        r.settled
            .into_iter()
            .map(|s| {
                (
                    s.subscription.clone(),
                    Event::Settled {
                        from: addr.clone(),
                        settled: s,
                    },
                )
            })
            .collect(),
    );
}

fn set_live(link: &Link, liveness: &watch::Sender<u64>, live: bool) {
    if link.live.swap(live, Ordering::Relaxed) != live {
        tracing::info!(peer = %link.addr, live, "peer liveness changed");
        liveness.send_modify(|n| *n += 1);
    }
}

/// Splits queued deliveries into requests of bounded size. A lone batch that fits goes as
/// it is; otherwise each request is allocated once at its final size (a `Deliver` is a few
/// hundred bytes: regrowing a batch of thousands copies it several times).
fn coalesce(
    first: Vec<Deliver>,
    rx: &mut mpsc::UnboundedReceiver<Vec<Deliver>>,
) -> Vec<ForwardRequest> {
    let size = |d: &Deliver| d.message.as_ref().map_or(0, |m| m.payload.len() + 64);
    let mut batches = vec![first];
    while batches.len() <= 64 {
        match rx.try_recv() {
            Ok(batch) => batches.push(batch),
            Err(_) => break,
        }
    }
    if let [only] = batches.as_slice()
        && only.len() <= BATCH_COUNT
        && only.iter().map(size).sum::<usize>() <= BATCH_BYTES
    {
        let deliveries = batches.pop().unwrap_or_default();
        return vec![ForwardRequest { deliveries }];
    }
    let mut left: usize = batches.iter().map(Vec::len).sum();
    let mut out = Vec::new();
    let mut cur = Vec::with_capacity(left.min(BATCH_COUNT));
    let mut bytes = 0;
    for d in batches.into_iter().flatten() {
        let n = size(&d);
        if !cur.is_empty() && (bytes + n > BATCH_BYTES || cur.len() >= BATCH_COUNT) {
            let next = Vec::with_capacity(left.min(BATCH_COUNT));
            out.push(ForwardRequest {
                deliveries: std::mem::replace(&mut cur, next),
            });
            bytes = 0;
        }
        bytes += n;
        left -= 1;
        cur.push(d);
    }
    if !cur.is_empty() {
        out.push(ForwardRequest { deliveries: cur });
    }
    out
}

/// Hands back every batch still queued on a closed link.
fn close_queue(link: &Link, rx: &mut mpsc::UnboundedReceiver<Vec<Deliver>>, registry: &Registry) {
    rx.close();
    while let Ok(b) = rx.try_recv() {
        fail(registry, &link.addr, b, "peer left the routing table");
    }
}

async fn run_link(
    link: Arc<Link>,
    mut rx: mpsc::UnboundedReceiver<Vec<Deliver>>,
    registry: Arc<Registry>,
    liveness: watch::Sender<u64>,
) {
    let cancel = link.closed.clone();
    run_streams(&link, &mut rx, &registry, &liveness, &cancel).await;
    close_queue(&link, &mut rx, &registry);
}

async fn run_streams(
    link: &Arc<Link>,
    rx: &mut mpsc::UnboundedReceiver<Vec<Deliver>>,
    registry: &Registry,
    liveness: &watch::Sender<u64>,
    cancel: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = PeerClient::new(link.channel.clone())
            .max_decoding_message_size(PEER_MAX_MESSAGE)
            .max_encoding_message_size(PEER_MAX_MESSAGE);
        let (req_tx, req_rx) = mpsc::channel::<ForwardRequest>(16);
        let opened = tokio::select! {
            r = client.forward(ReceiverStream::new(req_rx)) => r,
            _ = cancel.cancelled() => return,
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => {
                set_live(link, liveness, false);
                tracing::debug!(peer = %link.addr, %status, "cannot open forward stream");
                let until = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        b = rx.recv() => match b {
                            Some(b) => fail(registry, &link.addr, b, "peer unreachable"),
                            None => return,
                        },
                        _ = cancel.cancelled() => return,
                    }
                }
                continue;
            }
        };
        set_live(link, liveness, true);
        backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                b = rx.recv() => {
                    let Some(b) = b else { return };
                    for req in coalesce(b, rx) {
                        let n = req.deliveries.len();
                        link.sent(n);
                        if let Err(mpsc::error::SendError(req)) = req_tx.send(req).await {
                            link.settled(n);
                            fail(registry, &link.addr, req.deliveries, "forward stream closed");
                        }
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(r)) => route_settled(registry, link, r),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(peer = %link.addr, %status, "forward stream ended");
                        break;
                    }
                },
                _ = cancel.cancelled() => return,
            }
        }
        // What was written to the broken stream is settled through timeouts and queries.
        link.in_flight.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(from: u64, n: u64) -> Vec<Deliver> {
        (from..from + n)
            .map(|offset| Deliver {
                offset,
                ..Deliver::default()
            })
            .collect()
    }

    #[test]
    fn coalesce_keeps_order_and_bounds_each_request() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A lone batch that fits goes as it is.
        let one = coalesce(deliveries(0, 10), &mut rx);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].deliveries.len(), 10);
        // Queued batches are merged, split at BATCH_COUNT, in order.
        tx.send(deliveries(10, BATCH_COUNT as u64)).unwrap();
        tx.send(deliveries(10 + BATCH_COUNT as u64, 5)).unwrap();
        let merged = coalesce(deliveries(0, 10), &mut rx);
        let sizes: Vec<usize> = merged.iter().map(|r| r.deliveries.len()).collect();
        assert_eq!(sizes, [BATCH_COUNT, 15]);
        let offsets: Vec<u64> = merged
            .iter()
            .flat_map(|r| r.deliveries.iter().map(|d| d.offset))
            .collect();
        assert_eq!(offsets, (0..BATCH_COUNT as u64 + 15).collect::<Vec<_>>());
    }
}
