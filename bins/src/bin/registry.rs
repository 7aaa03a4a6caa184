//! `registry`: the registry service. Maps service names to what runs them (add,
//! get, list, delete over the P2P network), kept in an embedded store: a JSON file
//! in `--data-dir`, replaced atomically after every change and reloaded at start.

use clap::Parser;
use physarum::cli::RegistryCli;
use std::process::ExitCode;

fn main() -> ExitCode {
    physarum::logging::init();
    let cli = RegistryCli::parse();
    physarum::daemon::block_on("registry", physarum::daemons::registry::run(cli))
}
