//! physarum: the binaries (allocator, proxy, registry, bootstrap, hello, and the
//! `physarum` CLI) and what they share: command-line definitions, config loading,
//! service configs, the registry's persistent store, logging.

pub mod bench;
pub mod cli;
pub mod conf;
pub mod daemon;
pub mod daemons;
pub mod dev;
pub mod hello;
pub mod keys;
pub mod logging;
pub mod plot;
pub mod registry_client;
pub mod service_config;
pub mod signals;
pub mod store;
