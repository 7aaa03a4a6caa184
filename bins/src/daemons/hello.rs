//! The `hello` demo service's entry point (see [`crate::hello`]).

use crate::cli::HelloCli;
use anyhow::{Context, Result};
use std::net::SocketAddr;

/// Serve until SIGINT/SIGTERM.
pub async fn run(cli: HelloCli) -> Result<()> {
    let addr = SocketAddr::new(cli.bind, cli.port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!("hello: listening on http://{}", listener.local_addr().unwrap_or(addr));
    tokio::select! {
        _ = crate::hello::serve(listener) => Ok(()),
        _ = crate::signals::shutdown() => Ok(()),
    }
}
