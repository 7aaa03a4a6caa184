//! `proxy`: forwards `METHOD /<service>/<rest>?<query>` on 127.0.0.1:PORT to an
//! instance of <service> (anonymous mode); with SERVICE ADDRESS [METRICS_PORT] it
//! also serves SERVICE at ADDRESS to the network (service mode).

use clap::Parser;
use physarum::cli::ProxyCli;
use std::process::ExitCode;

fn main() -> ExitCode {
    physarum::logging::init();
    let cli = ProxyCli::parse();
    physarum::daemon::block_on("proxy", physarum::daemons::proxy::run(cli))
}
