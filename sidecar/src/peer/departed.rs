//! Closing links to sidecars that left the routing table.
//!
//! A link is closed once (1) no member record of the table names its address, (2) no
//! delivery written to its stream awaits a settlement, and (3) it was not used for
//! [`LINK_IDLE`]. Rule 2 lets the app of a pod being deleted settle what it still holds on
//! the stream it came on; deliveries written to a stream that broke are not waited for
//! (their settlements cannot come back on another stream: the dispatcher's ack timeout and
//! `QueryDelivery` settle them). Rule 3 keeps a link a dispatcher still queries about a
//! delivery it sent there, or a replica asks a gone producer on. A closed link that is
//! needed again is opened anew. Closing stops its reconnect loop and hands back what is
//! queued on it as `SendFailed`, so that the dispatchers send it elsewhere.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_api::routing::RoutingTable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PeerPool;

/// How long a link to a departed sidecar stays unused before it is closed.
pub const LINK_IDLE: Duration = Duration::from_secs(10);
/// How often links are checked besides on every routing change.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

impl PeerPool {
    /// Closes the links the rules above let go, with [`LINK_IDLE`]. Returns how many.
    pub fn close_departed(&self, table: &RoutingTable) -> usize {
        self.close_unused(table, LINK_IDLE)
    }

    fn close_unused(&self, table: &RoutingTable, idle: Duration) -> usize {
        let members: HashSet<&str> = table
            .members
            .values()
            .flat_map(|m| m.values().map(|e| e.address.as_str()))
            .collect();
        let now = self.now_ms();
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let Ok(mut links) = self.links.lock() else {
            return 0;
        };
        let gone: Vec<Arc<str>> = links
            .iter()
            .filter(|(addr, l)| {
                !members.contains(&***addr)
                    && l.in_flight.load(Ordering::Relaxed) == 0
                    && now.saturating_sub(l.last_used_ms.load(Ordering::Relaxed)) >= idle_ms
            })
            .map(|(addr, _)| addr.clone())
            .collect();
        for addr in &gone {
            if let Some(link) = links.remove(addr) {
                tracing::info!(peer = %addr, "closing the link to a sidecar that left the routing table");
                link.closed.cancel();
                self.closed_links.inc();
            }
        }
        self.open_links.set(links.len() as i64);
        gone.len()
    }

    /// Open links.
    pub fn links(&self) -> usize {
        self.links.lock().map_or(0, |l| l.len())
    }

    /// Closes links to departed sidecars on every routing change and every
    /// [`SWEEP_EVERY`], until `stop`.
    pub async fn run_sweep(
        self: Arc<Self>,
        mut routing: watch::Receiver<Arc<RoutingTable>>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = routing.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let table = routing.borrow_and_update().clone();
            self.learn_identities(&table);
            self.close_departed(&table);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    use super::*;
    use crate::delivery::Registry;
    use crate::routing::fixtures::member;

    fn table_with(addresses: &[&str]) -> RoutingTable {
        let mut t = RoutingTable::default();
        for (i, a) in addresses.iter().enumerate() {
            let pod = format!("p{i}");
            t.members
                .entry("ns/g".into())
                .or_default()
                .insert(pod.clone(), member("ns", "g", &pod, "z", a));
        }
        t
    }

    #[tokio::test]
    async fn links_to_departed_idle_sidecars_are_closed_and_reopened_when_needed() {
        let (gauge, closed) = (Gauge::default(), Counter::default());
        let pool = PeerPool::new(
            Arc::new(Registry::default()),
            CancellationToken::new(),
            gauge.clone(),
            closed.clone(),
            None,
        );
        // Nothing listens on these ports: the links only try to connect.
        assert!(pool.client("127.0.0.1:9").is_some());
        assert!(pool.client("127.0.0.1:19").is_some());
        assert_eq!((pool.links(), gauge.get()), (2, 2));

        // Both still members: kept.
        let both = table_with(&["127.0.0.1:9", "127.0.0.1:19"]);
        assert_eq!(pool.close_unused(&both, Duration::ZERO), 0);
        // One left but was just used: kept for LINK_IDLE.
        let one = table_with(&["127.0.0.1:9"]);
        assert_eq!(pool.close_departed(&one), 0);
        // Deliveries awaiting their settlement keep it too.
        let link = pool.link("127.0.0.1:19").unwrap();
        link.sent(3);
        assert_eq!(pool.close_unused(&one, Duration::ZERO), 0);
        link.settled(3);
        assert_eq!(pool.close_unused(&one, Duration::ZERO), 1);
        assert!(link.closed.is_cancelled(), "its task stops");
        assert_eq!((pool.links(), gauge.get(), closed.get()), (1, 1, 1));

        // Needed again: a fresh link.
        assert!(pool.client("127.0.0.1:19").is_some());
        assert_eq!(pool.links(), 2);
        assert!(!pool.link("127.0.0.1:19").unwrap().closed.is_cancelled());
    }

    #[tokio::test]
    async fn settlements_beyond_what_was_sent_do_not_wrap() {
        let link = super::super::Link {
            addr: "a".into(),
            tx: tokio::sync::mpsc::unbounded_channel().0,
            live: Default::default(),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            in_flight: Default::default(),
            last_used_ms: Default::default(),
            closed: CancellationToken::new(),
        };
        link.sent(1);
        link.settled(2);
        assert_eq!(link.in_flight.load(Ordering::Relaxed), 0);
    }
}
