//! The composite `Node` fed an arbitrary sequence of inputs: client requests, peer
//! requests, answers (right, wrong, late, duplicated or for operations that never
//! existed; registry entries signed by the trusted operator or by a stranger),
//! route failures and failed trust checks, instance events and time passing. The runtime's side of the contract
//! is kept (request and inbound ids are fresh, time only moves forward, every due
//! timer gets its tick); everything else is up to the fuzzer.
//!
//! Checked on every run:
//! - nothing panics, and a tick makes progress (no timer stays due forever);
//! - every client request gets exactly one `Respond`, no later than its deadline,
//!   and never routed to the node itself;
//! - every peer request gets exactly one reply;
//! - an answer for an operation that is unknown (never handed out, answered
//!   already, or timed out) produces no output at all, and neither does an event
//!   about an instance that was never started;
//! - operation and instance ids are never reused; roles the node does not have
//!   produce no outputs (no starts without the allocator role, no persisting
//!   without the registry role);
//! - the same inputs give the same outputs.

use arbitrary::Arbitrary;
use physarum_core::config::{AllocatorConfig, NodeConfig};
use physarum_core::io::{Input, OpResult, Outcome, Output};
use physarum_core::perf::Requirements;
use physarum_core::trust::{Grant, Issuer, Operators, SecretKey, SignedEntry};
use physarum_core::types::{ContentHash, InboundId, InstanceId, OpId, PeerAddr, PeerId, ReqId, RunSpec, ServiceInfo};
use physarum_core::wire::{Request, Response};
use physarum_core::{Instant, Node};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Arbitrary, Clone, Debug)]
pub struct Case {
    allocator: bool,
    registry: bool,
    serve: bool,
    seed: u64,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Clone, Debug)]
enum Step {
    Wait {
        ms: u16,
    },
    Request {
        service: u8,
        deadline_ms: u16,
    },
    /// Forwarding the n-th routed request failed (or, with none routed, a made-up one).
    RouteFailed {
        nth: u8,
        peer: u8,
    },
    /// The instance of the n-th routed request failed the trust check (likewise).
    Untrusted {
        nth: u8,
        peer: u8,
    },
    TunnelServed,
    PeerRequest {
        from: u8,
        request: PeerRequest,
    },
    /// Answer an operation: `op` picks an outstanding one, or an unknown one.
    Answer {
        op: u8,
        result: Answer,
    },
    BootstrapConnected,
    /// `instance` picks a started instance, or one never started.
    InstanceStarted {
        instance: u8,
        peer: u8,
    },
    InstanceFailed {
        instance: u8,
    },
    InstanceExited {
        instance: u8,
    },
}

#[derive(Arbitrary, Clone, Debug)]
enum PeerRequest {
    Allocate {
        service: u8,
    },
    RegistryGet {
        service: u8,
    },
    RegistryList {
        after: Option<u8>,
    },
    /// An entry signed by the operator (or a stranger); a removal without `limits`.
    RegistryPut {
        service: u8,
        version: u8,
        by_operator: bool,
        limits: Option<(u16, u16)>,
    },
    /// With credentials the operator issued for this node, or none.
    IdleQuery {
        credentials: Option<u8>,
    },
    Ping {
        nonce: u64,
    },
}

#[derive(Arbitrary, Clone, Debug)]
enum Answer {
    Providers(Vec<u8>),
    Rtt { ms: u16 },
    Response(Reply),
    Failed,
}

#[derive(Arbitrary, Clone, Debug)]
enum Reply {
    Allocated {
        peer: u8,
    },
    Refused,
    /// A registry entry (possibly of another name than asked, or signed by a
    /// stranger), or none.
    Entry {
        service: Option<u8>,
        by_operator: bool,
    },
    Entries,
    Done,
    Idle {
        seconds: u64,
    },
    Pong {
        nonce: u64,
    },
    Error,
}

const LOCAL: &str = "self";
/// Service names: three that can be registered, one never.
const SERVICES: [&str; 4] = ["s0", "s1", "s2", "unknown"];
const PEERS: usize = 6;
/// Ticks at one instant before the node counts as stuck.
const MAX_TICKS_AT_ONCE: usize = 1000;

fn service_name(i: u8) -> &'static str {
    SERVICES[i as usize % SERVICES.len()]
}

/// The operator every node here trusts.
fn operator() -> SecretKey {
    SecretKey::from_bytes([1; 32])
}

fn entry(name: &str, version: u64, info: Option<ServiceInfo>, by_operator: bool) -> SignedEntry {
    let key = if by_operator { operator() } else { SecretKey::from_bytes([66; 32]) };
    SignedEntry::sign(name.into(), version, info, &key)
}

const EXEC_ROOT: &str = "/srv/physarum";

fn service_info(name: &str, soft_ms: u64, hard_ms: u64) -> ServiceInfo {
    ServiceInfo {
        name: name.into(),
        hash: ContentHash(format!("hash-{name}")),
        run: RunSpec::Exec { program: format!("{EXEC_ROOT}/{name}"), args: vec![], env: vec![] },
        requirements: Requirements::rtt(Duration::from_millis(soft_ms), Duration::from_millis(hard_ms)),
        cpu_millis: 100,
        memory_mb: 32,
        stateful: false,
        client_mode: false,
    }
}

/// Peer `i`; the last of the vocabulary is the node itself.
fn peer(i: u8) -> PeerAddr {
    let name = match i as usize % PEERS {
        n if n == PEERS - 1 => LOCAL.to_string(),
        n => format!("p{n}"),
    };
    PeerAddr::new(name.clone(), vec![format!("/sim/{name}")])
}

/// Run `case` twice and check every property; panics on a violation.
pub fn check(case: &Case) {
    let first = Driver::run(case);
    let second = Driver::run(case);
    assert!(first == second, "the same inputs gave different outputs");
}

struct Driver {
    node: Node,
    now: Instant,
    roles: (bool, bool),
    log: Vec<(Instant, Output)>,
    next_req: u64,
    deadlines: BTreeMap<ReqId, Instant>,
    responded: BTreeMap<ReqId, Outcome>,
    next_inbound: u64,
    unreplied: BTreeSet<InboundId>,
    replied: BTreeSet<InboundId>,
    /// Operations handed out and not yet answered or timed out, with their deadline.
    ops: BTreeMap<OpId, Instant>,
    /// Operations answered or timed out.
    dead_ops: Vec<OpId>,
    seen_ops: BTreeSet<OpId>,
    started: Vec<InstanceId>,
}

impl Driver {
    fn run(case: &Case) -> Vec<(Instant, Output)> {
        let mut config = NodeConfig::new(
            PeerId(LOCAL.into()),
            Requirements::rtt(Duration::from_millis(100), Duration::from_millis(1000)),
        );
        config.trust.operators = Operators::new(vec![operator().public()]);
        if case.allocator {
            config.allocator = Some(AllocatorConfig {
                max_instances: 2,
                exec_roots: vec![EXEC_ROOT.into()],
                ..AllocatorConfig::default()
            });
            let key = SecretKey::from_bytes([7; 32]);
            let grant = Grant::sign(PeerId(LOCAL.into()), key.public(), &operator());
            config.trust.issuer = Some(Issuer::allocator(key, grant).expect("the grant names the key"));
        }
        if case.registry {
            config.registry = Some(vec![
                entry("s0", 1, Some(service_info("s0", 50, 100)), true),
                entry("s1", 1, Some(service_info("s1", 20, 40)), true),
            ]);
        }
        if case.serve {
            config.serve = Some("s0".into());
        }
        let mut d = Driver {
            node: Node::new(config, case.seed, Instant::ZERO),
            now: Instant::ZERO,
            roles: (case.allocator, case.registry),
            log: Vec::new(),
            next_req: 0,
            deadlines: BTreeMap::new(),
            responded: BTreeMap::new(),
            next_inbound: 0,
            unreplied: BTreeSet::new(),
            replied: BTreeSet::new(),
            ops: BTreeMap::new(),
            dead_ops: Vec::new(),
            seen_ops: BTreeSet::new(),
            started: Vec::new(),
        };
        d.drain();
        d.settle();
        for step in &case.steps {
            d.step(step);
            d.settle();
        }
        // Long enough for every deadline, and for allocators to give up on starts.
        let last = d.deadlines.values().max().copied().unwrap_or(d.now);
        d.advance_to(last.max(d.now) + Duration::from_secs(120));
        let unanswered: Vec<_> = d.deadlines.keys().filter(|r| !d.responded.contains_key(r)).collect();
        assert!(unanswered.is_empty(), "requests {unanswered:?} never answered");
        assert!(d.unreplied.is_empty(), "peer requests {:?} never answered", d.unreplied);
        d.log
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Wait { ms } => self.advance_to(self.now + Duration::from_millis(u64::from(*ms))),
            Step::Request { service, deadline_ms } => {
                self.next_req += 1;
                let req = ReqId(self.next_req);
                let deadline = self.now + Duration::from_millis(u64::from(*deadline_ms));
                self.deadlines.insert(req, deadline);
                self.input(Input::HttpRequest { req, service: service_name(*service).into(), deadline });
            }
            Step::RouteFailed { nth, peer: p } => {
                let (service, peer) = self.routed(*nth, *p);
                self.input(Input::RouteFailed { service, peer, reason: "fuzz".into() });
            }
            Step::Untrusted { nth, peer: p } => {
                let (service, peer) = self.routed(*nth, *p);
                self.input(Input::Untrusted { service, peer, reason: "fuzz".into() });
            }
            Step::TunnelServed => self.input(Input::TunnelServed),
            Step::PeerRequest { from, request } => {
                self.next_inbound += 1;
                let id = InboundId(self.next_inbound);
                self.unreplied.insert(id);
                let request = match request {
                    PeerRequest::Allocate { service } => Request::Allocate { service: service_name(*service).into() },
                    PeerRequest::RegistryGet { service } => {
                        Request::RegistryGet { name: service_name(*service).into() }
                    }
                    PeerRequest::RegistryList { after } => {
                        Request::RegistryList { after: after.map(|s| service_name(s).into()) }
                    }
                    PeerRequest::RegistryPut { service, version, by_operator, limits } => {
                        let name = service_name(*service);
                        let info = limits.map(|(soft, hard)| service_info(name, soft.into(), hard.into()));
                        Request::RegistryPut { entry: Box::new(entry(name, (*version).into(), info, *by_operator)) }
                    }
                    PeerRequest::IdleQuery { credentials } => Request::IdleQuery {
                        credentials: credentials.map(|s| {
                            let hash = ContentHash(format!("hash-{}", service_name(s)));
                            Box::new(Issuer::operator(operator()).issue(PeerId(LOCAL.into()), hash, u64::MAX))
                        }),
                    },
                    PeerRequest::Ping { nonce } => Request::Ping { nonce: *nonce },
                };
                self.input(Input::PeerRequest { id, from: peer(*from).peer, request });
            }
            Step::Answer { op, result } => {
                let outstanding: Vec<OpId> = self.ops.keys().copied().collect();
                let pick = *op as usize;
                let result = answer(result);
                if pick < 0x80 && !outstanding.is_empty() {
                    let op = outstanding[pick % outstanding.len()];
                    self.ops.remove(&op);
                    self.dead_ops.push(op);
                    self.input(Input::OpDone { op, result });
                } else {
                    let op = match self.dead_ops.get(pick % self.dead_ops.len().max(1)) {
                        Some(dead) if pick.is_multiple_of(2) => *dead,
                        _ => OpId(u64::MAX - pick as u64),
                    };
                    assert!(!self.seen_ops.contains(&op) || self.dead_ops.contains(&op));
                    self.expect_silence(Input::OpDone { op, result }, "an answer for an unknown operation");
                }
            }
            Step::BootstrapConnected => self.input(Input::BootstrapConnected),
            Step::InstanceStarted { instance, peer: p } => {
                let peer = peer(*p);
                self.instance_event(*instance, move |instance| Input::InstanceStarted { instance, peer })
            }
            Step::InstanceFailed { instance } => {
                self.instance_event(*instance, |instance| Input::InstanceFailed { instance, reason: "fuzz".into() })
            }
            Step::InstanceExited { instance } => {
                self.instance_event(*instance, |instance| Input::InstanceExited { instance })
            }
        }
    }

    /// The service and instance of the n-th routed request, or made-up ones.
    fn routed(&self, nth: u8, p: u8) -> (ContentHash, PeerId) {
        let routed: Vec<_> = self
            .responded
            .values()
            .filter_map(|o| match o {
                Outcome::Route { instance, service, .. } => Some((service.clone(), instance.peer.clone())),
                Outcome::Fail { .. } => None,
            })
            .collect();
        match routed.get(nth as usize % routed.len().max(1)) {
            Some(r) => r.clone(),
            None => (ContentHash(format!("hash-{}", service_name(nth))), peer(p).peer),
        }
    }

    /// An event about a started instance, or (past the list) about one never started.
    fn instance_event(&mut self, pick: u8, event: impl FnOnce(InstanceId) -> Input) {
        match self.started.get(pick as usize % (self.started.len() + 1)) {
            Some(instance) => self.input(event(*instance)),
            None => {
                let never = InstanceId(u64::MAX - u64::from(pick));
                self.expect_silence(event(never), "an event for an instance never started");
            }
        }
    }

    fn input(&mut self, input: Input) {
        self.node.handle_input(self.now, input);
        self.drain();
    }

    /// Feed `input` to a settled node and check it has nothing to say about it.
    fn expect_silence(&mut self, input: Input, what: &str) {
        self.node.handle_input(self.now, input);
        if let Some(out) = self.node.poll_output() {
            panic!("{what} produced {out:?}");
        }
    }

    /// Tick while a timer is due now, so the node is quiet at `now`.
    fn settle(&mut self) {
        let mut ticks = 0;
        while self.node.poll_timeout().is_some_and(|t| t <= self.now) {
            ticks += 1;
            assert!(ticks <= MAX_TICKS_AT_ONCE, "a timer stays due at {:?} however often it ticks", self.now);
            self.input(Input::Tick);
        }
        self.expire_ops();
    }

    /// Let time pass, ticking at every timer on the way.
    fn advance_to(&mut self, target: Instant) {
        while let Some(t) = self.node.poll_timeout().filter(|t| *t <= target) {
            self.now = self.now.max(t);
            self.settle();
        }
        self.now = target;
        self.settle();
    }

    /// Operations whose deadline has come were timed out by the node.
    fn expire_ops(&mut self) {
        let now = self.now;
        let expired: Vec<OpId> = self.ops.iter().filter(|(_, d)| **d <= now).map(|(op, _)| *op).collect();
        for op in expired {
            self.ops.remove(&op);
            self.dead_ops.push(op);
        }
    }

    fn new_op(&mut self, op: OpId, timeout: Duration) {
        assert!(self.seen_ops.insert(op), "operation {op} handed out twice");
        self.ops.insert(op, self.now + timeout);
    }

    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match &out {
                Output::Respond { req, outcome } => {
                    let deadline = self.deadlines.get(req).unwrap_or_else(|| panic!("response to unknown {req}"));
                    assert!(self.now <= *deadline, "{req} answered at {:?} after its deadline {deadline:?}", self.now);
                    if let Outcome::Route { instance, .. } = outcome {
                        assert_ne!(instance.peer.0, LOCAL, "{req} routed to the node itself");
                    }
                    assert!(self.responded.insert(*req, outcome.clone()).is_none(), "{req} answered twice");
                }
                Output::ReplyToPeer { id, .. } => {
                    assert!(self.unreplied.remove(id), "reply to unknown or answered peer request {id}");
                    self.replied.insert(*id);
                }
                Output::FindProviders { op, timeout, .. }
                | Output::Probe { op, timeout, .. }
                | Output::SendRequest { op, timeout, .. } => self.new_op(*op, *timeout),
                Output::StartInstance { instance, .. } => {
                    assert!(self.roles.0, "a start without the allocator role");
                    assert!(!self.started.contains(instance), "instance {instance} started twice");
                    self.started.push(*instance);
                }
                Output::StopInstance { instance } => {
                    assert!(self.started.contains(instance), "stop of instance {instance} never started");
                }
                Output::PersistRegistry { .. } => assert!(self.roles.1, "persisting without the registry role"),
                Output::Advertise { .. } | Output::ServeCredentials { .. } | Output::Event(_) => {}
            }
            self.log.push((self.now, out));
        }
    }
}

fn answer(a: &Answer) -> OpResult {
    match a {
        Answer::Providers(peers) => OpResult::Providers(peers.iter().map(|p| peer(*p)).collect()),
        Answer::Rtt { ms } => OpResult::Rtt(Duration::from_millis(u64::from(*ms))),
        Answer::Failed => OpResult::Failed("fuzz".into()),
        Answer::Response(r) => OpResult::Response(match r {
            Reply::Allocated { peer: p } => Response::Allocated { instance: peer(*p) },
            Reply::Refused => Response::Refused { reason: "fuzz".into() },
            Reply::Entry { service, by_operator } => Response::Entry {
                entry: service.map(|s| {
                    let name = service_name(s);
                    Box::new(entry(name, 1, Some(service_info(name, 50, 100)), *by_operator))
                }),
            },
            Reply::Entries => {
                Response::Entries { entries: vec![entry("s0", 1, Some(service_info("s0", 50, 100)), true)], next: None }
            }
            Reply::Done => Response::Done,
            Reply::Idle { seconds } => Response::Idle { seconds: *seconds },
            Reply::Pong { nonce } => Response::Pong { nonce: *nonce },
            Reply::Error => Response::Error { reason: "fuzz".into() },
        }),
    }
}
