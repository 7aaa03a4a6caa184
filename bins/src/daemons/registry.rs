//! `registry`: the registry service. Maps service names to operator-signed entries
//! (add, get, list, remove over the P2P network; writes signed by a configured
//! operator only). Entries are kept in a [`Store`]: the embedded one (a JSON file in
//! `--data-dir`, replaced atomically after every change and reloaded, re-verified,
//! at start) or an etcd cluster that several registry daemons share
//! (`--store etcd://…`).
//!
//! Reads are answered by the node from its in-memory copy. Writes are taken off the
//! way to the node and given to the store, which answers only once it has them.

use crate::cli::{default_listen, RegistryCli};
use crate::daemon::{self, KeyDefault};
use crate::store::{self, EmbeddedStore, NodeFeed, RegistryStore, Store, StoreSpec};
use anyhow::Result;
use physarum_core::io::{Event, Input, Output};
use physarum_core::time::Instant;
use physarum_core::trust::SignedEntry;
use physarum_core::types::PeerId;
use physarum_core::wire::{Request, Response};
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::transport::{InboundRequest, NoDriver, Observer};
use physarum_runtime::RuntimeConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// Writes handled at once; past this a write is refused at once (it would only queue).
const MAX_WRITES_IN_FLIGHT: usize = 64;

/// Metrics, plus handing the registry's contents to the store after every change.
struct RegistryObserver<S> {
    metrics: MetricsObserver,
    store: S,
}

impl<S: Store> Observer for RegistryObserver<S> {
    fn input(&self, now: Instant, input: &Input) {
        self.metrics.input(now, input)
    }
    fn output(&self, now: Instant, output: &Output) {
        self.metrics.output(now, output)
    }
    fn event(&self, now: Instant, event: &Event) {
        self.metrics.event(now, event)
    }
    fn persist_registry(&self, entries: Vec<SignedEntry>) {
        tracing::info!("Registry changed: {} entries", entries.len());
        self.metrics.0.set_registry_entries(entries.iter().filter(|e| e.info.is_some()).count());
        self.store.persist(entries)
    }
    fn request_finished(&self, service: &str, status: u16, took: Duration) {
        self.metrics.request_finished(service, status, took)
    }
}

/// Run the registry until SIGINT/SIGTERM.
pub async fn run(cli: RegistryCli) -> Result<()> {
    tracing::info!("Starting the registry service");
    store::check_supported(&cli.store)?;
    let metrics_addr = daemon::metrics_addr(&cli.metrics)?;
    let prepared = daemon::prepare(&cli.net, KeyDefault::File(cli.data_dir.join("registry.key")), &default_listen())?;
    match &cli.store {
        StoreSpec::Embedded => {
            let file = RegistryStore::open(&cli.data_dir)?;
            let entries = file.load()?;
            tracing::info!("Loaded {} services from {}", entries.len(), file.path().display());
            serve(metrics_addr, prepared, entries, EmbeddedStore::new(file), |_| {}).await
        }
        #[cfg(feature = "etcd")]
        StoreSpec::Etcd { endpoints } => {
            let etcd = store::etcd::EtcdStore::connect(endpoints, prepared.operators.clone()).await?;
            let (entries, revision) = etcd.load().await?;
            tracing::info!(
                "Loaded {} services from etcd at {} (revision {revision})",
                entries.len(),
                endpoints.join(",")
            );
            let follower = etcd.clone();
            serve(metrics_addr, prepared, entries, etcd, move |node| follower.follow(node, revision)).await
        }
        #[cfg(not(feature = "etcd"))]
        StoreSpec::Etcd { .. } => unreachable!("refused by check_supported"),
    }
}

/// Run the registry node on `store`, holding `entries` at start; `follow` starts
/// whatever keeps the node's copy in step with the store.
async fn serve<S: Store>(
    metrics_addr: std::net::SocketAddr,
    prepared: daemon::Prepared,
    entries: Vec<SignedEntry>,
    store: S,
    follow: impl FnOnce(NodeFeed),
) -> Result<()> {
    let (p2p, mut inbound) = daemon::start_network(&prepared, prepared.p2p_options()).await?;
    let local = PeerId(p2p.peer_id().to_string());
    let metrics = Arc::new(Metrics::new());
    metrics.set_registry_entries(entries.iter().filter(|e| e.info.is_some()).count());

    // Peers' requests pass through here on their way to the node: writes go to the store.
    let (to_node, from_here) = mpsc::unbounded_channel();
    let from_network = std::mem::replace(&mut inbound.requests, from_here);
    let feed = NodeFeed::new(to_node, local);
    tokio::spawn(route_requests(from_network, feed.clone(), store.clone(), metrics.clone()));
    follow(feed);
    let gauge_store = store.clone();
    let gauge_metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            gauge_metrics.set_registry_stale(gauge_store.stale());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    let mut node = prepared.node_config(&p2p.peer_id());
    node.registry = Some(entries);
    let opts = NodeOptions { node, seed: daemon::seed(), runtime: RuntimeConfig::default(), http: None, app: None };
    let observer = RegistryObserver { metrics: MetricsObserver(metrics.clone()), store };
    // Dropping the node (on shutdown) drops the observer, which finishes pending writes.
    daemon::run(p2p, inbound, opts, NoDriver, observer, metrics, Some(metrics_addr), |_| {}).await
}

/// Take registry writes off the way to the node and give them to the store (each
/// on its own task, so reads never wait behind a write); pass everything else on.
async fn route_requests<S: Store>(
    mut from_network: mpsc::UnboundedReceiver<InboundRequest>,
    node: NodeFeed,
    store: S,
    metrics: Arc<Metrics>,
) {
    let writes = Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT));
    while let Some(request) = from_network.recv().await {
        match request.request {
            Request::RegistryPut { entry } => {
                let Ok(permit) = writes.clone().try_acquire_owned() else {
                    let reason = format!("refused: {MAX_WRITES_IN_FLIGHT} writes are in progress, try again");
                    let _ = request.reply.send(Response::Error { reason });
                    continue;
                };
                let (store, node) = (store.clone(), node.clone());
                tokio::spawn(async move {
                    let answer = store.put(*entry, node).await;
                    let _ = request.reply.send(answer);
                    drop(permit);
                });
            }
            Request::RegistryGet { .. } | Request::RegistryList { .. } => {
                if store.stale() {
                    metrics.registry_stale_reads.inc();
                }
                node.forward(request);
            }
            _ => node.forward(request),
        }
    }
}
