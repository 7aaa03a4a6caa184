//! Waiting for the signals that stop a daemon.

/// Resolves on the first SIGINT or SIGTERM (Ctrl-C, `kill`). If the handlers
/// cannot be installed, it waits for Ctrl-C through tokio's portable handler.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupted, shutting down");
        }
    }
}
