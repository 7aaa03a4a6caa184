//! `allocator`: the LCA allocator. Starts instances of registered services on this
//! machine when peers ask (process driver: the executable plus a sidecar `proxy`;
//! docker driver: a container of the image), culls idle ones, serves Prometheus
//! metrics (default :9101). What it offers instances is this machine's cores and memory.

use crate::cli::{default_listen, AllocatorCli, DriverKind};
use crate::conf::{self, ConfSource};
use crate::daemon::{self, KeyDefault};
use crate::daemons::Launcher;
use anyhow::{bail, Context, Result};
use physarum_core::config::AllocatorConfig;
use physarum_core::trust::Issuer;
use physarum_core::types::PeerId;
use physarum_net_real::driver::instance::{host_capacity, InstanceContext};
use physarum_net_real::driver::process::RunAs;
use physarum_net_real::driver::{
    leftovers, AnyDriver, DockerDriver, DockerDriverConfig, ProcessDriver, ProcessDriverConfig,
};
use physarum_net_real::keyfile;
use physarum_net_real::metrics::{Metrics, MetricsObserver};
use physarum_net_real::NodeOptions;
use physarum_runtime::RuntimeConfig;
use std::sync::Arc;
use std::time::Duration;

/// Per-run instance directories (without `--instance-dir`) are named this plus the pid.
const TEMPORARY_PREFIX: &str = "physarum-allocator-";

/// Run the allocator until SIGINT/SIGTERM; `launcher` says how to start the sidecar proxy.
pub async fn run(cli: AllocatorCli, launcher: Launcher) -> Result<()> {
    tracing::info!("Spawning LCA Allocator");
    let metrics_addr = daemon::metrics_addr(&cli.metrics)?;
    let prepared = daemon::prepare(&cli.net, KeyDefault::File(conf::default_key_path("allocator")), &default_listen())?;
    let (proxy_program, proxy_args) = launcher.tool("proxy")?;
    // Trust first: without a valid grant no instance of ours would be trusted.
    let me = PeerId(keyfile::peer_id_string(&prepared.keypair));
    let grant = crate::keys::load_grant(&cli.grant, &me, &prepared.operators)?;
    let own_key = keyfile::signing_key(&prepared.keypair).map_err(anyhow::Error::msg)?;
    let issuer = Issuer::allocator(own_key, grant).context("the grant does not match this allocator's key")?;
    tracing::info!(
        "Granted by operator {}",
        prepared.operators.keys().iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
    );
    let exec_roots = cli
        .exec_root
        .iter()
        .map(|d| std::fs::canonicalize(d).with_context(|| format!("exec root {} does not exist", d.display())))
        .collect::<Result<Vec<_>>>()?;
    if exec_roots.is_empty() {
        tracing::warn!("No --exec-root: this allocator runs no programs (container images only)");
    }
    // SAFETY: geteuid has no preconditions.
    let run_as = match unsafe { libc::geteuid() } {
        0 => {
            let user = RunAs::lookup(&cli.run_as).map_err(anyhow::Error::msg)?;
            if user.uid == 0 {
                bail!("--run-as {} is root: instances must run as an unprivileged user", cli.run_as);
            }
            tracing::info!("Running as root: instances run as {} (uid {})", user.name, user.uid);
            Some(user)
        }
        _ => None,
    };
    let (instance_dir, temporary) = match &cli.instance_dir {
        Some(d) => (d.clone(), false),
        None => {
            for dir in leftovers::reclaim_abandoned(&std::env::temp_dir(), TEMPORARY_PREFIX) {
                tracing::info!("Removed {}, left by an allocator that is gone", dir.display());
            }
            (std::env::temp_dir().join(format!("{TEMPORARY_PREFIX}{}", std::process::id())), true)
        }
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
    let operators: Vec<String> = prepared.operators.keys().iter().map(|k| k.to_string()).collect();
    let driver = match cli.driver {
        DriverKind::Process => {
            let mut dcfg = ProcessDriverConfig::new(proxy_program, instance_dir.clone());
            dcfg.proxy_args = proxy_args;
            dcfg.host_ip = cli.instance_ip;
            dcfg.bootstraps = boots;
            dcfg.psk = prepared.psk.clone();
            dcfg.config_file = config_file;
            dcfg.ready_timeout = ready_timeout;
            dcfg.exec_roots = exec_roots.clone();
            dcfg.run_as = run_as.clone();
            dcfg.operators = operators;
            let driver = ProcessDriver::new(dcfg).map_err(anyhow::Error::msg)?;
            // Instances of an earlier run that ended without stopping them (SIGKILL, crash).
            let reclaimed = leftovers::reclaim(&instance_dir).map_err(anyhow::Error::msg)?;
            if !reclaimed.dirs.is_empty() {
                tracing::info!(
                    "Removed {} instance directories left by an earlier run (stopped {} of their processes)",
                    reclaimed.dirs.len(),
                    reclaimed.killed.len()
                );
            }
            if run_as.is_some() {
                // The unprivileged instances must be able to reach their own directories.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&instance_dir, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("cannot open up {}", instance_dir.display()))?;
            }
            tracing::info!(
                "Instances run from {} with the sidecar proxy {}",
                instance_dir.display(),
                driver.config().proxy_program.display()
            );
            AnyDriver::Process(driver)
        }
        DriverKind::Docker => {
            let ctx =
                InstanceContext { host_ip: cli.instance_ip, bootstraps: boots, psk: prepared.psk.clone(), operators };
            let mut dcfg = DockerDriverConfig::new(instance_dir.clone(), ctx, p2p.peer_id().to_string());
            dcfg.config_file = config_file;
            dcfg.ready_timeout = ready_timeout;
            // Containers an earlier run left are adopted or removed as the node starts.
            let driver = DockerDriver::connect(dcfg).await.map_err(anyhow::Error::msg)?;
            tracing::info!("Instances run as Docker containers (host networking)");
            AnyDriver::Docker(driver)
        }
    };
    let (cpu_millis, memory_mb) = host_capacity();
    tracing::info!("Offering instances {cpu_millis} millicores and {memory_mb} MiB");

    let mut node = prepared.node_config(&p2p.peer_id());
    node.trust.issuer = Some(issuer);
    node.allocator = Some(AllocatorConfig {
        max_instances: cli.max_instances,
        idle_limit: Duration::from_secs(cli.idle_limit),
        cull_interval: Duration::from_secs(cli.cull_interval.max(1)),
        // The driver gives up first and says why.
        start_timeout: Duration::from_secs(cli.start_timeout.max(1) + 5),
        exec_roots: exec_roots.iter().map(|r| r.display().to_string()).collect(),
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
    leftovers::release(&instance_dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&instance_dir);
    }
    result
}
