//! `physarum`: the command-line tool. `physarum registry add|get|list|rm` talks to
//! the registry service; `physarum dev` runs a whole cluster on this machine; every
//! daemon is also a subcommand (`physarum allocator …`, `physarum registry-service …`).

use clap::Parser;
use physarum::cli::{Command, PhysarumCli};
use physarum::daemons::{self, Launcher};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = PhysarumCli::parse();
    match cli.command {
        Command::Registry { net, timeout, op } => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum registry", async move {
                let out = physarum::registry_client::run(&net, Duration::from_secs(timeout), &op).await?;
                println!("{out}");
                Ok(())
            })
        }
        Command::Dev(args) => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum dev", physarum::dev::run(args))
        }
        Command::Allocator(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("allocator", daemons::allocator::run(cli, Launcher::Multicall))
        }
        Command::Proxy(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("proxy", daemons::proxy::run(cli))
        }
        Command::RegistryService(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("registry", daemons::registry::run(cli))
        }
        Command::Bootstrap(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("bootstrap", daemons::bootstrap::run(cli))
        }
        Command::Hello(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("hello", daemons::hello::run(cli))
        }
    }
}
