//! `proxy`: forwards `METHOD /<service>/<rest>?<query>` on 127.0.0.1:PORT to an
//! instance of <service> (anonymous mode); with SERVICE ADDRESS [METRICS_PORT] it
//! also serves SERVICE at ADDRESS to the network (service mode).

use crate::cli::{default_listen, ProxyCli};
use crate::daemon::{self, KeyDefault};
use anyhow::{bail, Result};
use physarum_core::trust::Issuer;
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::transport::NoDriver;
use physarum_runtime::RuntimeConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Run the proxy until SIGINT/SIGTERM.
pub async fn run(cli: ProxyCli) -> Result<()> {
    match (&cli.service, &cli.address) {
        (Some(service), Some(address)) => {
            tracing::info!("Starting LCA Manager in service mode with arguments {service} {address}")
        }
        _ => tracing::info!("Starting LCA Manager in anonymous mode"),
    }
    if let Some(service) = &cli.service {
        crate::service_config::validate_name(service)?;
    }
    let metrics_addr = match (cli.metrics_port, &cli.metrics) {
        (Some(port), _) => Some(SocketAddr::new(cli.bind, port)),
        (None, Some(flag)) => Some(daemon::metrics_addr(flag)?),
        (None, None) => None,
    };
    let prepared = daemon::prepare(&cli.net, KeyDefault::Ephemeral, &default_listen())?;
    tracing::info!("Setting stream handlers");
    tracing::info!("Creating DHT");
    let mut p2p_options = prepared.p2p_options();
    // A sidecar's probe answers say whether its application answers (the core decides).
    p2p_options.pings_to_node = cli.service.is_some();
    let (p2p, inbound) = daemon::start_network(&prepared, p2p_options).await?;

    let mut node = prepared.node_config(&p2p.peer_id());
    if let Some(path) = &cli.operator_key {
        let key = crate::keys::load_operator_key(path)?;
        if !prepared.operators.keys().contains(&key.public()) {
            bail!(
                "the operator key {} (public key {}) is not one of the configured operators: clients would \
                 not trust this sidecar (add it to \"Operators\" or pass --operator)",
                path.display(),
                key.public()
            );
        }
        tracing::info!("Certifying this sidecar with operator key {}", key.public());
        node.trust.issuer = Some(Issuer::operator(key));
    }
    node.registry_cache.ttl = Duration::from_secs(cli.rcache_ttl);
    node.serve = cli.service.clone();
    let http = SocketAddr::new(cli.bind, cli.port);
    let mut runtime = RuntimeConfig::default();
    // L4 mappings listen where the HTTP port does.
    runtime.l4.bind = cli.bind;
    let opts = NodeOptions { node, seed: daemon::seed(), runtime, http: Some(http), app: cli.address };
    tracing::info!("Launching proxy PeerCache instance");
    prepared.log_perf();
    let metrics = Arc::new(Metrics::new());
    let observer = MetricsObserver(metrics.clone());
    daemon::run(p2p, inbound, opts, NoDriver, observer, metrics, metrics_addr, |bound| {
        tracing::info!("Starting HTTP Proxy on {}", bound.unwrap_or(http));
        tracing::info!("Launching cache update function");
    })
    .await
}
