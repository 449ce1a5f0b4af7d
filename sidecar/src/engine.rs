//! The sidecar-wide `Engine`: the routing table, the topic stores, the delivery manager, the
//! consumer and the peer pool, shared (`Arc`) by every API layer so that handlers stay thin.
//! Publishing (`engine/publish.rs`) hangs off it because the app APIs and dead-lettering
//! share it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ferry_api::identity::tls::PeerTls;
use ferry_api::routing::RoutingTable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::consumer::Consumer;
use crate::delivery::DeliveryManager;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::peer::PeerPool;
use crate::placement::Placements;
use crate::replica::holder::ReplicaLogs;
use crate::replica::replicator::Replicator;
use crate::store::{StoreOptions, TopicStore};

mod delivered;
mod publish;
mod stored;
mod unconfirmed;

/// Who this sidecar is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    /// `namespace/pod`, how producers name themselves to peers.
    pub producer_id: Arc<str>,
    /// The peer address other sidecars dial.
    pub advertise: String,
    /// Random per start of this sidecar, never 0 (a recreated data dir is a new start too).
    /// Offsets are not unique across starts (a `Memory` topic numbers from 0 again), so
    /// every delivery, query and replica copy is named with it and the message id, never
    /// by an offset alone.
    pub incarnation: u64,
}

/// Shared state of one sidecar.
#[derive(Debug)]
pub struct Engine {
    pub identity: Identity,
    /// The zone and node it routes by (`placement.rs`).
    pub placement: Placements,
    pub config: Config,
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    pub metrics: Arc<Metrics>,
    pub consumer: Arc<Consumer>,
    pub peers: Arc<PeerPool>,
    pub delivery: DeliveryManager,
    /// Copies this sidecar holds for other producers' `Replicated` topics.
    pub replicas: Arc<ReplicaLogs>,
    /// This sidecar's side of its own `Replicated` topics.
    pub replicator: Arc<Replicator>,
    stores: RwLock<HashMap<String, Arc<TopicStore>>>,
    opening: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    /// `ACK_LEVEL_NONE` publishes answered and not yet stored, one permit each
    /// (`--max-unconfirmed-publishes`).
    unconfirmed: Arc<tokio::sync::Semaphore>,
    /// Cancelled when every task must stop (after the drain).
    pub stop: CancellationToken,
}

impl Engine {
    /// An engine following `routing`.
    pub fn new(
        config: Config,
        advertise: String,
        routing: watch::Receiver<Arc<RoutingTable>>,
        stop: CancellationToken,
        tls: Option<PeerTls>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let delivery = DeliveryManager::default();
        let peers = PeerPool::new(
            delivery.registry.clone(),
            stop.clone(),
            metrics.peer_links.clone(),
            metrics.peer_links_closed.clone(),
            tls,
        );
        let identity = Identity {
            pod: config.pod_name.clone(),
            namespace: config.namespace.clone(),
            service_account: config.service_account.clone(),
            producer_id: config.producer_id().into(),
            advertise,
            incarnation: rand::random::<u64>() | 1,
        };
        let replicas = Arc::new(ReplicaLogs::new(config.data_dir.join("replicas")));
        let unconfirmed = config
            .max_unconfirmed_publishes
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        replicas.open_existing();
        let placement = Placements::new(&config, metrics.zone.clone());
        placement.follow(&routing.borrow());
        Arc::new(Self {
            placement,
            consumer: Consumer::new(
                config.pod_name.clone(),
                routing.clone(),
                metrics.clone(),
                Some(config.data_dir.clone()),
                config.dedup_max_ids,
            ),
            replicas,
            replicator: Arc::new(Replicator::new(
                identity.incarnation,
                metrics.pending_trims.clone(),
                metrics.trims_dropped.clone(),
            )),
            identity,
            config,
            routing,
            metrics,
            peers,
            delivery,
            stores: RwLock::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            unconfirmed: Arc::new(tokio::sync::Semaphore::new(unconfirmed)),
            stop,
        })
    }

    /// The current routing table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    /// Every open store.
    pub fn open_stores(&self) -> Vec<Arc<TopicStore>> {
        self.stores
            .read()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The store of `topic` (`namespace/name`), opening it (and starting its dispatchers)
    /// on first use.
    pub async fn store(self: &Arc<Self>, topic: &str) -> Result<Arc<TopicStore>, Error> {
        if let Some(s) = self.stores.read().ok().and_then(|s| s.get(topic).cloned()) {
            return Ok(s);
        }
        let _guard = self.opening.lock().await;
        if let Some(s) = self.stores.read().ok().and_then(|s| s.get(topic).cloned()) {
            return Ok(s);
        }
        let table = self.table();
        let entry = table
            .topics
            .get(topic)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        let data_dir = self.config.data_dir.clone();
        let options = StoreOptions {
            async_sync_interval: self.config.async_sync_interval,
            fsyncs: self
                .metrics
                .fsyncs
                .get_or_create(&Metrics::topic(topic))
                .clone(),
            settled_ids: Some(self.replicator.settled_sender()),
            dedup_max_ids: self.config.dedup_max_ids,
            dedup_evicted: self
                .metrics
                .dedup_evicted
                .get_or_create(&Metrics::topic(topic))
                .clone(),
            ordered_max_keys: self.config.ordered_max_keys,
            ordered_keys: self
                .metrics
                .ordered_keys
                .get_or_create(&Metrics::topic(topic))
                .clone(),
            ordered_keys_evicted: self
                .metrics
                .ordered_keys_evicted
                .get_or_create(&Metrics::topic(topic))
                .clone(),
        };
        let store =
            tokio::task::spawn_blocking(move || TopicStore::open(&entry, &data_dir, &options))
                .await
                .map_err(|e| Error::Internal(format!("opening topic {topic}: {e}")))??;
        if let Ok(mut s) = self.stores.write() {
            s.insert(topic.to_owned(), store.clone());
        }
        self.delivery.reconcile(self, &table).await;
        Ok(store)
    }

    /// Opens the stores of topics that have data on disk, so that their unsettled messages
    /// are delivered after a restart without waiting for a new publish.
    pub async fn open_existing(self: &Arc<Self>) {
        let table = self.table();
        for topic in table.topics.values() {
            let dir = self
                .config
                .data_dir
                .join("topics")
                .join(&topic.namespace)
                .join(&topic.name);
            if dir.is_dir() {
                let name = ferry_api::routing::object_ref(&topic.namespace, &topic.name);
                if let Err(e) = self.store(&name).await {
                    tracing::error!(topic = %name, error = %e, "cannot reopen topic log");
                }
            }
        }
    }

    /// Stops taking publishes (SIGTERM); delivery goes on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether publishes are refused.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether every store has delivered everything it holds.
    pub fn drained(&self) -> bool {
        self.open_stores().iter().all(|s| s.stats.drained())
    }
}
