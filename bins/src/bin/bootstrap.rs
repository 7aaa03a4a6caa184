//! `bootstrap`: a well-known DHT server everybody joins through. Pings its
//! connected peers and exports their RTTs as Prometheus metrics (default :9100),
//! like the original's ping monitor.

use clap::Parser;
use physarum::cli::BootstrapCli;
use std::process::ExitCode;

fn main() -> ExitCode {
    physarum::logging::init();
    let cli = BootstrapCli::parse();
    physarum::daemon::block_on("bootstrap", physarum::daemons::bootstrap::run(cli))
}
