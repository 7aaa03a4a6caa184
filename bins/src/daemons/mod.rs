//! The daemons, callable from their own binaries (`allocator`, `proxy`, …) and as
//! subcommands of `physarum` (`physarum allocator …`), so a single `physarum`
//! executable can run a whole cluster (`physarum dev`, `cargo run -p physarum -- dev`).

pub mod allocator;
pub mod bootstrap;
pub mod echo;
pub mod hello;
pub mod proxy;
pub mod registry;

use anyhow::{Context, Result};
use std::path::PathBuf;

/// How this process starts the other tools (the sidecar proxy, the demo service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Separate binaries: the tool is the executable of that name next to this one.
    Standalone,
    /// This executable is `physarum`: the tool is `physarum <tool>`.
    Multicall,
}

impl Launcher {
    /// The program and leading arguments that run `tool`.
    pub fn tool(self, tool: &str) -> Result<(PathBuf, Vec<String>)> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        Ok(match self {
            Launcher::Standalone => (exe.with_file_name(tool), Vec::new()),
            Launcher::Multicall => (exe, vec![tool.to_string()]),
        })
    }
}
