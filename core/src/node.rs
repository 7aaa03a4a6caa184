//! The composite machine runtimes drive. BEING IMPLEMENTED — API fixed.

use crate::config::NodeConfig;
use crate::io::{Input, Output};
use crate::time::Instant;

/// One physarum node: manager (+ service mode), and optionally allocator and registry.
///
/// Drive it like quinn-proto: feed `handle_input(now, ..)`, drain `poll_output()`
/// until `None`, then sleep until `poll_timeout()` and feed `Input::Tick`.
pub struct Node {}

impl Node {
    /// `rng_seed` seeds the node's only source of randomness (a ChaCha RNG).
    pub fn new(_config: NodeConfig, _rng_seed: u64, _now: Instant) -> Self {
        Node {}
    }
    pub fn handle_input(&mut self, _now: Instant, _input: Input) {}
    pub fn poll_output(&mut self) -> Option<Output> {
        None
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}
