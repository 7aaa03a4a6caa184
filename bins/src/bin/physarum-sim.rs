//! `physarum-sim run <scenario-file> --seed N`: run a scenario in the deterministic
//! simulation (turmoil) and print a timeline summary, the figures and the trace hash.
//! The same file and seed always give the same trace hash.

use anyhow::Context;
use clap::{Parser, Subcommand};
use physarum_net_sim::{run, Scenario};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "physarum-sim", about = "Run physarum scenarios in the deterministic cluster simulation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario file (JSON) with one seed.
    Run {
        /// The scenario file (see scenarios/ in the repository).
        file: PathBuf,
        /// The seed that decides everything random in the run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also print the whole trace.
        #[arg(long)]
        trace: bool,
        /// Leave out the timeline.
        #[arg(long)]
        quiet: bool,
    },
    /// Check that a scenario file parses and is consistent, without running it.
    Check { file: PathBuf },
}

fn load(file: &PathBuf) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Scenario::from_json(&text).with_context(|| format!("{}", file.display()))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("physarum-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { file } => {
            let s = load(&file)?;
            println!(
                "{}: scenario {:?}, {} nodes, {} faults, {} workloads: ok",
                file.display(),
                s.name,
                s.nodes.len(),
                s.schedule.len(),
                s.workloads.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { file, seed, trace, quiet } => {
            let s = load(&file)?;
            let report = run(&s, seed).map_err(anyhow::Error::msg)?;
            if !quiet {
                println!("--- timeline ---");
                print!("{}", report.timeline());
            }
            if trace {
                println!("--- trace ---");
                print!("{}", report.trace.text());
            }
            println!("--- summary ---");
            print!("{}", report.summary());
            println!("replay: physarum-sim run {} --seed {seed}", file.display());
            Ok(if report.violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
