//! physarum-core: the sans-IO heart of physarum.
//!
//! Every machine here is a plain struct fed inputs with the current [`time::Instant`]
//! and drained of outputs; none reads a clock, opens a socket, spawns a thread or
//! draws from a global RNG. [`node::Node`] composes them into the one machine both
//! runtimes (libp2p + hyper in production, turmoil in simulation) drive; its
//! contract is in [`io`].

pub mod allocator;
pub mod config;
pub mod dht_policy;
pub mod io;
pub mod manager;
pub mod node;
pub mod peer_cache;
pub mod perf;
pub mod placement;
pub mod registry;
pub mod registry_cache;
pub mod resilience;
pub mod time;
pub mod trust;
pub mod types;
pub mod wire;

pub use io::{Event, Input, OpResult, Outcome, Output};
pub use node::Node;
pub use time::Instant;
