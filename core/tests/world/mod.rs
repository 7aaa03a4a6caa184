//! A scripted network for driving one `Node` in tests: DHT provider lists, per-peer
//! RTTs, a registry peer and allocators with fixed behaviour. Every output is
//! answered (or deliberately not) through a time-ordered queue, so runs are exact.
#![allow(dead_code)]

use physarum_core::config::NodeConfig;
use physarum_core::io::{Event, Input, OpResult, Outcome, Output};
use physarum_core::perf::Requirements;
use physarum_core::trust::{Grant, Issuer, Operators, SecretKey, SignedEntry};
use physarum_core::types::{ContentHash, DhtKey, PeerAddr, PeerId, ReqId, RunSpec, ServiceInfo};
use physarum_core::wire::{Request, Response};
use physarum_core::{Instant, Node};
use std::collections::BTreeMap;
use std::time::Duration;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The operator whose key every world node trusts and who signs the registry's entries.
pub fn operator() -> SecretKey {
    SecretKey::from_bytes([1; 32])
}

/// Make `config` an allocator granted by the world's operator.
pub fn grant(config: &mut NodeConfig) {
    let key = SecretKey::from_bytes([7; 32]);
    let grant = Grant::sign(config.local.clone(), key.public(), &operator());
    config.trust.operators = Operators::new(vec![operator().public()]);
    config.trust.issuer = Some(Issuer::allocator(key, grant).expect("the grant names the key"));
}

pub fn peer(name: &str) -> PeerAddr {
    PeerAddr::new(name, vec![format!("/sim/{name}")])
}

pub fn service(name: &str, soft_ms: u64, hard_ms: u64) -> ServiceInfo {
    ServiceInfo {
        name: name.into(),
        hash: ContentHash(format!("hash-{name}")),
        run: RunSpec::Exec { program: format!("/opt/{name}"), args: vec![], env: vec![] },
        requirements: Requirements::rtt(ms(soft_ms), ms(hard_ms)),
        cpu_millis: 100,
        memory_mb: 32,
        stateful: false,
        client_mode: false,
    }
}

#[derive(Clone, Debug)]
pub enum AllocatorBehaviour {
    /// Start `instance`, reachable at `rtt`; `in_dht` also lists it as a provider.
    Start {
        instance: PeerAddr,
        rtt: Duration,
        in_dht: bool,
    },
    Refuse(String),
    /// Never answers a start request.
    Silent,
}

pub struct World {
    pub now: Instant,
    pub node: Node,
    pub providers: BTreeMap<DhtKey, Vec<PeerAddr>>,
    /// RTT of each reachable peer; a peer not listed never answers.
    pub rtt: BTreeMap<PeerId, Duration>,
    /// A peer listed here is unreachable before the given time.
    pub reachable_from: BTreeMap<PeerId, Instant>,
    /// A peer listed here is unreachable from the given time on (its link is cut).
    pub cut_from: BTreeMap<PeerId, Instant>,
    /// The next this many messages (probes or requests) to a peer are lost.
    pub lose_next: BTreeMap<PeerId, u32>,
    /// The next this many start requests (to any allocator) are lost.
    pub lose_allocates: u32,
    pub registry: BTreeMap<String, ServiceInfo>,
    /// Peers that answer registry queries with entries signed by a stranger's key.
    pub rogue_registries: Vec<String>,
    pub allocators: BTreeMap<PeerId, AllocatorBehaviour>,
    queue: BTreeMap<(Instant, u64), Input>,
    seq: u64,
    next_req: u64,
    /// Every output, with the time it came out.
    pub log: Vec<(Instant, Output)>,
    pub responses: BTreeMap<ReqId, (Instant, Outcome)>,
    pub deadlines: BTreeMap<ReqId, Instant>,
    /// The service each request asked for.
    pub asked: BTreeMap<ReqId, String>,
}

pub const REGISTRY: &str = "registry";
pub const DHT_LATENCY: Duration = Duration::from_millis(10);

impl World {
    /// A client node ("client") with the default config and a registry peer holding `services`.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a ServiceInfo>) -> Self {
        Self::with_config(NodeConfig::new(PeerId("client".into()), Requirements::rtt(ms(100), ms(1000))), services)
    }

    /// `config`, trusting the world's operator unless it names operators of its own.
    pub fn with_config<'a>(mut config: NodeConfig, services: impl IntoIterator<Item = &'a ServiceInfo>) -> Self {
        if config.trust.operators.is_empty() {
            config.trust.operators = Operators::new(vec![operator().public()]);
        }
        let node = Node::new(config, 7, Instant::ZERO);
        let mut w = World {
            now: Instant::ZERO,
            node,
            providers: BTreeMap::new(),
            rtt: BTreeMap::new(),
            reachable_from: BTreeMap::new(),
            cut_from: BTreeMap::new(),
            lose_next: BTreeMap::new(),
            lose_allocates: 0,
            registry: services.into_iter().map(|s| (s.name.clone(), s.clone())).collect(),
            rogue_registries: Vec::new(),
            allocators: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            next_req: 0,
            log: Vec::new(),
            responses: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            asked: BTreeMap::new(),
        };
        w.providers.insert(DhtKey::Registry, vec![peer(REGISTRY)]);
        w.rtt.insert(PeerId(REGISTRY.into()), ms(2));
        w.drain();
        w
    }

    pub fn add_instance(&mut self, svc: &ServiceInfo, name: &str, rtt: Duration) {
        self.providers.entry(DhtKey::Service(svc.hash.clone())).or_default().push(peer(name));
        self.rtt.insert(PeerId(name.into()), rtt);
    }

    /// A node that advertises the registry key and forges entries, listed before the real one.
    pub fn add_rogue_registry(&mut self, name: &str) {
        self.providers.entry(DhtKey::Registry).or_default().insert(0, peer(name));
        self.rtt.insert(PeerId(name.into()), ms(1));
        self.rogue_registries.push(name.into());
    }

    pub fn add_allocator(&mut self, name: &str, rtt: Duration, behaviour: AllocatorBehaviour) {
        self.providers.entry(DhtKey::Allocators).or_default().push(peer(name));
        self.rtt.insert(PeerId(name.into()), rtt);
        self.allocators.insert(PeerId(name.into()), behaviour);
    }

    /// Send a client request now; it must be answered within `within`.
    pub fn request(&mut self, svc: &str, within: Duration) -> ReqId {
        self.ask(svc, within, false)
    }

    /// Route a request again after a failed try (as the front end does), within `within`.
    pub fn retry(&mut self, svc: &str, within: Duration) -> ReqId {
        self.ask(svc, within, true)
    }

    fn ask(&mut self, svc: &str, within: Duration, retry: bool) -> ReqId {
        self.next_req += 1;
        let req = ReqId(self.next_req);
        let deadline = self.now + within;
        self.deadlines.insert(req, deadline);
        self.asked.insert(req, svc.into());
        let service = svc.to_string();
        self.input(match retry {
            false => Input::HttpRequest { req, service, deadline },
            true => Input::HttpRetry { req, service, deadline },
        });
        req
    }

    pub fn input(&mut self, input: Input) {
        self.node.handle_input(self.now, input);
        self.drain();
    }

    fn at(&mut self, after: Duration, input: Input) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), input);
    }

    fn reachable(&mut self, p: &PeerId) -> Option<Duration> {
        if self.reachable_from.get(p).is_some_and(|t| self.now < *t) {
            return None;
        }
        if self.cut_from.get(p).is_some_and(|t| self.now >= *t) {
            return None;
        }
        if let Some(n) = self.lose_next.get_mut(p).filter(|n| **n > 0) {
            *n -= 1;
            return None;
        }
        self.rtt.get(p).copied()
    }

    fn drain(&mut self) {
        while let Some(o) = self.node.poll_output() {
            self.log.push((self.now, o.clone()));
            match o {
                Output::Respond { req, outcome } => {
                    let prev = self.responses.insert(req, (self.now, outcome));
                    assert!(prev.is_none(), "request {req} answered twice");
                }
                Output::FindProviders { op, key, .. } => {
                    let found = self.providers.get(&key).cloned().unwrap_or_default();
                    self.at(DHT_LATENCY, Input::OpDone { op, result: OpResult::Providers(found) });
                }
                Output::Probe { op, peer, timeout } => {
                    if let Some(rtt) = self.reachable(&peer.peer).filter(|rtt| *rtt <= timeout) {
                        self.at(rtt, Input::OpDone { op, result: OpResult::Rtt(rtt) });
                    }
                }
                Output::SendRequest { op, peer, request, .. } => {
                    let Some(rtt) = self.reachable(&peer.peer) else { continue };
                    if self.lose_allocates > 0 && matches!(request, Request::Allocate { .. }) {
                        self.lose_allocates -= 1;
                        continue;
                    }
                    if matches!(self.allocators.get(&peer.peer), Some(AllocatorBehaviour::Silent))
                        && matches!(request, Request::Allocate { .. })
                    {
                        continue;
                    }
                    let response = self.serve(&peer.peer, request);
                    self.at(rtt, Input::OpDone { op, result: OpResult::Response(response) });
                }
                _ => {}
            }
        }
    }

    fn serve(&mut self, to: &PeerId, request: Request) -> Response {
        match (to.0.as_str(), request) {
            (rogue, Request::RegistryGet { name }) if self.rogue_registries.iter().any(|r| r == rogue) => {
                let mut info = self.registry.get(&name).cloned().unwrap_or_else(|| service(&name, 50, 100));
                info.run =
                    RunSpec::Exec { program: "/bin/sh".into(), args: vec!["-c".into(), "evil".into()], env: vec![] };
                let stranger = SecretKey::from_bytes([66; 32]);
                Response::Entry { entry: Some(Box::new(SignedEntry::sign(name, u64::MAX, Some(info), &stranger))) }
            }
            // "registry", "registry-2", …: registry replicas serving the same entries.
            (r, Request::RegistryGet { name }) if r.starts_with(REGISTRY) => Response::Entry {
                entry: self
                    .registry
                    .get(&name)
                    .map(|i| Box::new(SignedEntry::sign(name, 1, Some(i.clone()), &operator()))),
            },
            (_, Request::Allocate { service }) => match self.allocators.get(to).cloned() {
                Some(AllocatorBehaviour::Start { instance, rtt, in_dht }) => {
                    let Some(info) = self.registry.get(&service).cloned() else {
                        return Response::Refused { reason: "unknown service".into() };
                    };
                    self.rtt.insert(instance.peer.clone(), rtt);
                    if in_dht {
                        self.providers.entry(DhtKey::Service(info.hash)).or_default().push(instance.clone());
                    }
                    Response::Allocated { instance }
                }
                Some(AllocatorBehaviour::Refuse(reason)) => Response::Refused { reason },
                Some(AllocatorBehaviour::Silent) => Response::Error { reason: "silent".into() },
                None => Response::Error { reason: "not an allocator".into() },
            },
            // A sidecar that takes its credentials and has just served.
            (_, Request::IdleQuery { .. }) => Response::Idle { seconds: 0 },
            (_, r) => Response::Error { reason: format!("unexpected {r:?}") },
        }
    }

    /// Advance simulated time to `until`, delivering queued answers and timers.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let queued = self.queue.keys().next().map(|(t, _)| *t);
            let timer = self.node.poll_timeout();
            let next = match (queued, timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            match self.queue.keys().next().copied().filter(|(t, _)| *t <= self.now) {
                Some(key) => {
                    let input = self.queue.remove(&key).expect("key just seen");
                    self.input(input);
                }
                None => self.input(Input::Tick),
            }
        }
        self.now = self.now.max(until);
        self.input(Input::Tick);
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    pub fn outcome(&self, req: ReqId) -> Option<&Outcome> {
        self.responses.get(&req).map(|(_, o)| o)
    }

    pub fn routed_to(&self, req: ReqId) -> Option<String> {
        match self.outcome(req)? {
            Outcome::Route { instance, .. } => Some(instance.peer.0.clone()),
            Outcome::Fail { .. } => None,
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.log
            .iter()
            .filter_map(|(_, o)| match o {
                Output::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Output) -> bool) -> usize {
        self.log.iter().filter(|(_, o)| pred(o)).count()
    }

    pub fn allocate_requests(&self) -> usize {
        self.count(|o| matches!(o, Output::SendRequest { request: Request::Allocate { .. }, .. }))
    }

    /// When request `req` was answered.
    pub fn answered_at(&self, req: ReqId) -> Option<Instant> {
        self.responses.get(&req).map(|(t, _)| *t)
    }

    /// (time, instance) of every `Selected` event.
    pub fn selections(&self) -> Vec<(Instant, String)> {
        self.log
            .iter()
            .filter_map(|(t, o)| match o {
                Output::Event(Event::Selected { instance, .. }) => Some((*t, instance.0.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn finds_of(&self, key: &DhtKey) -> usize {
        self.count(|o| matches!(o, Output::FindProviders { key: k, .. } if k == key))
    }
}
