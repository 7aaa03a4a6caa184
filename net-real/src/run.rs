//! The whole daemon: the libp2p network + the shared runtime (node loop, tunnel
//! server, HTTP front end) on the current task.

use crate::p2p::{P2p, TunnelStream};
use anyhow::Context as _;
use physarum_core::config::NodeConfig;
use physarum_runtime::transport::{Inbound, InstanceDriver, Observer, TcpConnector};
use physarum_runtime::{NodeHandle, NodeRuntime, RuntimeConfig};
use std::net::SocketAddr;

/// What [`run_node`] runs on top of a started [`P2p`].
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The core's configuration (roles, perf defaults, …). `node.local` should be
    /// `p2p.local_peer()`; `node.serve` is Some in service mode.
    pub node: NodeConfig,
    /// Seeds the core's RNG.
    pub seed: u64,
    pub runtime: RuntimeConfig,
    /// Serve the HTTP front end here (proxies), e.g. 127.0.0.1:PORT.
    pub http: Option<SocketAddr>,
    /// Service mode: the application's address (ADDRESS).
    pub app: Option<SocketAddr>,
}

/// Run a node until its loop stops (it only does on a bug) — wrap it in a `select!`
/// with your shutdown signal. Must be called on a tokio current_thread runtime (or
/// any runtime): it creates its own `LocalSet`. `on_ready` gets the node's handle
/// and the front end's bound address once everything listens.
pub async fn run_node<D: InstanceDriver, O: Observer>(
    p2p: P2p,
    inbound: Inbound<TunnelStream>,
    opts: NodeOptions,
    driver: D,
    observer: O,
    on_ready: impl FnOnce(NodeHandle, Option<SocketAddr>),
) -> anyhow::Result<()> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let listener = match opts.http {
                Some(addr) => Some(http_listener(addr).with_context(|| format!("cannot listen for HTTP on {addr}"))?),
                None => None,
            };
            let bound = listener.as_ref().and_then(|l| l.local_addr().ok());
            let rt = NodeRuntime::new(opts.node, opts.seed, p2p, inbound, opts.runtime)
                .with_driver(driver)
                .with_observer(observer);
            match opts.app {
                Some(app) => {
                    let mut running = rt.with_app(TcpConnector(app)).spawn();
                    if let Some(l) = listener {
                        running.serve_http(l);
                    }
                    on_ready(running.handle(), bound);
                    running.stopped().await;
                }
                None => {
                    let mut running = rt.spawn();
                    if let Some(l) = listener {
                        running.serve_http(l);
                    }
                    on_ready(running.handle(), bound);
                    running.stopped().await;
                }
            }
            Err(anyhow::anyhow!("the node loop stopped unexpectedly"))
        })
        .await
}

/// Connections a burst of clients may open before the front end accepts them; past
/// it the kernel drops their SYNs and they wait for retransmissions.
const HTTP_BACKLOG: u32 = 4096;

fn http_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}
