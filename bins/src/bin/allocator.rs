//! `allocator`: the LCA allocator. Starts instances of registered services on this
//! machine when peers ask (process driver: the executable plus a sidecar `proxy`),
//! culls idle ones, serves Prometheus metrics (default :9101).

use clap::Parser;
use physarum::cli::AllocatorCli;
use physarum::daemons::Launcher;
use std::process::ExitCode;

fn main() -> ExitCode {
    physarum::logging::init();
    let cli = AllocatorCli::parse();
    physarum::daemon::block_on("allocator", physarum::daemons::allocator::run(cli, Launcher::Standalone))
}
