//! The allocator machine (DESIGN.md §2, "LCA allocator"). TO BE IMPLEMENTED — API fixed.

use crate::config::AllocatorConfig;
use crate::io::Event;
use crate::time::Instant;
use crate::types::{InboundId, InstanceId, PeerAddr, PeerId, ServiceInfo};
use crate::wire::Response;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocatorInput {
    /// A peer asks for an instance of `service` (a name; what to run comes from the registry).
    Request {
        id: InboundId,
        from: PeerId,
        service: String,
    },
    /// The registry's answer to [`AllocatorOutput::Resolve`]: `Ok(None)` = no such service.
    Resolved {
        service: String,
        result: Result<Option<ServiceInfo>, String>,
    },
    InstanceStarted {
        instance: InstanceId,
        peer: PeerAddr,
    },
    InstanceFailed {
        instance: InstanceId,
        reason: String,
    },
    InstanceExited {
        instance: InstanceId,
    },
    /// The answer to [`AllocatorOutput::QueryIdle`]: seconds idle, or why the query failed.
    IdleAnswer {
        token: u64,
        result: Result<u64, String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocatorOutput {
    /// Look `service` up in the registry; answer with `AllocatorInput::Resolved`.
    Resolve {
        service: String,
    },
    /// Answer request `id` (`Response::Allocated` or `Response::Refused`).
    Reply {
        id: InboundId,
        response: Response,
    },
    Start {
        instance: InstanceId,
        service: ServiceInfo,
    },
    Stop {
        instance: InstanceId,
    },
    /// Ask the instance's sidecar how long it has been idle; answer with `IdleAnswer`.
    QueryIdle {
        token: u64,
        peer: PeerAddr,
        timeout: Duration,
    },
    Event(Event),
}

/// A read-only view of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    pub instance: InstanceId,
    pub service: String,
    /// `None` while starting.
    pub peer: Option<PeerAddr>,
}

pub struct Allocator {}

impl Allocator {
    pub fn new(_config: AllocatorConfig, _now: Instant) -> Self {
        unimplemented!()
    }
    pub fn handle_input(&mut self, _now: Instant, _input: AllocatorInput) {
        unimplemented!()
    }
    pub fn handle_timeout(&mut self, _now: Instant) {
        unimplemented!()
    }
    pub fn poll_output(&mut self) -> Option<AllocatorOutput> {
        unimplemented!()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        unimplemented!()
    }
    pub fn instances(&self) -> impl Iterator<Item = InstanceView> + '_ {
        std::iter::empty()
    }
}
