//! The three-level peer cache (DESIGN.md §2). TO BE IMPLEMENTED — API fixed.

use crate::config::PeerCacheConfig;
use crate::perf::Requirements;
use crate::time::Instant;
use crate::types::{ContentHash, PeerAddr, PeerId};
use std::time::Duration;

/// Cache levels: lookups prefer `Reliable`, then `Performant`; `Leaving` is never returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Level 0: performant and reliable.
    Reliable = 0,
    /// Level 1: performant, not yet proven.
    Performant = 1,
    /// Level 2: on its way out.
    Leaving = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCacheOutput {
    /// Measure `peer`; report with [`PeerCache::probe_result`] quoting `token`.
    Probe { token: u64, peer: PeerAddr, timeout: Duration },
    /// An entry left the cache (hard violation, lost probe, unreliable, removed).
    Evicted { service: ContentHash, peer: PeerId, reason: String },
    /// The entry has violated its soft limit for longer than the grace.
    SeekBetter { service: ContentHash, peer: PeerId, rtt: Duration },
}

/// A read-only view of one entry, for callers and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryView {
    pub service: ContentHash,
    pub peer: PeerAddr,
    pub level: Level,
    pub reliability: u8,
    pub rtt: Duration,
}

pub struct PeerCache {}

impl PeerCache {
    pub fn new(_config: PeerCacheConfig, _soft_grace: Duration) -> Self {
        unimplemented!()
    }
    pub fn insert(
        &mut self,
        _now: Instant,
        _service: &ContentHash,
        _requirements: Requirements,
        _peer: PeerAddr,
        _rtt: Duration,
    ) {
        unimplemented!()
    }
    pub fn lookup(&self, _service: &ContentHash) -> Option<&EntryView> {
        unimplemented!()
    }
    pub fn remove(&mut self, _service: &ContentHash, _peer: &PeerId, _reason: &str) -> bool {
        unimplemented!()
    }
    pub fn probe_result(&mut self, _now: Instant, _token: u64, _rtt: Option<Duration>) {
        unimplemented!()
    }
    pub fn handle_timeout(&mut self, _now: Instant) {
        unimplemented!()
    }
    pub fn poll_output(&mut self) -> Option<PeerCacheOutput> {
        unimplemented!()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        unimplemented!()
    }
    pub fn entries(&self) -> impl Iterator<Item = &EntryView> + '_ {
        std::iter::empty()
    }
}
