//! physarum-net-sim: the simulation runtime (DESIGN.md §5).
//!
//! The core's `Node` machines run on turmoil hosts through the shared runtime's node
//! loop, HTTP front end and tunnel server (`physarum-runtime`); this crate provides
//! the turmoil transport ([`transport`]), the simulated DHT ([`dht`]), the simulated
//! instance driver and applications ([`app`]), scenarios as data ([`scenario`]), the
//! trace and its hash ([`trace`]).

pub mod app;
pub mod cluster;
pub mod des;
pub mod dht;
pub mod kad;
pub mod node;
pub mod policies;
pub mod scale;
pub mod scenario;
pub mod timeline;
pub mod topology;
pub mod trace;
pub mod transport;

pub use cluster::{run, run_with_progress, Figures, Report};
pub use des::{run_des, run_des_with_progress};
pub use scenario::{Fault, Invariants, Role, Scenario, ScenarioBuilder, Workload};
