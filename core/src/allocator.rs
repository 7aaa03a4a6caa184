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
//!   instead of waiting for the DHT to show it;
//! - runs `Exec` programs only from its configured exec roots, and certifies each
//!   instance it starts: once the driver reports it up, the instance is sent its
//!   credentials (a certificate signed under this allocator's grant) in the first
//!   idle query, and only when it has accepted them is it handed to clients. Every
//!   cull round's idle query carries renewed credentials. An allocator without a
//!   grant refuses to start anything, since no client would trust its instances.
//!
//! Every [`AllocatorInput::Request`] gets exactly one [`AllocatorOutput::Reply`]:
//! from the registry's answer, the start's outcome, or a timeout. A registry answer
//! that has not come within `start_timeout` (a safety net; the node's own registry
//! timeout should fire long before) refuses the requests waiting on it, and a late
//! answer is then ignored. Inputs naming
//! unknown instances or tokens, or answering nothing asked, are ignored.

use crate::config::AllocatorConfig;
use crate::io::Event;
use crate::time::Instant;
use crate::trust::{program_within, Credentials, TrustConfig};
use crate::types::{InboundId, InstanceId, PeerAddr, PeerId, RunSpec, ServiceInfo};
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
    /// An instance an earlier run started is still running: it is certified afresh
    /// and then served and culled like one started now. Its number is not reused.
    Adopted {
        instance: InstanceId,
        service: ServiceInfo,
        peer: PeerAddr,
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
    /// Give the instance's sidecar its (renewed) credentials and ask how long it has
    /// been idle; answer with `IdleAnswer`.
    QueryIdle {
        token: u64,
        peer: PeerAddr,
        credentials: Option<Credentials>,
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

/// Failed starts remembered at most (see [`AllocatorConfig::failed_start_holdoff`]).
const MAX_FAILED_STARTS: usize = 256;

/// A start that failed recently: requests for the same service get its reason.
struct FailedStart {
    hash: crate::types::ContentHash,
    until: Instant,
    reason: String,
}

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
    /// Up, and sent its credentials; handed to clients once it accepts them.
    Certifying {
        peer: PeerAddr,
        waiters: Vec<InboundId>,
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
    trust: TrustConfig,
    next_instance: u64,
    next_token: u64,
    next_cull: Instant,
    resolving: BTreeMap<String, PendingResolve>,
    instances: BTreeMap<InstanceId, Instance>,
    /// Outstanding idle queries: token → (instance, deadline).
    queries: BTreeMap<u64, (InstanceId, Instant)>,
    /// Requests not answered yet (a repeated id is ignored while its first is open).
    open: BTreeSet<InboundId>,
    /// Services whose start failed recently, by name.
    failed_starts: BTreeMap<String, FailedStart>,
    outputs: VecDeque<AllocatorOutput>,
}

impl Allocator {
    /// An allocator with no instances; its first cull round is `cull_interval` after `now`.
    pub fn new(config: AllocatorConfig, trust: TrustConfig, now: Instant) -> Self {
        let next_cull = now + config.cull_interval.max(MIN_CULL_INTERVAL);
        Allocator {
            config,
            trust,
            next_instance: 1,
            next_token: 1,
            next_cull,
            resolving: BTreeMap::new(),
            instances: BTreeMap::new(),
            queries: BTreeMap::new(),
            open: BTreeSet::new(),
            failed_starts: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// Feed one input. Inputs about unknown instances, tokens or services nobody
    /// asked about are ignored; a request id already being handled is ignored.
    pub fn handle_input(&mut self, now: Instant, input: AllocatorInput) {
        match input {
            AllocatorInput::Request { id, from: _, service } => self.on_request(now, id, service),
            AllocatorInput::Resolved { service, result } => self.on_resolved(now, service, result),
            AllocatorInput::InstanceStarted { instance, peer } => self.on_started(now, instance, peer),
            AllocatorInput::InstanceFailed { instance, reason } => {
                let refusal = format!("instance failed to start: {reason}");
                if let Some(service) = self.on_gone(instance, refusal.clone(), reason) {
                    self.hold_off(now, &service, refusal);
                }
            }
            AllocatorInput::InstanceExited { instance } => {
                let refusal = "instance exited before it was up".to_string();
                if let Some(service) = self.on_gone(instance, refusal.clone(), "instance exited".to_string()) {
                    self.hold_off(now, &service, refusal);
                }
            }
            AllocatorInput::IdleAnswer { token, result } => self.on_idle_answer(token, result),
            AllocatorInput::Adopted { instance, service, peer } => self.on_adopted(now, instance, service, peer),
        }
    }

    /// Act on every deadline at or before `now` (registry answers and starts not
    /// reported in time, unanswered idle queries, the cull round). Calling it early
    /// is harmless.
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
            self.hold_off(now, &inst.service, reason.clone());
            self.event(Event::InstanceGone { instance, service: inst.service.name, reason });
        }

        // Idle queries that were not answered in time.
        let timed_out: Vec<u64> = self.queries.iter().filter(|(_, (_, d))| *d <= now).map(|(t, _)| *t).collect();
        for token in timed_out {
            self.on_idle_answer(token, Err("idle query timed out".to_string()));
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

    /// The next output, in the order decided.
    pub fn poll_output(&mut self) -> Option<AllocatorOutput> {
        self.outputs.pop_front()
    }

    /// When to call [`Allocator::handle_timeout`] next: the earliest of the next cull
    /// round, start deadlines, idle-query deadlines and registry-answer deadlines.
    /// Always `Some` (there is always a next cull round).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let starts = self.instances.values().filter_map(|i| match i.state {
            InstanceState::Starting { deadline, .. } => Some(deadline),
            InstanceState::Certifying { .. } | InstanceState::Up { .. } => None,
        });
        let resolves = self.resolving.values().map(|p| p.deadline);
        let queries = self.queries.values().map(|(_, d)| *d);
        starts.chain(resolves).chain(queries).chain(std::iter::once(self.next_cull)).min()
    }

    /// Starting and up instances, in [`InstanceId`] order.
    pub fn instances(&self) -> impl Iterator<Item = InstanceView> + '_ {
        self.instances.iter().map(|(id, inst)| InstanceView {
            instance: *id,
            service: inst.service.name.clone(),
            peer: match &inst.state {
                InstanceState::Starting { .. } | InstanceState::Certifying { .. } => None,
                InstanceState::Up { peer, .. } => Some(peer.clone()),
            },
        })
    }

    /// What this allocator reports to a load query: instances running or starting,
    /// out of how many it may run.
    pub fn load(&self) -> crate::placement::Load {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        crate::placement::Load {
            running: clamp(self.instances.len()),
            capacity: clamp(self.config.max_instances),
            recent: 0,
        }
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
        let reuse = !self.config.defects.start_per_request;
        if let Some((&instance, inst)) = self.instances.iter_mut().find(|(_, i)| reuse && i.serves(info)) {
            match &mut inst.state {
                InstanceState::Up { peer, .. } => {
                    let peer = peer.clone();
                    self.reply(id, Response::Allocated { instance: peer });
                    // A client asking for an instance while one runs may have found it
                    // failing: ask it now rather than at the next cull round (an
                    // instance whose application does not answer is culled on the answer).
                    self.query(now, instance);
                }
                InstanceState::Starting { waiters, .. } | InstanceState::Certifying { waiters, .. } => waiters.push(id),
            }
            return;
        }
        if let Some(f) = self.failed_starts.get(&info.name).filter(|f| f.until > now && f.hash == info.hash) {
            let left = f.until.saturating_since(now).as_millis();
            let reason = format!("{} (not started again for another {left} ms)", f.reason);
            self.refuse(id, reason);
            return;
        }
        if let Err(reason) = self.check_admission(info).and_then(|()| self.check_capacity(info)) {
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

    /// Whether this allocator may run `info` at all: it can certify instances, and
    /// an `Exec` program lies inside its exec roots.
    fn check_admission(&self, info: &ServiceInfo) -> Result<(), String> {
        if self.trust.issuer.is_none() {
            return Err("this allocator holds no operator grant, so no client would trust its instances".into());
        }
        match &info.run {
            RunSpec::Exec { program, .. } => program_within(program, &self.config.exec_roots),
            RunSpec::Image { .. } => Ok(()),
        }
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

    /// The driver reports the instance up: send it its credentials first.
    fn on_started(&mut self, now: Instant, instance: InstanceId, peer: PeerAddr) {
        let Some(inst) = self.instances.get_mut(&instance) else { return };
        let InstanceState::Starting { waiters, .. } = &mut inst.state else { return };
        let waiters = std::mem::take(waiters);
        inst.state = InstanceState::Certifying { peer: peer.clone(), waiters };
        self.query(now, instance);
    }

    /// An instance of an earlier run: certifying it is its first idle query, so one
    /// that no longer answers, or refuses the credentials, is stopped.
    fn on_adopted(&mut self, now: Instant, instance: InstanceId, service: ServiceInfo, peer: PeerAddr) {
        if self.instances.contains_key(&instance) {
            return;
        }
        self.next_instance = self.next_instance.max(instance.0.wrapping_add(1));
        let state = InstanceState::Certifying { peer, waiters: Vec::new() };
        self.instances.insert(instance, Instance { service, state });
        self.query(now, instance);
    }

    /// Credentials for `instance` as `peer`, valid for the configured lifetime from `now`.
    fn credentials(&self, now: Instant, peer: &PeerAddr, info: &ServiceInfo) -> Option<Credentials> {
        self.trust.issue(now, peer.peer.clone(), info.hash.clone())
    }

    /// Send `instance` an idle query carrying fresh credentials.
    fn query(&mut self, now: Instant, instance: InstanceId) {
        let Some(inst) = self.instances.get(&instance) else { return };
        let peer = match &inst.state {
            InstanceState::Certifying { peer, .. } | InstanceState::Up { peer, query: None } => peer.clone(),
            _ => return,
        };
        let credentials = self.credentials(now, &peer, &inst.service);
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        if let Some(Instance { state: InstanceState::Up { query, .. }, .. }) = self.instances.get_mut(&instance) {
            *query = Some(token);
        }
        self.queries.insert(token, (instance, now + self.config.idle_query_timeout));
        let timeout = self.config.idle_query_timeout;
        self.outputs.push_back(AllocatorOutput::QueryIdle { token, peer, credentials, timeout });
    }

    /// The instance failed or exited: `refusal` for requests still waiting on its
    /// start, `reason` for the event.
    /// `instance` is gone; its waiters are refused with `refusal`. Returns its service
    /// when it was gone before it was up (a failed start).
    fn on_gone(&mut self, instance: InstanceId, refusal: String, reason: String) -> Option<ServiceInfo> {
        let inst = self.instances.remove(&instance)?;
        self.queries.retain(|_, (i, _)| *i != instance);
        let starting = match inst.state {
            InstanceState::Starting { waiters, .. } | InstanceState::Certifying { waiters, .. } => {
                for id in waiters {
                    self.refuse(id, refusal.clone());
                }
                true
            }
            InstanceState::Up { query, .. } => {
                if let Some(token) = query {
                    self.queries.remove(&token);
                }
                false
            }
        };
        self.event(Event::InstanceGone { instance, service: inst.service.name.clone(), reason });
        starting.then_some(inst.service)
    }

    /// A start of `service` failed with `reason`: remember it for the hold-off.
    fn hold_off(&mut self, now: Instant, service: &ServiceInfo, reason: String) {
        let holdoff = self.config.failed_start_holdoff;
        if holdoff.is_zero() {
            return;
        }
        self.failed_starts.retain(|_, f| f.until > now);
        if !self.failed_starts.contains_key(&service.name) && self.failed_starts.len() >= MAX_FAILED_STARTS {
            let first = self.failed_starts.iter().min_by_key(|(_, f)| f.until).map(|(n, _)| n.clone());
            if let Some(first) = first {
                self.failed_starts.remove(&first);
            }
        }
        let failed = FailedStart { hash: service.hash.clone(), until: now + holdoff, reason };
        self.failed_starts.insert(service.name.clone(), failed);
    }

    fn on_idle_answer(&mut self, token: u64, result: Result<u64, String>) {
        let Some((instance, _)) = self.queries.remove(&token) else { return };
        let Some(inst) = self.instances.get_mut(&instance) else { return };
        if let InstanceState::Certifying { peer, waiters } = &mut inst.state {
            let (peer, waiters) = (peer.clone(), std::mem::take(waiters));
            match result {
                Ok(_) => {
                    inst.state = InstanceState::Up { peer: peer.clone(), query: None };
                    let service = inst.service.name.clone();
                    for id in waiters {
                        self.reply(id, Response::Allocated { instance: peer.clone() });
                    }
                    self.event(Event::InstanceUp { instance, service, peer: peer.peer });
                }
                Err(e) => {
                    inst.state = InstanceState::Certifying { peer, waiters };
                    let reason = format!("the instance did not take its credentials: {e}");
                    self.outputs.push_back(AllocatorOutput::Stop { instance });
                    self.on_gone(instance, reason.clone(), reason);
                }
            }
            return;
        }
        if let InstanceState::Up { query, .. } = &mut inst.state {
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
        // An instance still answering the previous round's query is not asked twice.
        let due: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, i)| matches!(i.state, InstanceState::Up { query: None, .. }))
            .map(|(id, _)| *id)
            .collect();
        for instance in due {
            self.query(now, instance);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::Requirements;
    use crate::trust::{Grant, Issuer, Operators, SecretKey};
    use crate::types::{ContentHash, RunSpec};

    fn operator() -> SecretKey {
        SecretKey::from_bytes([1; 32])
    }

    /// A granted allocator's trust settings, its clock at unix second 1000 at zero.
    fn trust() -> TrustConfig {
        let key = SecretKey::from_bytes([7; 32]);
        let grant = Grant::sign(PeerId("alloc".into()), key.public(), &operator());
        let mut t = TrustConfig::new(Operators::new(vec![operator().public()]), 1000);
        t.issuer = Some(Issuer::allocator(key, grant).unwrap());
        t
    }

    fn info(name: &str, cpu_millis: u32, memory_mb: u32) -> ServiceInfo {
        ServiceInfo {
            name: name.to_string(),
            hash: ContentHash(format!("hash-{name}")),
            run: RunSpec::Image { image: format!("{name}:latest") },
            requirements: Requirements::default(),
            cpu_millis,
            memory_mb,
            stateful: false,
            client_mode: false,
        }
    }

    fn at(secs: u64) -> Instant {
        Instant::from_micros(secs * 1_000_000)
    }

    fn addr(name: &str) -> PeerAddr {
        PeerAddr::new(name, vec![format!("/ip4/10.0.0.1/tcp/4001/{name}")])
    }

    fn drain(a: &mut Allocator) -> Vec<AllocatorOutput> {
        std::iter::from_fn(|| a.poll_output()).collect()
    }

    fn request(a: &mut Allocator, now: Instant, id: u64, service: &str) {
        a.handle_input(
            now,
            AllocatorInput::Request { id: InboundId(id), from: PeerId("client".into()), service: service.into() },
        );
    }

    fn resolve(a: &mut Allocator, now: Instant, service: &str, result: Result<Option<ServiceInfo>, String>) {
        a.handle_input(now, AllocatorInput::Resolved { service: service.into(), result });
    }

    fn replies(outs: &[AllocatorOutput]) -> Vec<(u64, Response)> {
        outs.iter()
            .filter_map(|o| match o {
                AllocatorOutput::Reply { id, response } => Some((id.0, response.clone())),
                _ => None,
            })
            .collect()
    }

    fn starts(outs: &[AllocatorOutput]) -> Vec<InstanceId> {
        outs.iter()
            .filter_map(|o| match o {
                AllocatorOutput::Start { instance, .. } => Some(*instance),
                _ => None,
            })
            .collect()
    }

    fn stops(outs: &[AllocatorOutput]) -> Vec<InstanceId> {
        outs.iter()
            .filter_map(|o| match o {
                AllocatorOutput::Stop { instance } => Some(*instance),
                _ => None,
            })
            .collect()
    }

    fn idle_queries(outs: &[AllocatorOutput]) -> Vec<(u64, PeerAddr)> {
        outs.iter()
            .filter_map(|o| match o {
                AllocatorOutput::QueryIdle { token, peer, .. } => Some((*token, peer.clone())),
                _ => None,
            })
            .collect()
    }

    fn refused_with(outs: &[AllocatorOutput], id: u64, needle: &str) -> bool {
        replies(outs)
            .iter()
            .any(|(i, r)| *i == id && matches!(r, Response::Refused { reason } if reason.contains(needle)))
    }

    /// Request `service`, let the registry answer with `svc`, and return the Start's instance.
    fn start_one(a: &mut Allocator, now: Instant, id: u64, svc: &ServiceInfo) -> InstanceId {
        request(a, now, id, &svc.name);
        resolve(a, now, &svc.name, Ok(Some(svc.clone())));
        let outs = drain(a);
        let s = starts(&outs);
        assert_eq!(s.len(), 1, "expected one start: {outs:?}");
        s[0]
    }

    /// Start `svc` and report it up as `peer`.
    fn bring_up(a: &mut Allocator, now: Instant, id: u64, svc: &ServiceInfo, peer: &str) -> InstanceId {
        let instance = start_one(a, now, id, svc);
        started(a, now, instance, peer);
        instance
    }

    fn new_alloc(config: AllocatorConfig) -> Allocator {
        Allocator::new(config, trust(), Instant::ZERO)
    }

    /// Report `instance` up as `peer` and let it accept its credentials.
    fn started(a: &mut Allocator, now: Instant, instance: InstanceId, peer: &str) -> Vec<AllocatorOutput> {
        a.handle_input(now, AllocatorInput::InstanceStarted { instance, peer: addr(peer) });
        let outs = drain(a);
        assert!(replies(&outs).is_empty(), "no client hears of it before it holds credentials: {outs:?}");
        let q = idle_queries(&outs);
        assert_eq!(q.len(), 1, "{outs:?}");
        a.handle_input(now, AllocatorInput::IdleAnswer { token: q[0].0, result: Ok(0) });
        drain(a)
    }

    #[test]
    fn request_asks_the_registry_and_never_starts_what_the_peer_names() {
        let mut a = new_alloc(AllocatorConfig::default());
        request(&mut a, at(0), 1, "evil; rm -rf /");
        assert_eq!(drain(&mut a), vec![AllocatorOutput::Resolve { service: "evil; rm -rf /".into() }]);
    }

    #[test]
    fn unknown_service_is_refused() {
        let mut a = new_alloc(AllocatorConfig::default());
        request(&mut a, at(0), 1, "nope");
        drain(&mut a);
        resolve(&mut a, at(0), "nope", Ok(None));
        let outs = drain(&mut a);
        assert_eq!(replies(&outs).len(), 1);
        assert!(refused_with(&outs, 1, "unknown to the registry"), "{outs:?}");
        assert!(starts(&outs).is_empty());
        assert_eq!(a.instances().count(), 0);
        assert_eq!(a.pending_requests(), 0);
    }

    #[test]
    fn registry_error_is_refused() {
        let mut a = new_alloc(AllocatorConfig::default());
        request(&mut a, at(0), 1, "web");
        request(&mut a, at(0), 2, "web");
        drain(&mut a);
        resolve(&mut a, at(0), "web", Err("connection reset".into()));
        let outs = drain(&mut a);
        assert!(refused_with(&outs, 1, "registry unavailable: connection reset"), "{outs:?}");
        assert!(refused_with(&outs, 2, "registry unavailable: connection reset"), "{outs:?}");
        assert!(starts(&outs).is_empty());
    }

    #[test]
    fn admitted_start_answers_allocated_with_the_started_peer() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        request(&mut a, at(0), 7, "web");
        resolve(&mut a, at(0), "web", Ok(Some(svc.clone())));
        let outs = drain(&mut a);
        let instance = InstanceId(1);
        assert_eq!(
            outs,
            vec![
                AllocatorOutput::Resolve { service: "web".into() },
                AllocatorOutput::Event(Event::InstanceStarting { instance, service: "web".into() }),
                AllocatorOutput::Start { instance, service: svc },
            ]
        );
        assert_eq!(
            a.instances().collect::<Vec<_>>(),
            vec![InstanceView { instance, service: "web".into(), peer: None }]
        );
        let outs = started(&mut a, at(2), instance, "inst-1");
        assert_eq!(
            outs,
            vec![
                AllocatorOutput::Reply { id: InboundId(7), response: Response::Allocated { instance: addr("inst-1") } },
                AllocatorOutput::Event(Event::InstanceUp {
                    instance,
                    service: "web".into(),
                    peer: PeerId("inst-1".into())
                }),
            ]
        );
        assert_eq!(a.instances().next().and_then(|v| v.peer), Some(addr("inst-1")));
    }

    #[test]
    fn concurrent_requests_share_one_resolve_and_one_start() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        for id in 1..=3 {
            request(&mut a, at(0), id, "web");
        }
        resolve(&mut a, at(0), "web", Ok(Some(svc.clone())));
        // Two more arrive while the instance boots.
        request(&mut a, at(1), 4, "web");
        request(&mut a, at(1), 5, "web");
        resolve(&mut a, at(1), "web", Ok(Some(svc.clone())));
        let outs = drain(&mut a);
        let resolves = outs.iter().filter(|o| matches!(o, AllocatorOutput::Resolve { .. })).count();
        assert_eq!(resolves, 2, "one Resolve per batch: {outs:?}");
        let s = starts(&outs);
        assert_eq!(s.len(), 1, "{outs:?}");
        assert!(replies(&outs).is_empty());
        let outs = started(&mut a, at(3), s[0], "inst");
        let r = replies(&outs);
        assert_eq!(r.len(), 5);
        for (i, (id, resp)) in r.iter().enumerate() {
            assert_eq!(*id, i as u64 + 1);
            assert_eq!(*resp, Response::Allocated { instance: addr("inst") });
        }
        assert_eq!(a.pending_requests(), 0);
    }

    #[test]
    fn already_up_instance_is_reused_without_start() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        bring_up(&mut a, at(0), 1, &svc, "inst");
        request(&mut a, at(5), 2, "web");
        resolve(&mut a, at(5), "web", Ok(Some(svc)));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty(), "{outs:?}");
        assert_eq!(replies(&outs), vec![(2, Response::Allocated { instance: addr("inst") })]);
        assert_eq!(a.instances().count(), 1);
    }

    #[test]
    fn reusing_a_running_instance_asks_it_at_once_and_culls_it_if_its_application_is_down() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        let instance = bring_up(&mut a, at(0), 1, &svc, "inst");
        drain(&mut a);
        request(&mut a, at(5), 2, "web");
        resolve(&mut a, at(5), "web", Ok(Some(svc)));
        let outs = drain(&mut a);
        let queries = idle_queries(&outs);
        assert_eq!(queries.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), vec![addr("inst")], "{outs:?}");
        let reason = "the application of 'web' does not answer".to_string();
        a.handle_input(at(5), AllocatorInput::IdleAnswer { token: queries[0].0, result: Err(reason) });
        let outs = drain(&mut a);
        assert_eq!(stops(&outs), vec![instance], "{outs:?}");
        assert_eq!(a.instances().count(), 0);
    }

    #[test]
    fn a_new_image_of_the_same_service_gets_its_own_instance() {
        let mut a = new_alloc(AllocatorConfig::default());
        let old = info("web", 500, 256);
        bring_up(&mut a, at(0), 1, &old, "old");
        let mut new = old.clone();
        new.hash = ContentHash("hash-web-v2".into());
        request(&mut a, at(5), 2, "web");
        resolve(&mut a, at(5), "web", Ok(Some(new)));
        let outs = drain(&mut a);
        assert_eq!(starts(&outs).len(), 1, "{outs:?}");
        assert!(replies(&outs).is_empty());
    }

    #[test]
    fn capacity_by_count() {
        let mut a = new_alloc(AllocatorConfig { max_instances: 2, ..AllocatorConfig::default() });
        bring_up(&mut a, at(0), 1, &info("a", 1, 1), "pa");
        start_one(&mut a, at(0), 2, &info("b", 1, 1)); // starting counts too
        request(&mut a, at(1), 3, "c");
        resolve(&mut a, at(1), "c", Ok(Some(info("c", 1, 1))));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty());
        assert!(refused_with(&outs, 3, "instances"), "{outs:?}");
    }

    #[test]
    fn capacity_by_cpu() {
        let mut a = new_alloc(AllocatorConfig { cpu_millis: 1000, ..AllocatorConfig::default() });
        bring_up(&mut a, at(0), 1, &info("a", 600, 1), "pa");
        request(&mut a, at(1), 2, "b");
        resolve(&mut a, at(1), "b", Ok(Some(info("b", 401, 1))));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty());
        assert!(refused_with(&outs, 2, "CPU"), "{outs:?}");
        // Exactly filling the machine is fine.
        start_one(&mut a, at(1), 3, &info("c", 400, 1));
    }

    #[test]
    fn capacity_by_memory() {
        let mut a = new_alloc(AllocatorConfig { memory_mb: 1024, ..AllocatorConfig::default() });
        start_one(&mut a, at(0), 1, &info("a", 1, 1000));
        request(&mut a, at(1), 2, "b");
        resolve(&mut a, at(1), "b", Ok(Some(info("b", 1, 25))));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty());
        assert!(refused_with(&outs, 2, "memory"), "{outs:?}");
        start_one(&mut a, at(1), 3, &info("c", 1, 24));
    }

    #[test]
    fn a_service_larger_than_the_machine_is_refused() {
        let mut a = new_alloc(AllocatorConfig { cpu_millis: 1000, ..AllocatorConfig::default() });
        request(&mut a, at(0), 1, "big");
        resolve(&mut a, at(0), "big", Ok(Some(info("big", u32::MAX, u32::MAX))));
        let outs = drain(&mut a);
        assert!(refused_with(&outs, 1, "CPU"), "{outs:?}");
    }

    #[test]
    fn start_failure_refuses_all_waiters() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        let instance = start_one(&mut a, at(0), 1, &svc);
        request(&mut a, at(1), 2, "web");
        resolve(&mut a, at(1), "web", Ok(Some(svc)));
        drain(&mut a);
        a.handle_input(at(2), AllocatorInput::InstanceFailed { instance, reason: "image not found".into() });
        let outs = drain(&mut a);
        assert_eq!(replies(&outs).len(), 2);
        assert!(refused_with(&outs, 1, "image not found"), "{outs:?}");
        assert!(refused_with(&outs, 2, "image not found"), "{outs:?}");
        assert!(outs.iter().any(|o| matches!(o, AllocatorOutput::Event(Event::InstanceGone { .. }))));
        assert_eq!(a.instances().count(), 0);
        // A late success for the forgotten instance is ignored.
        a.handle_input(at(3), AllocatorInput::InstanceStarted { instance, peer: addr("late") });
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn a_failed_start_is_not_tried_again_within_the_holdoff() {
        let config = AllocatorConfig { failed_start_holdoff: Duration::from_secs(2), ..AllocatorConfig::default() };
        let mut a = new_alloc(config);
        let svc = info("web", 500, 256);
        let instance = start_one(&mut a, at(0), 1, &svc);
        a.handle_input(at(1), AllocatorInput::InstanceFailed { instance, reason: "exited with status 3".into() });
        drain(&mut a);
        // A copy of the request, or another client, within the hold-off: the same
        // failure at once, and no second start.
        request(&mut a, at(2), 2, "web");
        resolve(&mut a, at(2), "web", Ok(Some(svc.clone())));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty(), "{outs:?}");
        assert!(refused_with(&outs, 2, "exited with status 3"), "{outs:?}");
        // Another service, or the same name with another hash, is not held off.
        start_one(&mut a, at(2), 3, &info("api", 500, 256));
        let mut changed = svc.clone();
        changed.hash = ContentHash("web-v2".into());
        start_one(&mut a, at(2), 4, &changed);
        // After the hold-off the service is started again.
        let mut a =
            new_alloc(AllocatorConfig { failed_start_holdoff: Duration::from_secs(2), ..AllocatorConfig::default() });
        let instance = start_one(&mut a, at(0), 1, &svc);
        a.handle_input(at(1), AllocatorInput::InstanceFailed { instance, reason: "boom".into() });
        drain(&mut a);
        start_one(&mut a, at(3), 2, &svc);
    }

    #[test]
    fn start_timeout_stops_and_refuses_all_waiters() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 500, 256);
        let instance = start_one(&mut a, at(0), 1, &svc);
        request(&mut a, at(10), 2, "web");
        resolve(&mut a, at(10), "web", Ok(Some(svc)));
        drain(&mut a);
        assert_eq!(a.poll_timeout(), Some(at(30)));
        a.handle_timeout(at(29));
        assert!(drain(&mut a).is_empty());
        a.handle_timeout(at(30));
        let outs = drain(&mut a);
        assert_eq!(stops(&outs), vec![instance]);
        assert!(refused_with(&outs, 1, "did not start"), "{outs:?}");
        assert!(refused_with(&outs, 2, "did not start"), "{outs:?}");
        assert_eq!(a.instances().count(), 0);
        assert_eq!(a.poll_timeout(), Some(at(60)));
    }

    #[test]
    fn exit_while_starting_refuses_waiters() {
        let mut a = new_alloc(AllocatorConfig::default());
        let instance = start_one(&mut a, at(0), 1, &info("web", 1, 1));
        a.handle_input(at(1), AllocatorInput::InstanceExited { instance });
        let outs = drain(&mut a);
        assert!(refused_with(&outs, 1, "exited"), "{outs:?}");
    }

    #[test]
    fn instance_exited_frees_capacity() {
        let mut a = new_alloc(AllocatorConfig { max_instances: 1, ..AllocatorConfig::default() });
        let instance = bring_up(&mut a, at(0), 1, &info("a", 1, 1), "pa");
        request(&mut a, at(1), 2, "b");
        resolve(&mut a, at(1), "b", Ok(Some(info("b", 1, 1))));
        assert!(refused_with(&drain(&mut a), 2, "instances"));
        a.handle_input(at(2), AllocatorInput::InstanceExited { instance });
        let outs = drain(&mut a);
        assert!(outs
            .iter()
            .any(|o| matches!(o, AllocatorOutput::Event(Event::InstanceGone { instance: i, .. }) if *i == instance)));
        assert_eq!(a.instances().count(), 0);
        start_one(&mut a, at(3), 3, &info("b", 1, 1));
    }

    #[test]
    fn first_cull_is_one_interval_after_start() {
        let mut a = Allocator::new(AllocatorConfig::default(), trust(), at(100));
        assert_eq!(a.poll_timeout(), Some(at(160)));
        bring_up(&mut a, at(100), 1, &info("web", 1, 1), "inst");
        a.handle_timeout(at(159));
        assert!(drain(&mut a).is_empty());
        a.handle_timeout(at(160));
        let q = idle_queries(&drain(&mut a));
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].1, addr("inst"));
        // The query's own timeout is now the earliest deadline; the next round follows at 220 s.
        assert_eq!(a.poll_timeout(), Some(at(165)));
        a.handle_input(at(161), AllocatorInput::IdleAnswer { token: q[0].0, result: Ok(1) });
        assert_eq!(a.poll_timeout(), Some(at(220)));
    }

    /// Bring one instance up, run a cull round and answer its idle query with `result`.
    /// Adopt instance 7 of `svc` running as `peer`; returns the certifying query's outputs.
    fn adopt(a: &mut Allocator, now: Instant, svc: &ServiceInfo, peer: &str) -> Vec<AllocatorOutput> {
        let adopted = AllocatorInput::Adopted { instance: InstanceId(7), service: svc.clone(), peer: addr(peer) };
        a.handle_input(now, adopted);
        drain(a)
    }

    #[test]
    fn an_adopted_instance_is_certified_then_served_culled_and_counted() {
        let mut a = new_alloc(AllocatorConfig { max_instances: 2, ..AllocatorConfig::default() });
        let svc = info("web", 1, 1);
        let outs = adopt(&mut a, at(0), &svc, "old");
        let creds: Vec<_> = outs
            .iter()
            .filter_map(|o| match o {
                AllocatorOutput::QueryIdle { peer, credentials, .. } => Some((peer.clone(), credentials.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(creds.len(), 1, "{outs:?}");
        let (peer, credentials) = &creds[0];
        assert_eq!(peer, &addr("old"));
        let credentials = credentials.clone().expect("fresh credentials for the adopted instance");
        assert_eq!(credentials.cert.instance, PeerId("old".into()));
        let token = idle_queries(&outs)[0].0;
        a.handle_input(at(0), AllocatorInput::IdleAnswer { token, result: Ok(0) });
        drain(&mut a);

        // Served without a start; a new instance gets a number past the adopted one.
        request(&mut a, at(1), 1, "web");
        resolve(&mut a, at(1), "web", Ok(Some(svc.clone())));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty(), "{outs:?}");
        assert_eq!(replies(&outs), vec![(1, Response::Allocated { instance: addr("old") })]);
        let reuse_check = idle_queries(&outs);
        assert_eq!(reuse_check.len(), 1, "{outs:?}");
        a.handle_input(at(1), AllocatorInput::IdleAnswer { token: reuse_check[0].0, result: Ok(0) });
        assert_eq!(start_one(&mut a, at(2), 2, &info("other", 1, 1)), InstanceId(8));
        // It takes one of the two places.
        request(&mut a, at(3), 3, "third");
        resolve(&mut a, at(3), "third", Ok(Some(info("third", 1, 1))));
        assert!(refused_with(&drain(&mut a), 3, "instances"));

        // Idle past the limit at the cull round: stopped like any other.
        a.handle_timeout(at(60));
        let q: Vec<_> = idle_queries(&drain(&mut a)).into_iter().filter(|(_, p)| p == &addr("old")).collect();
        assert_eq!(q.len(), 1);
        a.handle_input(at(61), AllocatorInput::IdleAnswer { token: q[0].0, result: Ok(3600) });
        assert_eq!(stops(&drain(&mut a)), vec![InstanceId(7)]);
    }

    #[test]
    fn an_adopted_instance_that_does_not_answer_is_stopped() {
        let mut a = new_alloc(AllocatorConfig::default());
        let outs = adopt(&mut a, at(0), &info("web", 1, 1), "old");
        let token = idle_queries(&outs)[0].0;
        a.handle_input(at(1), AllocatorInput::IdleAnswer { token, result: Err("connection refused".into()) });
        assert_eq!(stops(&drain(&mut a)), vec![InstanceId(7)]);
        assert_eq!(a.instances().count(), 0);
        // Adopting a number already tracked changes nothing.
        let svc = info("web", 1, 1);
        let first = start_one(&mut a, at(2), 1, &svc);
        let again = AllocatorInput::Adopted { instance: first, service: svc, peer: addr("x") };
        a.handle_input(at(2), again);
        assert!(drain(&mut a).is_empty());
    }

    fn cull_with(result: Option<Result<u64, String>>) -> (Vec<AllocatorOutput>, InstanceId, Allocator) {
        let mut a = new_alloc(AllocatorConfig::default());
        let instance = bring_up(&mut a, at(0), 1, &info("web", 1, 1), "inst");
        a.handle_timeout(at(60));
        let q = idle_queries(&drain(&mut a));
        assert_eq!(q.len(), 1);
        match result {
            Some(result) => a.handle_input(at(61), AllocatorInput::IdleAnswer { token: q[0].0, result }),
            None => a.handle_timeout(at(65)),
        }
        (drain(&mut a), instance, a)
    }

    fn culled(outs: &[AllocatorOutput], instance: InstanceId, needle: &str) -> bool {
        stops(outs) == vec![instance]
            && outs.iter().any(|o| {
                matches!(o, AllocatorOutput::Event(Event::InstanceCulled { instance: i, reason, .. })
                    if *i == instance && reason.contains(needle))
            })
    }

    #[test]
    fn culling_stops_an_instance_idle_over_the_limit() {
        let (outs, instance, a) = cull_with(Some(Ok(61)));
        assert!(culled(&outs, instance, "idle for 61s"), "{outs:?}");
        assert_eq!(a.instances().count(), 0);
    }

    #[test]
    fn culling_keeps_an_instance_idle_up_to_the_limit() {
        let (outs, _, mut a) = cull_with(Some(Ok(60)));
        assert!(outs.is_empty(), "{outs:?}");
        assert_eq!(a.instances().count(), 1);
        // It is asked again the next round.
        a.handle_timeout(at(120));
        assert_eq!(idle_queries(&drain(&mut a)).len(), 1);
    }

    #[test]
    fn culling_stops_an_instance_whose_idle_query_failed() {
        let (outs, instance, _) = cull_with(Some(Err("connection refused".into())));
        assert!(culled(&outs, instance, "connection refused"), "{outs:?}");
    }

    #[test]
    fn culling_stops_an_instance_that_answered_garbage() {
        let (outs, instance, _) = cull_with(Some(Err("malformed answer: \"abc\"".into())));
        assert!(culled(&outs, instance, "malformed"), "{outs:?}");
    }

    #[test]
    fn culling_stops_an_instance_whose_idle_query_timed_out() {
        let (outs, instance, mut a) = cull_with(None);
        assert!(culled(&outs, instance, "idle query timed out"), "{outs:?}");
        assert_eq!(a.instances().count(), 0);
        // The late answer is ignored.
        a.handle_input(at(66), AllocatorInput::IdleAnswer { token: 1, result: Ok(0) });
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn culled_instance_frees_its_slot_for_a_new_start() {
        let (_, _, mut a) = cull_with(Some(Ok(1000)));
        start_one(&mut a, at(62), 2, &info("web", 1, 1));
    }

    #[test]
    fn unknown_inputs_are_ignored() {
        let mut a = new_alloc(AllocatorConfig::default());
        resolve(&mut a, at(0), "never-asked", Ok(Some(info("x", 1, 1))));
        a.handle_input(at(0), AllocatorInput::InstanceStarted { instance: InstanceId(42), peer: addr("x") });
        a.handle_input(at(0), AllocatorInput::InstanceFailed { instance: InstanceId(42), reason: "x".into() });
        a.handle_input(at(0), AllocatorInput::InstanceExited { instance: InstanceId(42) });
        a.handle_input(at(0), AllocatorInput::IdleAnswer { token: 42, result: Ok(u64::MAX) });
        assert!(drain(&mut a).is_empty());
        assert_eq!(a.instances().count(), 0);
    }

    #[test]
    fn a_registry_that_never_answers_still_gets_the_request_refused() {
        let mut a = new_alloc(AllocatorConfig::default());
        request(&mut a, at(0), 1, "web");
        drain(&mut a);
        assert_eq!(a.poll_timeout(), Some(at(30)));
        a.handle_timeout(at(30));
        let outs = drain(&mut a);
        assert!(refused_with(&outs, 1, "registry unavailable"), "{outs:?}");
        // Its answer, late, is ignored.
        resolve(&mut a, at(31), "web", Ok(Some(info("web", 1, 1))));
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn a_repeated_request_id_is_answered_once() {
        let mut a = new_alloc(AllocatorConfig::default());
        request(&mut a, at(0), 1, "web");
        request(&mut a, at(0), 1, "web");
        resolve(&mut a, at(0), "web", Ok(None));
        assert_eq!(replies(&drain(&mut a)).len(), 1);
    }

    #[test]
    fn zero_cull_interval_does_not_spin() {
        let mut a = Allocator::new(
            AllocatorConfig { cull_interval: Duration::ZERO, ..AllocatorConfig::default() },
            trust(),
            at(0),
        );
        let first = a.poll_timeout().expect("a cull deadline");
        assert!(first > at(0));
        a.handle_timeout(first);
        assert!(a.poll_timeout().expect("a cull deadline") > first);
    }

    #[test]
    fn instances_get_credentials_for_their_own_peer_and_service_and_renewals_each_round() {
        let mut a = new_alloc(AllocatorConfig::default());
        let svc = info("web", 1, 1);
        let instance = start_one(&mut a, at(0), 1, &svc);
        a.handle_input(at(2), AllocatorInput::InstanceStarted { instance, peer: addr("inst") });
        let outs = drain(&mut a);
        let [AllocatorOutput::QueryIdle { credentials: Some(c), .. }] = &outs[..] else { panic!("{outs:?}") };
        let ops = Operators::new(vec![operator().public()]);
        let (me, hash) = (PeerId("inst".into()), svc.hash.clone());
        assert_eq!(ops.verify_credentials(c, &me, &hash, 1002), Ok(()));
        assert_eq!(c.cert.not_after, 1002 + 600);
        // The cull round renews them from its own time.
        a.handle_input(at(2), AllocatorInput::IdleAnswer { token: idle_queries(&outs)[0].0, result: Ok(0) });
        drain(&mut a);
        a.handle_timeout(at(60));
        let outs = drain(&mut a);
        let [AllocatorOutput::QueryIdle { credentials: Some(renewed), .. }] = &outs[..] else { panic!("{outs:?}") };
        assert_eq!(renewed.cert.not_after, 1060 + 600);
    }

    #[test]
    fn an_instance_that_refuses_its_credentials_is_stopped_and_its_waiters_refused() {
        let mut a = new_alloc(AllocatorConfig::default());
        let instance = start_one(&mut a, at(0), 1, &info("web", 1, 1));
        a.handle_input(at(1), AllocatorInput::InstanceStarted { instance, peer: addr("inst") });
        let q = idle_queries(&drain(&mut a));
        a.handle_input(at(1), AllocatorInput::IdleAnswer { token: q[0].0, result: Err("bad certificate".into()) });
        let outs = drain(&mut a);
        assert_eq!(stops(&outs), vec![instance]);
        assert!(refused_with(&outs, 1, "did not take its credentials: bad certificate"), "{outs:?}");
        assert_eq!(a.instances().count(), 0);
        // No answer at all within the query timeout ends the same way.
        let instance = start_one(&mut a, at(2), 2, &info("web", 1, 1));
        a.handle_input(at(2), AllocatorInput::InstanceStarted { instance, peer: addr("inst") });
        drain(&mut a);
        a.handle_timeout(at(7));
        let outs = drain(&mut a);
        assert_eq!(stops(&outs), vec![instance]);
        assert!(refused_with(&outs, 2, "timed out"), "{outs:?}");
    }

    #[test]
    fn programs_outside_the_exec_roots_and_allocators_without_a_grant_start_nothing() {
        let exec = |program: &str| ServiceInfo {
            run: RunSpec::Exec { program: program.into(), args: vec![], env: vec![] },
            ..info("sh", 1, 1)
        };
        let config = AllocatorConfig { exec_roots: vec!["/opt/svc".into()], ..AllocatorConfig::default() };
        let mut a = new_alloc(config.clone());
        request(&mut a, at(0), 1, "sh");
        resolve(&mut a, at(0), "sh", Ok(Some(exec("/bin/sh"))));
        let outs = drain(&mut a);
        assert!(starts(&outs).is_empty());
        assert!(refused_with(&outs, 1, "outside this allocator's exec roots"), "{outs:?}");
        start_one(&mut a, at(0), 2, &exec("/opt/svc/hello"));

        let mut ungranted = Allocator::new(config, TrustConfig::new(Operators::default(), 0), at(0));
        request(&mut ungranted, at(0), 1, "web");
        resolve(&mut ungranted, at(0), "web", Ok(Some(info("web", 1, 1))));
        let outs = drain(&mut ungranted);
        assert!(starts(&outs).is_empty());
        assert!(refused_with(&outs, 1, "holds no operator grant"), "{outs:?}");
    }
}
