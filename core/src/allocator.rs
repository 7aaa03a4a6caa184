//! The allocator machine (DESIGN.md §2, "LCA allocator").
//!
//! One per machine that may host instances. It starts instances of services on
//! behalf of peers and culls the idle ones. Unlike the original it
//!
//! - never runs what a peer names: a request carries a service *name*, and what to
//!   run comes from the registry ([`AllocatorOutput::Resolve`]); an unknown name is
//!   refused (admission control);
//! - bounds allocation storms: at most one instance per service (name and content
//!   hash) on this allocator, at most one start in flight per service, concurrent
//!   and retrying requests join the start in flight or get the instance already up,
//!   and `max_instances` / CPU / memory capacity caps the rest;
//! - answers with the new instance's [`PeerAddr`], so a client dials it directly
//!   instead of waiting for the DHT to show it.
//!
//! Every [`AllocatorInput::Request`] gets exactly one [`AllocatorOutput::Reply`]:
//! from the registry's answer, the start's outcome, or a timeout. Inputs naming
//! unknown instances or tokens, or answering nothing asked, are ignored.

use crate::config::AllocatorConfig;
use crate::io::Event;
use crate::time::Instant;
use crate::types::{InboundId, InstanceId, PeerAddr, PeerId, ServiceInfo};
use crate::wire::Response;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
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

/// Smallest cull interval honoured, so a zero in the config cannot make the
/// machine ask to be woken again and again at the same instant.
const MIN_CULL_INTERVAL: Duration = Duration::from_millis(1);

/// Requests waiting for the registry's answer about one service name.
struct PendingResolve {
    waiters: Vec<InboundId>,
    /// Safety net: if the registry answer never comes, the waiters are refused then.
    deadline: Instant,
}

enum InstanceState {
    Starting {
        waiters: Vec<InboundId>,
        deadline: Instant,
    },
    Up {
        peer: PeerAddr,
        /// The outstanding idle query's token, if any.
        query: Option<u64>,
    },
}

struct Instance {
    service: ServiceInfo,
    state: InstanceState,
}

impl Instance {
    fn serves(&self, info: &ServiceInfo) -> bool {
        self.service.name == info.name && self.service.hash == info.hash
    }
}

/// The allocator machine: see the module documentation.
pub struct Allocator {
    config: AllocatorConfig,
    next_instance: u64,
    next_token: u64,
    next_cull: Instant,
    resolving: BTreeMap<String, PendingResolve>,
    instances: BTreeMap<InstanceId, Instance>,
    /// Outstanding idle queries: token → (instance, deadline).
    queries: BTreeMap<u64, (InstanceId, Instant)>,
    /// Requests not answered yet (a repeated id is ignored while its first is open).
    open: BTreeSet<InboundId>,
    outputs: VecDeque<AllocatorOutput>,
}

impl Allocator {
    pub fn new(config: AllocatorConfig, now: Instant) -> Self {
        let next_cull = now + config.cull_interval.max(MIN_CULL_INTERVAL);
        Allocator {
            config,
            next_instance: 1,
            next_token: 1,
            next_cull,
            resolving: BTreeMap::new(),
            instances: BTreeMap::new(),
            queries: BTreeMap::new(),
            open: BTreeSet::new(),
            outputs: VecDeque::new(),
        }
    }

    pub fn handle_input(&mut self, now: Instant, input: AllocatorInput) {
        match input {
            AllocatorInput::Request { id, from: _, service } => self.on_request(now, id, service),
            AllocatorInput::Resolved { service, result } => self.on_resolved(now, service, result),
            AllocatorInput::InstanceStarted { instance, peer } => self.on_started(instance, peer),
            AllocatorInput::InstanceFailed { instance, reason } => {
                self.on_gone(instance, format!("instance failed to start: {reason}"), reason)
            }
            AllocatorInput::InstanceExited { instance } => {
                self.on_gone(instance, "instance exited before it was up".to_string(), "instance exited".to_string())
            }
            AllocatorInput::IdleAnswer { token, result } => self.on_idle_answer(token, result),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Registry answers that never came.
        let expired: Vec<String> =
            self.resolving.iter().filter(|(_, p)| p.deadline <= now).map(|(s, _)| s.clone()).collect();
        for service in expired {
            if let Some(pending) = self.resolving.remove(&service) {
                let reason = format!("registry unavailable: no answer about {service:?} in time");
                for id in pending.waiters {
                    self.refuse(id, reason.clone());
                }
            }
        }

        // Starts that were not reported in time.
        let late: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, i)| matches!(i.state, InstanceState::Starting { deadline, .. } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for instance in late {
            let Some(inst) = self.instances.remove(&instance) else { continue };
            let reason = format!("instance did not start within {:?}", self.config.start_timeout);
            self.outputs.push_back(AllocatorOutput::Stop { instance });
            if let InstanceState::Starting { waiters, .. } = inst.state {
                for id in waiters {
                    self.refuse(id, reason.clone());
                }
            }
            self.event(Event::InstanceGone { instance, service: inst.service.name, reason });
        }

        // Idle queries that were not answered in time.
        let timed_out: Vec<u64> = self.queries.iter().filter(|(_, (_, d))| *d <= now).map(|(t, _)| *t).collect();
        for token in timed_out {
            if let Some((instance, _)) = self.queries.remove(&token) {
                self.cull(instance, "idle query timed out".to_string());
            }
        }

        // The periodic cull round.
        if self.next_cull <= now {
            let interval = self.config.cull_interval.max(MIN_CULL_INTERVAL);
            self.next_cull += interval;
            if self.next_cull <= now {
                // Rounds were missed (the runtime was away); do one, and resume the rhythm from now.
                self.next_cull = now + interval;
            }
            self.cull_round(now);
        }
    }

    pub fn poll_output(&mut self) -> Option<AllocatorOutput> {
        self.outputs.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let starts = self.instances.values().filter_map(|i| match i.state {
            InstanceState::Starting { deadline, .. } => Some(deadline),
            InstanceState::Up { .. } => None,
        });
        let resolves = self.resolving.values().map(|p| p.deadline);
        let queries = self.queries.values().map(|(_, d)| *d);
        starts.chain(resolves).chain(queries).chain(std::iter::once(self.next_cull)).min()
    }

    pub fn instances(&self) -> impl Iterator<Item = InstanceView> + '_ {
        self.instances.iter().map(|(id, inst)| InstanceView {
            instance: *id,
            service: inst.service.name.clone(),
            peer: match &inst.state {
                InstanceState::Starting { .. } => None,
                InstanceState::Up { peer, .. } => Some(peer.clone()),
            },
        })
    }

    /// How many requests are waiting for an answer (from the registry or a start).
    pub fn pending_requests(&self) -> usize {
        self.open.len()
    }

    /// CPU (thousandths of a core) and memory (MiB) taken by starting and up instances.
    pub fn used_capacity(&self) -> (u64, u64) {
        self.instances
            .values()
            .fold((0, 0), |(cpu, mem), i| (cpu + u64::from(i.service.cpu_millis), mem + u64::from(i.service.memory_mb)))
    }

    fn on_request(&mut self, now: Instant, id: InboundId, service: String) {
        if !self.open.insert(id) {
            return; // the same request again while its first copy is being handled
        }
        if let Some(pending) = self.resolving.get_mut(&service) {
            pending.waiters.push(id);
            return;
        }
        // The safety net for a registry answer that never comes: as long as a start may take.
        let deadline = now + self.config.start_timeout;
        self.resolving.insert(service.clone(), PendingResolve { waiters: vec![id], deadline });
        self.outputs.push_back(AllocatorOutput::Resolve { service });
    }

    fn on_resolved(&mut self, now: Instant, service: String, result: Result<Option<ServiceInfo>, String>) {
        let Some(pending) = self.resolving.remove(&service) else { return };
        match result {
            Ok(None) => {
                let reason = format!("service {service:?} is unknown to the registry");
                for id in pending.waiters {
                    self.refuse(id, reason.clone());
                }
            }
            Err(e) => {
                let reason = format!("registry unavailable: {e}");
                for id in pending.waiters {
                    self.refuse(id, reason.clone());
                }
            }
            Ok(Some(info)) => {
                for id in pending.waiters {
                    self.admit(now, id, &info);
                }
            }
        }
    }

    /// A request for a service the registry knows: reuse, join, start or refuse.
    fn admit(&mut self, now: Instant, id: InboundId, info: &ServiceInfo) {
        if let Some(inst) = self.instances.values_mut().find(|i| i.serves(info)) {
            match &mut inst.state {
                InstanceState::Up { peer, .. } => {
                    let peer = peer.clone();
                    self.reply(id, Response::Allocated { instance: peer });
                }
                InstanceState::Starting { waiters, .. } => waiters.push(id),
            }
            return;
        }
        if let Err(reason) = self.check_capacity(info) {
            self.refuse(id, reason);
            return;
        }
        let instance = InstanceId(self.next_instance);
        self.next_instance = self.next_instance.wrapping_add(1);
        let deadline = now + self.config.start_timeout;
        self.instances.insert(
            instance,
            Instance { service: info.clone(), state: InstanceState::Starting { waiters: vec![id], deadline } },
        );
        self.event(Event::InstanceStarting { instance, service: info.name.clone() });
        self.outputs.push_back(AllocatorOutput::Start { instance, service: info.clone() });
    }

    fn check_capacity(&self, info: &ServiceInfo) -> Result<(), String> {
        let count = self.instances.len();
        if count >= self.config.max_instances {
            return Err(format!(
                "no capacity: {count} of {} instances already running or starting",
                self.config.max_instances
            ));
        }
        let (cpu, mem) = self.used_capacity();
        let need_cpu = u64::from(info.cpu_millis);
        if cpu.saturating_add(need_cpu) > self.config.cpu_millis {
            return Err(format!(
                "no capacity: not enough CPU ({need_cpu} millicores needed, {} of {} free)",
                self.config.cpu_millis.saturating_sub(cpu),
                self.config.cpu_millis
            ));
        }
        let need_mem = u64::from(info.memory_mb);
        if mem.saturating_add(need_mem) > self.config.memory_mb {
            return Err(format!(
                "no capacity: not enough memory ({need_mem} MiB needed, {} of {} MiB free)",
                self.config.memory_mb.saturating_sub(mem),
                self.config.memory_mb
            ));
        }
        Ok(())
    }

    fn on_started(&mut self, instance: InstanceId, peer: PeerAddr) {
        let Some(inst) = self.instances.get_mut(&instance) else { return };
        let InstanceState::Starting { waiters, .. } = &mut inst.state else { return };
        let waiters = std::mem::take(waiters);
        inst.state = InstanceState::Up { peer: peer.clone(), query: None };
        let service = inst.service.name.clone();
        for id in waiters {
            self.reply(id, Response::Allocated { instance: peer.clone() });
        }
        self.event(Event::InstanceUp { instance, service, peer: peer.peer });
    }

    /// The instance failed or exited: `refusal` for requests still waiting on its
    /// start, `reason` for the event.
    fn on_gone(&mut self, instance: InstanceId, refusal: String, reason: String) {
        let Some(inst) = self.instances.remove(&instance) else { return };
        match inst.state {
            InstanceState::Starting { waiters, .. } => {
                for id in waiters {
                    self.refuse(id, refusal.clone());
                }
            }
            InstanceState::Up { query, .. } => {
                if let Some(token) = query {
                    self.queries.remove(&token);
                }
            }
        }
        self.event(Event::InstanceGone { instance, service: inst.service.name, reason });
    }

    fn on_idle_answer(&mut self, token: u64, result: Result<u64, String>) {
        let Some((instance, _)) = self.queries.remove(&token) else { return };
        if let Some(Instance { state: InstanceState::Up { query, .. }, .. }) = self.instances.get_mut(&instance) {
            *query = None;
        }
        match result {
            Ok(secs) if Duration::from_secs(secs) > self.config.idle_limit => {
                self.cull(instance, format!("idle for {secs}s (limit {:?})", self.config.idle_limit))
            }
            Ok(_) => {}
            Err(e) => self.cull(instance, format!("idle query failed: {e}")),
        }
    }

    fn cull_round(&mut self, now: Instant) {
        let deadline = now + self.config.idle_query_timeout;
        for (&instance, inst) in self.instances.iter_mut() {
            // An instance still answering the previous round's query is not asked twice.
            let InstanceState::Up { peer, query: query @ None } = &mut inst.state else { continue };
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1);
            *query = Some(token);
            self.queries.insert(token, (instance, deadline));
            self.outputs.push_back(AllocatorOutput::QueryIdle {
                token,
                peer: peer.clone(),
                timeout: self.config.idle_query_timeout,
            });
        }
    }

    /// Stop and forget an up instance.
    fn cull(&mut self, instance: InstanceId, reason: String) {
        let Some(inst) = self.instances.remove(&instance) else { return };
        if let InstanceState::Up { query: Some(token), .. } = inst.state {
            self.queries.remove(&token);
        }
        self.outputs.push_back(AllocatorOutput::Stop { instance });
        self.event(Event::InstanceCulled { instance, service: inst.service.name, reason });
    }

    fn refuse(&mut self, id: InboundId, reason: String) {
        self.reply(id, Response::Refused { reason });
    }

    fn reply(&mut self, id: InboundId, response: Response) {
        self.open.remove(&id);
        self.outputs.push_back(AllocatorOutput::Reply { id, response });
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(AllocatorOutput::Event(event));
    }
}
