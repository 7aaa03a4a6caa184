//! The composite machine runtimes drive: the manager (with its peer cache and
//! service mode), the registry cache and the registry client that feeds it, and
//! optionally the allocator and registry roles. It owns the table of outstanding
//! operations and enforces each one's timeout itself, so a runtime that never
//! answers cannot leave a request hanging.
//!
//! Trust (see [`crate::trust`]): registry answers are verified here against the
//! operator keys before anything uses them, and a name's entry may not go back to
//! an older version than one seen before; a sidecar takes credentials only when
//! they certify itself, and an operator-run sidecar certifies itself.

use crate::allocator::{Allocator, AllocatorInput, AllocatorOutput};
use crate::config::NodeConfig;
use crate::io::{Event, Input, OpResult, Output};
use crate::manager::{Manager, ManagerOutput};
use crate::registry::Registry;
use crate::registry_cache::{RegistryCache, RegistryCacheOutput, Resolution};
use crate::time::{earliest, Instant};
use crate::trust::{SignedEntry, TrustConfig};
use crate::types::{DhtKey, InboundId, OpId, PeerAddr, PeerId, ServiceInfo};
use crate::wire::{Request, Response};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Who asked for an operation, and so who gets its result.
#[derive(Clone, Debug)]
enum Owner {
    Manager(u64),
    AllocatorIdle(u64),
    RegistryFind,
    RegistryGet { name: String, peer: PeerId },
}

/// A registry peer that failed a query is not asked again for this long, even when
/// the DHT still lists it (its provider record outlives it).
const REGISTRY_SKIP: Duration = Duration::from_secs(30);
/// Most registry peers remembered as failed.
const MAX_SKIPPED_REGISTRIES: usize = 64;

/// Names whose highest entry version is remembered (against rollback by a rogue
/// registry); past this, new names are not tracked.
const MAX_TRACKED_VERSIONS: usize = 4096;

#[derive(Clone, Debug)]
struct PendingOp {
    owner: Owner,
    deadline: Instant,
    /// Set for probes, to report them as events.
    probed: Option<PeerId>,
}

/// One physarum node: manager (+ service mode), and optionally allocator and registry.
///
/// Drive it like quinn-proto: feed `handle_input(now, ..)`, drain `poll_output()`
/// until `None`, then sleep until `poll_timeout()` and feed `Input::Tick`.
pub struct Node {
    local: PeerId,
    manager: Manager,
    registry_cache: RegistryCache,
    allocator: Option<Allocator>,
    registry: Option<Registry>,
    /// Registry instances found in the DHT, tried in order.
    registry_peers: Vec<PeerAddr>,
    /// Registry peers that failed us, and until when they are skipped.
    registry_skipped: BTreeMap<PeerId, Instant>,
    /// Names waiting for a registry peer to be found.
    awaiting_registry: BTreeSet<String>,
    registry_find_in_flight: bool,
    ops: BTreeMap<OpId, PendingOp>,
    /// The operations' deadlines in time order: the next one is the first, and
    /// expiry takes them from the front (no scan of `ops` per input).
    op_deadlines: BTreeSet<(Instant, OpId)>,
    next_op: u64,
    /// Rendezvous keys of this node's roles, re-advertised periodically.
    role_keys: Vec<DhtKey>,
    next_role_advertise: Instant,
    advertise_interval: Duration,
    registry_timeout: Duration,
    trust: TrustConfig,
    /// The configured default requirements (conf.json's `Perf`).
    defaults: crate::perf::Requirements,
    /// The highest verified entry version seen per name.
    entry_versions: BTreeMap<String, u64>,
    /// Operator-run sidecar: when to certify ourselves again (`None` until the served
    /// service's hash is known).
    next_self_certify: Option<Instant>,
    rng: ChaCha8Rng,
    out: VecDeque<Output>,
}

impl Node {
    /// `rng_seed` seeds the node's only source of randomness (a ChaCha RNG).
    pub fn new(config: NodeConfig, rng_seed: u64, now: Instant) -> Self {
        let manager = Manager::new(
            config.manager.clone(),
            config.peer_cache.clone(),
            config.defaults,
            config.local.clone(),
            config.serve.clone(),
            now,
        );
        let mut role_keys = Vec::new();
        if config.allocator.is_some() {
            role_keys.push(DhtKey::Allocators);
        }
        if config.registry.is_some() {
            role_keys.push(DhtKey::Registry);
        }
        let mut node = Node {
            local: config.local,
            manager,
            registry_cache: RegistryCache::new(config.registry_cache),
            allocator: config.allocator.map(|c| Allocator::new(c, config.trust.clone(), now)),
            registry: config.registry.map(|entries| Registry::new(config.trust.operators.clone(), entries)),
            registry_peers: Vec::new(),
            registry_skipped: BTreeMap::new(),
            awaiting_registry: BTreeSet::new(),
            registry_find_in_flight: false,
            ops: BTreeMap::new(),
            op_deadlines: BTreeSet::new(),
            next_op: 0,
            role_keys,
            next_role_advertise: now,
            advertise_interval: config.manager.advertise_interval,
            registry_timeout: config.manager.registry_timeout,
            trust: config.trust,
            defaults: config.defaults,
            entry_versions: BTreeMap::new(),
            next_self_certify: None,
            rng: ChaCha8Rng::seed_from_u64(rng_seed),
            out: VecDeque::new(),
        };
        node.on_time(now);
        node.pump(now);
        node
    }

    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.on_time(now);
        match input {
            Input::Tick => {}
            Input::HttpRequest { req, service, deadline } => {
                let resolution = self.registry_cache.lookup(now, &service);
                self.manager.http_request(now, req, service, deadline, resolution, false);
            }
            Input::RouteFailed { service, peer, reason } => self.manager.route_failed(now, &service, &peer, &reason),
            Input::Untrusted { service, peer, reason } => self.manager.untrusted(now, &service, &peer, &reason),
            Input::TunnelServed => self.manager.tunnel_served(now),
            Input::TunnelDone => self.manager.tunnel_done(now),
            Input::AppChecked { answered } => self.manager.app_checked(answered),
            Input::HttpRetry { req, service, deadline } => {
                let resolution = self.registry_cache.lookup(now, &service);
                self.manager.http_request(now, req, service, deadline, resolution, true);
            }
            Input::PeerRequest { id, from, request } => self.peer_request(now, id, from, request),
            Input::OpDone { op, result } => {
                if let Some(pending) = self.ops.remove(&op) {
                    self.op_deadlines.remove(&(pending.deadline, op));
                    self.op_done(now, pending, result);
                }
            }
            Input::BootstrapConnected => {
                self.next_role_advertise = now;
                self.manager.bootstrap_connected(now);
                self.on_time(now);
            }
            Input::InstanceStarted { instance, peer } => {
                self.allocator_input(now, AllocatorInput::InstanceStarted { instance, peer })
            }
            Input::InstanceFailed { instance, reason } => {
                self.allocator_input(now, AllocatorInput::InstanceFailed { instance, reason })
            }
            Input::InstanceExited { instance } => {
                self.allocator_input(now, AllocatorInput::InstanceExited { instance })
            }
            Input::InstanceAdopted { instance, service, peer } => {
                self.allocator_input(now, AllocatorInput::Adopted { instance, service, peer })
            }
        }
        self.pump(now);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.op_deadlines.first().map(|(at, _)| *at);
        t = earliest(t, self.manager.poll_timeout());
        t = earliest(t, self.registry_cache.poll_timeout());
        t = earliest(t, self.allocator.as_ref().and_then(|a| a.poll_timeout()));
        if !self.role_keys.is_empty() {
            t = earliest(t, Some(self.next_role_advertise));
        }
        earliest(t, self.next_self_certify)
    }

    /// The hard RTT limit clients hold `service`'s instances to: its cached registry
    /// entry's, else the configured default (`None` when neither sets one).
    pub fn hard_limit(&self, service: &str) -> Option<Duration> {
        let own = self.registry_cache.peek(service).map(|info| info.requirements.hard).unwrap_or_default();
        own.or(self.defaults.hard).rtt
    }

    /// The trust settings (operators, clock alignment) the runtime verifies tunnels with.
    pub fn trust(&self) -> &TrustConfig {
        &self.trust
    }

    /// The manager, for inspection (tests, metrics).
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The allocator role, for inspection.
    pub fn allocator(&self) -> Option<&Allocator> {
        self.allocator.as_ref()
    }

    // ---- time ------------------------------------------------------------

    /// Run every timer that is due: operation timeouts first, then the machines'.
    fn on_time(&mut self, now: Instant) {
        while let Some(&(at, op)) = self.op_deadlines.first() {
            if at > now {
                break;
            }
            self.op_deadlines.pop_first();
            if let Some(pending) = self.ops.remove(&op) {
                self.op_done(now, pending, OpResult::Failed("timed out".into()));
            }
        }
        if self.manager.poll_timeout().is_some_and(|t| t <= now) {
            self.manager.handle_timeout(now);
        }
        if self.registry_cache.poll_timeout().is_some_and(|t| t <= now) {
            self.registry_cache.handle_timeout(now);
        }
        if let Some(a) = self.allocator.as_mut() {
            if a.poll_timeout().is_some_and(|t| t <= now) {
                a.handle_timeout(now);
            }
        }
        if !self.role_keys.is_empty() && now >= self.next_role_advertise {
            for key in self.role_keys.clone() {
                self.out.push_back(Output::Advertise { key });
            }
            // Jitter by ±10% so that nodes started together do not re-advertise in lockstep.
            let interval = self.advertise_interval.as_micros() as u64;
            let jitter = interval / 5;
            let offset = if jitter > 0 { self.rng.next_u64() % jitter } else { 0 };
            self.next_role_advertise = now + Duration::from_micros(interval - jitter / 2 + offset);
        }
        if self.next_self_certify.is_some_and(|t| t <= now) {
            self.self_certify(now);
        }
    }

    /// An operator-run sidecar (an issuer, no allocator role) signs its own
    /// credentials once its service's hash is known, and renews them at half-life.
    fn self_certify(&mut self, now: Instant) {
        if self.allocator.is_some() {
            return;
        }
        let Some(hash) = self.manager.served_hash().cloned() else { return };
        let Some(credentials) = self.trust.issue(now, self.local.clone(), hash) else { return };
        self.out.push_back(Output::ServeCredentials { credentials });
        self.next_self_certify = Some(now + (self.trust.cert_lifetime / 2).max(Duration::from_secs(1)));
    }

    // ---- operations ------------------------------------------------------

    fn start_op(&mut self, now: Instant, owner: Owner, timeout: Duration, probed: Option<PeerId>) -> OpId {
        self.next_op += 1;
        let op = OpId(self.next_op);
        let deadline = now + timeout;
        self.ops.insert(op, PendingOp { owner, deadline, probed });
        self.op_deadlines.insert((deadline, op));
        op
    }

    fn op_done(&mut self, now: Instant, pending: PendingOp, result: OpResult) {
        if let Some(peer) = pending.probed {
            let rtt = match &result {
                OpResult::Rtt(rtt) => Some(*rtt),
                _ => None,
            };
            self.out.push_back(Output::Event(Event::Probed { peer, rtt }));
        }
        match pending.owner {
            Owner::Manager(token) => self.manager.op_done(now, token, result),
            Owner::AllocatorIdle(token) => {
                let result = match result {
                    OpResult::Response(Response::Idle { seconds }) => Ok(seconds),
                    OpResult::Response(other) => Err(format!("unexpected answer to an idle query: {other:?}")),
                    OpResult::Failed(e) => Err(e),
                    other => Err(format!("unexpected result of an idle query: {other:?}")),
                };
                self.allocator_input(now, AllocatorInput::IdleAnswer { token, result });
            }
            Owner::RegistryFind => {
                self.registry_find_in_flight = false;
                let mut peers = match result {
                    OpResult::Providers(p) => p,
                    _ => Vec::new(),
                };
                peers.retain(|p| p.peer != self.local);
                // Registries that failed us lately go last: asked only when no other answers.
                self.registry_skipped.retain(|_, until| *until > now);
                peers.sort_by_key(|p| self.registry_skipped.contains_key(&p.peer));
                self.registry_peers = peers;
                for name in std::mem::take(&mut self.awaiting_registry) {
                    match self.registry_peers.is_empty() {
                        true => self.registry_cache.answer(now, &name, Err("no registry found in the DHT".into())),
                        false => self.ask_registry(now, name),
                    }
                }
            }
            Owner::RegistryGet { name, peer } => match self.registry_answer(&name, result) {
                Ok(info) => self.registry_cache.answer(now, &name, Ok(info)),
                Err(reason) => {
                    // This registry instance failed us: skip it and try the next one, if any.
                    self.registry_peers.retain(|p| p.peer != peer);
                    if self.registry_skipped.len() >= MAX_SKIPPED_REGISTRIES {
                        let soonest = self.registry_skipped.iter().min_by_key(|(_, t)| **t).map(|(p, _)| p.clone());
                        if let Some(p) = soonest {
                            self.registry_skipped.remove(&p);
                        }
                    }
                    self.registry_skipped.insert(peer.clone(), now + REGISTRY_SKIP);
                    if self.registry_peers.is_empty() {
                        self.registry_cache.answer(now, &name, Err(format!("registry {peer}: {reason}")));
                    } else {
                        self.ask_registry(now, name);
                    }
                }
            },
        }
    }

    // ---- registry client -------------------------------------------------

    /// What a registry's answer about `name` says, once verified: the service, or
    /// `None` when there is none. A forged, mismatched or rolled-back entry is an error.
    fn registry_answer(&mut self, name: &str, result: OpResult) -> Result<Option<ServiceInfo>, String> {
        let entry: SignedEntry = match result {
            OpResult::Response(Response::Entry { entry: None }) => return Ok(None),
            OpResult::Response(Response::Entry { entry: Some(entry) }) => *entry,
            OpResult::Failed(e) => return Err(e),
            other => return Err(format!("malformed registry answer: {other:?}")),
        };
        if entry.name != name {
            return Err(format!("asked about '{name}', it answered about '{}'", entry.name));
        }
        self.trust.operators.verify_entry(&entry).map_err(|e| format!("entry for '{name}' refused: {e}"))?;
        let seen = self.entry_versions.get(name).copied().unwrap_or(0);
        if entry.version < seen {
            return Err(format!(
                "entry for '{name}' has version {}, older than version {seen} seen before",
                entry.version
            ));
        }
        if self.entry_versions.contains_key(name) || self.entry_versions.len() < MAX_TRACKED_VERSIONS {
            self.entry_versions.insert(name.to_string(), entry.version);
        }
        Ok(entry.info)
    }

    /// Ask a registry about `name`: ourselves if we are one, else the first known
    /// registry peer, else find registry peers first.
    fn ask_registry(&mut self, now: Instant, name: String) {
        if let Some(r) = &self.registry {
            let info = r.get(&name).cloned();
            self.registry_cache.answer(now, &name, Ok(info));
            return;
        }
        match self.registry_peers.first().cloned() {
            Some(peer) => {
                let timeout = self.registry_timeout;
                let owner = Owner::RegistryGet { name: name.clone(), peer: peer.peer.clone() };
                let op = self.start_op(now, owner, timeout, None);
                let request = Request::RegistryGet { name };
                self.out.push_back(Output::SendRequest { op, peer, request, timeout });
            }
            None if self.registry_find_in_flight => {
                self.awaiting_registry.insert(name);
            }
            None => {
                self.awaiting_registry.insert(name);
                self.registry_find_in_flight = true;
                let timeout = self.registry_timeout;
                let op = self.start_op(now, Owner::RegistryFind, timeout, None);
                self.out.push_back(Output::FindProviders { op, key: DhtKey::Registry, timeout });
            }
        }
    }

    // ---- peer requests ---------------------------------------------------

    fn peer_request(&mut self, now: Instant, id: InboundId, from: PeerId, request: Request) {
        let reply = |response| Output::ReplyToPeer { id, response };
        match request {
            Request::Allocate { service } => match self.allocator.is_some() {
                true => self.allocator_input(now, AllocatorInput::Request { id, from, service }),
                false => self.out.push_back(reply(Response::Error { reason: "this node is not an allocator".into() })),
            },
            Request::RegistryGet { .. } | Request::RegistryList { .. } | Request::RegistryPut { .. } => {
                let Some(registry) = self.registry.as_mut() else {
                    self.out.push_back(reply(Response::Error { reason: "this node is not a registry".into() }));
                    return;
                };
                let name = match &request {
                    Request::RegistryPut { entry } => Some(entry.name.clone()),
                    _ => None,
                };
                let (response, changed) = registry.handle(request);
                if changed {
                    let entries = registry.entries();
                    if let Some(name) = name {
                        self.registry_cache.invalidate(&name);
                    }
                    self.out.push_back(Output::PersistRegistry { entries });
                }
                self.out.push_back(reply(response));
            }
            Request::IdleQuery { credentials } => {
                if let Some(credentials) = credentials {
                    // Only credentials that certify this very node, for what it serves.
                    let hash = self.manager.served_hash().cloned().unwrap_or_else(|| credentials.cert.service.clone());
                    let unix = self.trust.unix_secs(now);
                    if let Err(e) = self.trust.operators.verify_credentials(&credentials, &self.local, &hash, unix) {
                        let reason = format!("credentials refused: {e}");
                        self.out.push_back(reply(Response::Error { reason }));
                        return;
                    }
                    self.out.push_back(Output::ServeCredentials { credentials: *credentials });
                }
                self.out.push_back(reply(self.manager.idle_query(now)));
            }
            Request::Load => {
                let load = self.allocator.as_ref().map(|a| a.load()).or_else(|| self.manager.load(now));
                self.out.push_back(reply(match load {
                    Some(load) => Response::Load { load },
                    None => Response::Error { reason: "this node is neither an allocator nor an instance".into() },
                }));
            }
            // A transport with a data plane answers this before it reaches the core.
            Request::TunnelEndpoint => self.out.push_back(reply(Response::TunnelEndpoint { port: None })),
            Request::Ping { nonce } => match self.manager.unhealthy() {
                Some(reason) => self.out.push_back(reply(Response::Error { reason })),
                None => self.out.push_back(reply(Response::Pong { nonce })),
            },
        }
    }

    fn allocator_input(&mut self, now: Instant, input: AllocatorInput) {
        if let Some(a) = self.allocator.as_mut() {
            a.handle_input(now, input);
        }
    }

    // ---- plumbing between the machines -------------------------------------

    /// Move outputs between the machines until all are quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(o) = self.manager.poll_output() {
                progressed = true;
                self.manager_output(now, o);
            }
            while let Some(o) = self.allocator.as_mut().and_then(|a| a.poll_output()) {
                progressed = true;
                self.allocator_output(now, o);
            }
            while let Some(o) = self.registry_cache.poll_output() {
                progressed = true;
                match o {
                    RegistryCacheOutput::Query { name } => self.ask_registry(now, name),
                    RegistryCacheOutput::Resolved { name, resolution } => self.resolved(now, &name, resolution),
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// A name resolved: everyone who may be waiting for it hears.
    fn resolved(&mut self, now: Instant, name: &str, resolution: Resolution) {
        let certified = self.manager.served_hash().cloned();
        self.manager.resolved(now, name, resolution.clone());
        if self.trust.issuer.is_some() && self.manager.served_hash() != certified.as_ref() {
            self.self_certify(now);
        }
        if let Some(a) = self.allocator.as_mut() {
            let result = match resolution {
                Resolution::Found(info) => Ok(Some(info)),
                Resolution::Unknown => Ok(None),
                Resolution::Unavailable(e) => Err(e),
            };
            a.handle_input(now, AllocatorInput::Resolved { service: name.to_string(), result });
        }
    }

    fn resolve(&mut self, now: Instant, name: String) {
        if let Some(resolution) = self.registry_cache.lookup(now, &name) {
            self.resolved(now, &name, resolution);
        }
    }

    fn manager_output(&mut self, now: Instant, o: ManagerOutput) {
        match o {
            ManagerOutput::Respond { req, outcome } => self.out.push_back(Output::Respond { req, outcome }),
            ManagerOutput::Resolve { name } => self.resolve(now, name),
            ManagerOutput::Find { token, key, timeout } => {
                let op = self.start_op(now, Owner::Manager(token), timeout, None);
                self.out.push_back(Output::FindProviders { op, key, timeout });
            }
            ManagerOutput::Probe { token, peer, timeout } => {
                let op = self.start_op(now, Owner::Manager(token), timeout, Some(peer.peer.clone()));
                self.out.push_back(Output::Probe { op, peer, timeout });
            }
            ManagerOutput::Send { token, peer, request, timeout } => {
                let op = self.start_op(now, Owner::Manager(token), timeout, None);
                self.out.push_back(Output::SendRequest { op, peer, request, timeout });
            }
            ManagerOutput::Advertise { key } => self.out.push_back(Output::Advertise { key }),
            ManagerOutput::Event(e) => self.out.push_back(Output::Event(e)),
        }
    }

    fn allocator_output(&mut self, now: Instant, o: AllocatorOutput) {
        match o {
            AllocatorOutput::Resolve { service } => self.resolve(now, service),
            AllocatorOutput::Reply { id, response } => self.out.push_back(Output::ReplyToPeer { id, response }),
            AllocatorOutput::Start { instance, service } => {
                self.out.push_back(Output::StartInstance { instance, service })
            }
            AllocatorOutput::Stop { instance } => self.out.push_back(Output::StopInstance { instance }),
            AllocatorOutput::QueryIdle { token, peer, credentials, timeout } => {
                let op = self.start_op(now, Owner::AllocatorIdle(token), timeout, None);
                let request = Request::IdleQuery { credentials: credentials.map(Box::new) };
                self.out.push_back(Output::SendRequest { op, peer, request, timeout });
            }
            AllocatorOutput::Event(e) => self.out.push_back(Output::Event(e)),
        }
    }
}
