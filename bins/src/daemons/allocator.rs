//! `allocator`: the LCA allocator. Starts instances of registered services on this
//! machine when peers ask (process driver: the executable plus a sidecar `proxy`;
//! docker driver: a container of the image), culls idle ones, serves Prometheus
//! metrics (default :9101). What it offers instances is this machine's cores and memory.

use crate::cli::{default_listen, AllocatorCli, DriverKind};
use crate::conf::{self, ConfSource};
use crate::daemon::{self, KeyDefault};
use crate::daemons::Launcher;
use anyhow::{Context, Result};
use physarum_core::config::{AllocatorConfig, NodeConfig};
use physarum_core::types::PeerId;
use physarum_net_real::driver::instance::{host_capacity, InstanceContext};
use physarum_net_real::driver::{AnyDriver, DockerDriver, DockerDriverConfig, ProcessDriver, ProcessDriverConfig};
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::RuntimeConfig;
use std::sync::Arc;
use std::time::Duration;

/// Run the allocator until SIGINT/SIGTERM; `launcher` says how to start the sidecar proxy.
pub async fn run(cli: AllocatorCli, launcher: Launcher) -> Result<()> {
    tracing::info!("Spawning LCA Allocator");
    let metrics_addr = daemon::metrics_addr(&cli.metrics)?;
    let prepared = daemon::prepare(&cli.net, KeyDefault::File(conf::default_key_path("allocator")), &default_listen())?;
    let (proxy_program, proxy_args) = launcher.tool("proxy")?;
    let (instance_dir, temporary) = match &cli.instance_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("physarum-allocator-{}", std::process::id())), true),
    };
    // Instances run in their own directories: hand them an absolute config path.
    let config_file = match &prepared.conf_source {
        ConfSource::File(p) => {
            Some(std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))?)
        }
        ConfSource::Defaults => None,
    };

    tracing::info!("Setting stream handlers");
    tracing::info!("Creating DHT");
    let (p2p, inbound) = daemon::start_network(&prepared, prepared.p2p_options()).await?;

    // Instances bootstrap through the configured nodes and through this allocator.
    let mut boots: Vec<String> = prepared.bootstraps.iter().map(|b| b.to_string()).collect();
    let own = p2p.dial_addrs();
    let ip = cli.instance_ip.to_string();
    let reachable: Vec<_> = own.iter().filter(|a| a.to_string().contains(&format!("/{ip}/"))).cloned().collect();
    boots.extend(if reachable.is_empty() { own } else { reachable }.iter().map(|a| a.to_string()));

    let ready_timeout = Duration::from_secs(cli.start_timeout.max(1));
    let driver = match cli.driver {
        DriverKind::Process => {
            let mut dcfg = ProcessDriverConfig::new(proxy_program, instance_dir.clone());
            dcfg.proxy_args = proxy_args;
            dcfg.host_ip = cli.instance_ip;
            dcfg.bootstraps = boots;
            dcfg.psk = prepared.psk.clone();
            dcfg.config_file = config_file;
            dcfg.ready_timeout = ready_timeout;
            let driver = ProcessDriver::new(dcfg).map_err(anyhow::Error::msg)?;
            tracing::info!(
                "Instances run from {} with the sidecar proxy {}",
                instance_dir.display(),
                driver.config().proxy_program.display()
            );
            AnyDriver::Process(driver)
        }
        DriverKind::Docker => {
            let ctx = InstanceContext { host_ip: cli.instance_ip, bootstraps: boots, psk: prepared.psk.clone() };
            let mut dcfg = DockerDriverConfig::new(instance_dir.clone(), ctx, p2p.peer_id().to_string());
            dcfg.config_file = config_file;
            dcfg.ready_timeout = ready_timeout;
            let driver = DockerDriver::connect(dcfg).await.map_err(anyhow::Error::msg)?;
            let removed = driver.remove_leftovers().await.map_err(anyhow::Error::msg)?;
            if removed > 0 {
                tracing::info!("Removed {removed} containers an earlier run of this allocator left behind");
            }
            tracing::info!("Instances run as Docker containers (host networking)");
            AnyDriver::Docker(driver)
        }
    };
    let (cpu_millis, memory_mb) = host_capacity();
    tracing::info!("Offering instances {cpu_millis} millicores and {memory_mb} MiB");

    let mut node = NodeConfig::new(PeerId(p2p.peer_id().to_string()), prepared.requirements());
    node.allocator = Some(AllocatorConfig {
        max_instances: cli.max_instances,
        idle_limit: Duration::from_secs(cli.idle_limit),
        cull_interval: Duration::from_secs(cli.cull_interval.max(1)),
        // The driver gives up first and says why.
        start_timeout: Duration::from_secs(cli.start_timeout.max(1) + 5),
        cpu_millis,
        memory_mb,
        ..AllocatorConfig::default()
    });
    let metrics = Arc::new(Metrics::new());
    let opts = NodeOptions { node, seed: daemon::seed(), runtime: RuntimeConfig::default(), http: None, app: None };
    let observer = MetricsObserver(metrics.clone());
    let result = daemon::run(p2p, inbound, opts, driver.clone(), observer, metrics, Some(metrics_addr), |_| {}).await;
    let running = driver.running();
    if !running.is_empty() {
        tracing::info!("Stopping {} instances", running.len());
    }
    driver.shutdown().await;
    if temporary {
        let _ = std::fs::remove_dir_all(&instance_dir);
    }
    result
}
