//! `hello`: the demo service. Answers `Hello, world` on `$SERVICE_PORT` (or
//! `--port`); `/echo` echoes method, path, query and body; `/bytes/N` streams N bytes.

use clap::Parser;
use physarum::cli::HelloCli;
use std::process::ExitCode;

fn main() -> ExitCode {
    physarum::logging::init();
    let cli = HelloCli::parse();
    physarum::daemon::block_on("hello", physarum::daemons::hello::run(cli))
}
