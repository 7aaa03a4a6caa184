//! The L4 demo services' entry points (see [`crate::echo`]).

use crate::cli::HelloCli;
use anyhow::{Context, Result};
use std::net::SocketAddr;

/// `tcp-echo`: serve on `$SERVICE_PORT` (or `--port`) until SIGINT/SIGTERM.
pub async fn run_tcp(cli: HelloCli) -> Result<()> {
    let addr = SocketAddr::new(cli.bind, cli.port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!("tcp-echo: listening on {}", listener.local_addr().unwrap_or(addr));
    tokio::select! {
        _ = crate::echo::serve_tcp(listener) => Ok(()),
        _ = crate::signals::shutdown() => Ok(()),
    }
}

/// `udp-echo`: serve on `$SERVICE_PORT` (or `--port`) until SIGINT/SIGTERM. It
/// echoes TCP on the same port too: that is where its sidecar checks it is alive.
pub async fn run_udp(cli: HelloCli) -> Result<()> {
    let addr = SocketAddr::new(cli.bind, cli.port);
    let socket = tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("cannot bind UDP {addr}"))?;
    let addr = socket.local_addr().unwrap_or(addr);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!("udp-echo: listening on udp {addr} (and tcp, for health checks)");
    tokio::select! {
        _ = crate::echo::serve_udp(socket) => Ok(()),
        _ = crate::echo::serve_tcp(listener) => Ok(()),
        _ = crate::signals::shutdown() => Ok(()),
    }
}
