//! `registry`: the registry service. Maps service names to operator-signed entries
//! (add, get, list, remove over the P2P network; writes signed by a configured
//! operator only), kept in an embedded store: a JSON file in `--data-dir`, replaced
//! atomically after every change and reloaded (and re-verified) at start.

use crate::cli::{default_listen, RegistryCli};
use crate::daemon::{self, KeyDefault};
use crate::store::{RegistryStore, StoreWriter};
use anyhow::Result;
use physarum_core::io::{Event, Input, Output};
use physarum_core::time::Instant;
use physarum_core::trust::SignedEntry;
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::transport::{NoDriver, Observer};
use physarum_runtime::RuntimeConfig;
use std::sync::Arc;
use std::time::Duration;

/// Metrics, plus persisting the registry's contents after every change.
struct RegistryObserver {
    metrics: MetricsObserver,
    store: StoreWriter,
}

impl Observer for RegistryObserver {
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
        self.store.persist(entries)
    }
    fn request_finished(&self, service: &str, status: u16, took: Duration) {
        self.metrics.request_finished(service, status, took)
    }
}

/// Run the registry until SIGINT/SIGTERM.
pub async fn run(cli: RegistryCli) -> Result<()> {
    tracing::info!("Starting the registry service");
    let metrics_addr = daemon::metrics_addr(&cli.metrics)?;
    let store = RegistryStore::open(&cli.data_dir)?;
    let entries = store.load()?;
    tracing::info!("Loaded {} services from {}", entries.len(), store.path().display());
    let prepared = daemon::prepare(&cli.net, KeyDefault::File(cli.data_dir.join("registry.key")), &default_listen())?;
    let (p2p, inbound) = daemon::start_network(&prepared, prepared.p2p_options()).await?;

    let mut node = prepared.node_config(&p2p.peer_id());
    node.registry = Some(entries);
    let opts = NodeOptions { node, seed: daemon::seed(), runtime: RuntimeConfig::default(), http: None, app: None };
    let metrics = Arc::new(Metrics::new());
    let observer = RegistryObserver { metrics: MetricsObserver(metrics.clone()), store: StoreWriter::spawn(store) };
    // Dropping the node (on shutdown) drops the observer, which finishes pending writes.
    daemon::run(p2p, inbound, opts, NoDriver, observer, metrics, Some(metrics_addr), |_| {}).await
}
