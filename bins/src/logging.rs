//! `tracing` set-up shared by every binary: `RUST_LOG` (env-filter syntax),
//! `info` by default, to stderr.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. A malformed `RUST_LOG` falls back to `info`
/// with a warning rather than failing the daemon.
pub fn init() {
    init_with_default("info")
}

/// [`init`] with another default level (the CLI is quieter: `warn`).
pub fn init_with_default(default: &str) {
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some(format!("ignoring RUST_LOG={spec:?}: {e}"))),
        },
        _ => (EnvFilter::new(default), None),
    };
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).try_init();
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
}
