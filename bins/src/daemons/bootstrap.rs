//! `bootstrap`: a well-known DHT server everybody joins through. Pings its
//! connected peers and exports their RTTs as Prometheus metrics (default :9100),
//! like the original's ping monitor.

use crate::cli::BootstrapCli;
use crate::conf;
use crate::daemon::{self, KeyDefault};
use anyhow::Result;
use physarum_core::config::NodeConfig;
use physarum_core::types::PeerId;
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::transport::NoDriver;
use physarum_runtime::RuntimeConfig;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Run the bootstrap until SIGINT/SIGTERM.
pub async fn run(cli: BootstrapCli) -> Result<()> {
    tracing::info!("Starting bootstrap node (ping monitor)");
    let metrics_addr = daemon::metrics_addr(&cli.metrics)?;
    let prepared =
        daemon::prepare(&cli.net, KeyDefault::File(conf::default_key_path("bootstrap")), "/ip4/0.0.0.0/tcp/4001")?;
    let interval = Duration::from_millis(cli.ping_interval.max(10));
    let mut p2p_opts = prepared.p2p_options();
    p2p_opts.ping_interval = interval;
    let (p2p, inbound) = daemon::start_network(&prepared, p2p_opts).await?;

    let node = NodeConfig::new(PeerId(p2p.peer_id().to_string()), prepared.requirements());
    let opts = NodeOptions { node, seed: daemon::seed(), runtime: RuntimeConfig::default(), http: None, app: None };
    let metrics = Arc::new(Metrics::new());
    let rtts = {
        let (p2p, metrics) = (p2p.clone(), metrics.clone());
        async move {
            let mut known = BTreeSet::new();
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let peers = p2p.connected_peers();
                let now: BTreeSet<String> = peers.iter().map(|(p, _)| p.to_string()).collect();
                for gone in known.difference(&now) {
                    metrics.set_peer_rtt(gone, None);
                    tracing::info!("Peer {gone} disconnected");
                }
                for (peer, rtt) in &peers {
                    let id = peer.to_string();
                    if !known.contains(&id) {
                        tracing::info!("Peer {id} connected");
                    }
                    if let Some(rtt) = rtt {
                        metrics.set_peer_rtt(&id, Some(*rtt));
                    }
                }
                known = now;
            }
        }
    };
    let observer = MetricsObserver(metrics.clone());
    tokio::select! {
        r = daemon::run(p2p, inbound, opts, NoDriver, observer, metrics, Some(metrics_addr), |_| {}) => r,
        _ = rtts => Ok(()),
    }
}
