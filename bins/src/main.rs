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
        Command::Bench(args) => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum bench", physarum::bench::run(args))
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
        Command::TcpEcho(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("tcp-echo", daemons::echo::run_tcp(cli))
        }
        Command::UdpEcho(cli) => {
            physarum::logging::init();
            physarum::daemon::block_on("udp-echo", daemons::echo::run_udp(cli))
        }
        Command::L4 { op: physarum::cli::L4Op::Map { proxy, timeout, chain } } => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum l4", async move {
                let path = physarum::l4_client::mapping_path(&chain)?;
                println!("{}", physarum::l4_client::map(proxy, &path, Duration::from_secs(timeout)).await?);
                Ok(())
            })
        }
        Command::Keygen { out, public } => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum keygen", async move {
                let key = match (out, public) {
                    (Some(out), _) => physarum::keys::keygen(&out)?.public(),
                    (None, Some(path)) => physarum::keys::load_operator_key(&path)?.public(),
                    (None, None) => anyhow::bail!("pass --out FILE or --public FILE"),
                };
                println!("{key}");
                Ok(())
            })
        }
        Command::Grant { operator_key, peer, out } => {
            physarum::logging::init_with_default("warn");
            physarum::daemon::block_on("physarum grant", async move {
                let grant = physarum::keys::grant(&operator_key, &peer)?;
                match out {
                    Some(out) => physarum::keys::write_grant(&grant, &out)?,
                    None => println!("{}", serde_json::to_string_pretty(&grant)?),
                }
                Ok(())
            })
        }
    }
}
