//! What every daemon does at start-up and shutdown: load the config, resolve
//! bootstraps and PSK, load or create the identity key, start the libp2p network,
//! log like the original, run the node with its metrics endpoint until SIGINT or
//! SIGTERM.

use crate::cli::NetArgs;
use crate::conf::{self, ConfSource};
use anyhow::{Context, Result};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use physarum_core::config::{ConfFile, NodeConfig};
use physarum_core::perf::Requirements;
use physarum_core::trust::{Operators, TrustConfig};
use physarum_core::types::PeerId;
use physarum_net_real::keyfile::{self, KeyOrigin};
use physarum_net_real::metrics::{self, Metrics};
use physarum_net_real::{run_node, NodeOptions, P2p, P2pOptions, TunnelStream};
use physarum_runtime::transport::{Inbound, InstanceDriver, Observer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything resolved from the command line, the config file and the environment.
pub struct Prepared {
    pub conf: ConfFile,
    pub conf_source: ConfSource,
    pub bootstraps: Vec<Multiaddr>,
    pub psk: Option<String>,
    pub keypair: Keypair,
    pub listen: Multiaddr,
    /// `--tunnel-port`: where peers open tunnels on connections of their own (`None`: off).
    pub tunnel_port: Option<u16>,
    pub bootstrap_attempts: u32,
    /// conf.json's "Operators" and every --operator.
    pub operators: Operators,
}

/// How a daemon that has no `--key` gets its identity.
pub enum KeyDefault {
    /// A persistent key at this path.
    File(PathBuf),
    /// A fresh identity for this run only (clients, instances without a key).
    Ephemeral,
}

/// Resolve the configuration of a daemon. Errors name what is wrong.
pub fn prepare(net: &NetArgs, key_default: KeyDefault, default_listen: &str) -> Result<Prepared> {
    let (conf, conf_source) = conf::load(net.configfile.as_deref())?;
    let env_boots = conf::env_bootstraps();
    let bootstraps = conf::bootstraps(&net.bootstrap, &conf, env_boots.as_deref());
    conf::validate_bootstraps(&bootstraps)?;
    let bootstraps = bootstraps
        .iter()
        .map(|b| b.parse::<Multiaddr>().with_context(|| format!("invalid bootstrap address {b:?}")))
        .collect::<Result<Vec<_>>>()?;
    let psk = conf::psk(net.psk.as_deref(), conf::env_psk().as_deref());
    let key_path = match (&net.key, key_default) {
        (Some(p), _) => Some(p.clone()),
        (None, KeyDefault::File(p)) => Some(p),
        (None, KeyDefault::Ephemeral) => None,
    };
    let keypair = match key_path {
        Some(path) => {
            let (key, origin) = keyfile::load_or_create(&path)?;
            match origin {
                KeyOrigin::Loaded => tracing::info!("Loaded identity key from {}", path.display()),
                KeyOrigin::Created => tracing::info!("Created a new identity key in {}", path.display()),
            }
            key
        }
        None => Keypair::generate_ed25519(),
    };
    let listen_text = net.listen.as_deref().unwrap_or(default_listen);
    let listen: Multiaddr = listen_text
        .parse()
        .with_context(|| format!("invalid listen address {listen_text:?} (expected a multiaddr)"))?;
    match &conf_source {
        ConfSource::File(p) => tracing::info!("Using config file {}", p.display()),
        ConfSource::Defaults => {
            tracing::info!("No config file at {}: using the default configuration", conf::DEFAULT_CONFIG)
        }
    }
    let mut operators = conf.operator_keys();
    operators.extend(net.operator.iter().copied());
    let operators = Operators::new(operators);
    if operators.is_empty() {
        tracing::warn!(
            "No operator keys configured (\"Operators\" in conf.json or --operator): nothing can be verified, \
             so no service can be registered, resolved or served"
        );
    }
    Ok(Prepared {
        conf,
        conf_source,
        bootstraps,
        psk,
        keypair,
        listen,
        tunnel_port: net.tunnel_port.0,
        bootstrap_attempts: net.bootstrap_attempts,
        operators,
    })
}

impl Prepared {
    /// Network options for this daemon.
    pub fn p2p_options(&self) -> P2pOptions {
        let mut opts = P2pOptions::new(self.keypair.clone());
        opts.listen = vec![self.listen.clone()];
        opts.bootstraps = self.bootstraps.clone();
        opts.psk = self.psk.clone();
        opts.backoff.startup_attempts = self.bootstrap_attempts;
        opts.data_plane_port = self.tunnel_port;
        opts
    }

    /// Trust settings for a node started now: the operators, and the wall clock
    /// lined up with the node loop's (which starts within moments).
    pub fn trust(&self) -> TrustConfig {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        TrustConfig::new(self.operators.clone(), unix)
    }

    /// A node config for this daemon as `peer`: conf.json's requirements and the trust settings.
    pub fn node_config(&self, peer: &libp2p::PeerId) -> NodeConfig {
        let mut node = NodeConfig::new(PeerId(peer.to_string()), self.requirements());
        node.trust = self.trust();
        node
    }

    /// conf.json's performance requirements.
    pub fn requirements(&self) -> Requirements {
        self.conf.requirements()
    }

    pub fn log_perf(&self) {
        tracing::info!(
            "Setting performance requirements based on the config: soft limit: {}ms hard limit: {}ms",
            self.conf.perf.soft.rtt_ms,
            self.conf.perf.hard.rtt_ms
        );
    }
}

/// Start the network: connect to the bootstraps, then log the node's identity and
/// addresses the way the original does.
pub async fn start_network(prepared: &Prepared, opts: P2pOptions) -> Result<(P2p, Inbound<TunnelStream>)> {
    if opts.bootstraps.is_empty() {
        tracing::info!("No bootstrap nodes configured: starting a network of our own");
    } else {
        tracing::info!("Connecting to bootstrap nodes...");
    }
    if prepared.psk.is_some() {
        tracing::info!("Joining the private network of the configured PSK");
    }
    let (p2p, inbound) = P2p::start(opts).await.map_err(|e| {
        let hint = if prepared.bootstraps.is_empty() {
            String::new()
        } else {
            format!(
                " (check that the bootstraps run and that every node uses the same private network key: \
                 this node {} --psk/P2P_PSK)",
                if prepared.psk.is_some() { "has a" } else { "has no" }
            )
        };
        e.context(format!("cannot join the P2P network{hint}"))
    })?;
    let connected = p2p.connected_peers();
    for b in &prepared.bootstraps {
        let peer = b.iter().find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        });
        if let Some(peer) = peer.filter(|id| connected.iter().any(|(c, _)| c == id)) {
            tracing::info!("Connected to bootstrap node: {{{peer}: [{b}]}}");
        }
    }
    if !prepared.bootstraps.is_empty() {
        tracing::info!("Connected to {} peers!", connected.len());
    }
    let addrs: Vec<String> = p2p.listen_addrs().iter().map(|a| a.to_string()).collect();
    tracing::info!(
        "Finished setting up libp2p Node with PID {} and Multiaddresses [{}]",
        p2p.peer_id(),
        addrs.join(" ")
    );
    for a in p2p.dial_addrs() {
        tracing::info!("Dial this node at {a}");
    }
    match p2p.data_plane_addr() {
        Some(addr) => tracing::info!("Peers open tunnels to this node on connections of their own at {addr}"),
        None => tracing::info!("Tunnels to this node run inside its P2P connections (--tunnel-port off)"),
    }
    Ok((p2p, inbound))
}

/// A seed for the core's RNG (not security relevant).
pub fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// How long requests in flight may take to finish once SIGTERM/SIGINT came.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// After draining, how long written responses get to reach the wire before exit.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Run the node and its metrics endpoint until SIGINT/SIGTERM (`Ok`) or a failure.
/// The metrics endpoint opens only once the node runs, so it doubles as a
/// readiness signal. `on_ready` gets the front end's bound address.
#[allow(clippy::too_many_arguments)]
pub async fn run<D: InstanceDriver, O: Observer>(
    p2p: P2p,
    inbound: Inbound<TunnelStream>,
    opts: NodeOptions,
    driver: D,
    observer: O,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    on_ready: impl FnOnce(Option<SocketAddr>),
) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let node = run_node(p2p.clone(), inbound, opts, driver, observer, move |handle, bound| {
        let _ = tx.send((handle, bound));
    });
    tokio::pin!(node);
    let (handle, bound) = tokio::select! {
        r = &mut node => return r.context("the node stopped"),
        r = rx => match r {
            Ok(ready) => ready,
            Err(_) => return node.await.context("the node stopped"),
        },
        _ = crate::signals::shutdown() => return Ok(()),
    };
    let server = match metrics_addr {
        Some(addr) => {
            let s = metrics::serve(addr, metrics.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            tracing::info!("Serving metrics on http://{}/metrics", s.local_addr);
            Some(s)
        }
        None => None,
    };
    on_ready(bound);
    tracing::info!("Waiting for requests...");
    let gauge = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics.set_connected_peers(p2p.connected_peers().len());
            let (direct, swarm) = p2p.tunnels_opened();
            metrics.set_tunnels_opened(direct, swarm);
        }
    };
    let result = tokio::select! {
        r = &mut node => r.context("the node stopped"),
        _ = gauge => Ok(()),
        _ = crate::signals::shutdown() => {
            // Requests in flight finish (within a bound) before the node stops.
            let busy = handle.in_flight();
            if busy > 0 {
                tracing::info!("Draining {busy} requests in flight (at most {DRAIN_LIMIT:?})");
            }
            tokio::select! {
                r = &mut node => r.context("the node stopped"),
                drained = handle.drained(DRAIN_LIMIT) => {
                    if !drained {
                        tracing::warn!("{} requests still in flight after {DRAIN_LIMIT:?}; stopping", handle.in_flight());
                    }
                    // A request counts as done once its last body frame is handed to
                    // the connection; give those last bytes a moment to be written.
                    tokio::time::sleep(FLUSH_GRACE).await;
                    Ok(())
                }
            }
        }
    };
    drop(server);
    result
}

/// Run `main` on a tokio current_thread runtime (the measured best on small
/// machines); errors are logged with their causes and give exit code 1.
pub fn block_on(name: &str, main: impl std::future::Future<Output = Result<()>>) -> std::process::ExitCode {
    raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every tunnel holds a connection of its own (and, on a sidecar, one to the
/// application), so a busy daemon needs more descriptors than the usual soft limit
/// of 1024: raise it to the hard limit, as nginx's `worker_rlimit_nofile` or Go's
/// runtime do. Past the hard limit, accepting pauses and dialers fall back.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Parse a metrics address flag with a clear error.
pub fn metrics_addr(flag: &str) -> Result<SocketAddr> {
    metrics::parse_listen_addr(flag).map_err(anyhow::Error::msg)
}
