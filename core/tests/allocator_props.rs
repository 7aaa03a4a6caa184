//! Property tests of the allocator machine: random interleavings of requests,
//! registry answers, start outcomes, exits, idle answers and time.

use physarum_core::allocator::{Allocator, AllocatorInput, AllocatorOutput};
use physarum_core::config::AllocatorConfig;
use physarum_core::perf::Requirements;
use physarum_core::time::Instant;
use physarum_core::trust::{Grant, Issuer, Operators, SecretKey, TrustConfig};
use physarum_core::types::{ContentHash, InboundId, InstanceId, PeerAddr, PeerId, RunSpec, ServiceInfo};
use physarum_core::wire::Response;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;
use std::time::Duration;

/// Known services (name, cpu millis, memory MiB); `GHOST` is not in the registry.
/// Chosen so that each of the three limits of [`config`] is the one that bites in some
/// combination: {c, d, f} + b runs out of slots, {c, d, f} + a of CPU, {c, d} + e of memory.
const SERVICES: &[(&str, u32, u32)] =
    &[("a", 1500, 1000), ("b", 1000, 2000), ("c", 500, 500), ("d", 1000, 1000), ("e", 100, 3000), ("f", 10, 10)];
const GHOST: &str = "ghost";

fn config() -> AllocatorConfig {
    AllocatorConfig {
        max_instances: 3,
        cpu_millis: 3000,
        memory_mb: 4096,
        cull_interval: Duration::from_secs(60),
        idle_limit: Duration::from_secs(60),
        start_timeout: Duration::from_secs(30),
        idle_query_timeout: Duration::from_secs(5),
        exec_roots: Vec::new(),
        ..AllocatorConfig::default()
    }
}

/// A granted allocator's trust settings (its instances get credentials).
fn granted() -> TrustConfig {
    let key = SecretKey::from_bytes([7; 32]);
    let grant = Grant::sign(PeerId("alloc".into()), key.public(), &SecretKey::from_bytes([1; 32]));
    let mut t = TrustConfig::new(Operators::new(vec![SecretKey::from_bytes([1; 32]).public()]), 0);
    t.issuer = Some(Issuer::allocator(key, grant).unwrap());
    t
}

fn service_name(i: usize) -> &'static str {
    SERVICES.get(i).map_or(GHOST, |s| s.0)
}

fn registry(name: &str) -> Option<ServiceInfo> {
    SERVICES.iter().find(|s| s.0 == name).map(|&(name, cpu_millis, memory_mb)| ServiceInfo {
        name: name.into(),
        hash: ContentHash(format!("hash-{name}")),
        run: RunSpec::Image { image: format!("{name}:1") },
        requirements: Requirements::default(),
        cpu_millis,
        memory_mb,
        stateful: false,
        client_mode: false,
    })
}

fn peer_of(instance: InstanceId) -> PeerAddr {
    PeerAddr::new(format!("inst-{}", instance.0), vec![format!("/ip4/10.0.0.9/tcp/{}", 4000 + instance.0)])
}

#[derive(Clone, Debug)]
enum Op {
    /// A request for service `SERVICES[i]`, or the unknown one past the end.
    Request(usize),
    /// Answer an outstanding Resolve; `fail` makes it a registry error.
    Resolve(Index, bool),
    StartOk(Index),
    StartFail(Index),
    /// An instance (chosen among those the allocator lists) exits.
    Exit(Index),
    /// Answer an outstanding idle query: `Ok(secs)` or a failure.
    Idle(Index, Option<u64>),
    /// Inputs about instances and tokens nobody was told about.
    Bogus(u64),
    Advance(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=SERVICES.len()).prop_map(Op::Request),
        3 => (any::<Index>(), prop::bool::weighted(0.15)).prop_map(|(i, f)| Op::Resolve(i, f)),
        2 => any::<Index>().prop_map(Op::StartOk),
        1 => any::<Index>().prop_map(Op::StartFail),
        1 => any::<Index>().prop_map(Op::Exit),
        2 => (any::<Index>(), prop::option::weighted(0.8, 0u64..120)).prop_map(|(i, r)| Op::Idle(i, r)),
        1 => (0u64..40).prop_map(Op::Bogus),
        3 => (0u64..40).prop_map(Op::Advance),
    ]
}

/// The driver's view of the allocator, checking invariants as outputs come out.
struct Harness {
    a: Allocator,
    now: Instant,
    next_id: u64,
    /// Every request sent: id → service name.
    requests: BTreeMap<u64, &'static str>,
    replied: BTreeMap<u64, Response>,
    /// Outstanding Resolves, with when they were asked.
    resolves: Vec<(String, Instant)>,
    /// Starts emitted and not yet settled by the harness.
    starts: Vec<InstanceId>,
    /// Every Start ever emitted: instance → what it runs.
    started: BTreeMap<InstanceId, ServiceInfo>,
    /// Instances the harness reported up, with their peers.
    up_peers: BTreeMap<InstanceId, PeerAddr>,
    /// Outstanding idle queries: token and the instance asked.
    queries: Vec<(u64, InstanceId)>,
    log: Vec<AllocatorOutput>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            a: Allocator::new(config(), granted(), Instant::ZERO),
            now: Instant::ZERO,
            next_id: 0,
            requests: BTreeMap::new(),
            replied: BTreeMap::new(),
            resolves: Vec::new(),
            starts: Vec::new(),
            started: BTreeMap::new(),
            up_peers: BTreeMap::new(),
            queries: Vec::new(),
            log: Vec::new(),
        }
    }

    fn input(&mut self, input: AllocatorInput) -> Result<(), TestCaseError> {
        self.a.handle_input(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Result<(), TestCaseError> {
        while let Some(out) = self.a.poll_output() {
            match &out {
                AllocatorOutput::Resolve { service } => {
                    // A second Resolve for a name only once the allocator gave up on the first.
                    if let Some(pos) = self.resolves.iter().position(|(s, _)| s == service) {
                        let asked = self.resolves[pos].1;
                        prop_assert!(
                            self.now >= asked + config().start_timeout,
                            "two Resolves of {} outstanding",
                            service
                        );
                        self.resolves.remove(pos);
                    }
                    self.resolves.push((service.clone(), self.now));
                }
                AllocatorOutput::Reply { id, response } => {
                    prop_assert!(self.requests.contains_key(&id.0), "reply to unknown request {}", id.0);
                    prop_assert!(!self.replied.contains_key(&id.0), "second reply to request {}", id.0);
                    if let Response::Allocated { instance } = response {
                        let wanted = self.requests[&id.0];
                        let ok = self
                            .up_peers
                            .iter()
                            .any(|(i, p)| p == instance && self.started.get(i).is_some_and(|s| s.name == wanted));
                        prop_assert!(ok, "request {} for {} answered with {:?}", id.0, wanted, instance);
                    }
                    self.replied.insert(id.0, response.clone());
                }
                AllocatorOutput::Start { instance, service } => {
                    prop_assert!(registry(&service.name).as_ref() == Some(service), "started {:?}", service);
                    prop_assert!(!self.started.contains_key(instance), "instance id {:?} reused", instance);
                    self.starts.push(*instance);
                    self.started.insert(*instance, service.clone());
                }
                AllocatorOutput::Stop { instance } => {
                    prop_assert!(self.started.contains_key(instance), "stop of unknown {:?}", instance);
                    self.starts.retain(|i| i != instance);
                }
                AllocatorOutput::QueryIdle { token, peer, credentials, .. } => {
                    let asked = self.up_peers.iter().find(|(_, p)| *p == peer).map(|(i, _)| *i);
                    prop_assert!(asked.is_some(), "idle query to {:?}", peer);
                    let hash = &self.started[&asked.unwrap()].hash;
                    let valid = credentials.as_ref().is_some_and(|c| {
                        let ops = Operators::new(vec![SecretKey::from_bytes([1; 32]).public()]);
                        ops.verify_credentials(c, &peer.peer, hash, 0).is_ok()
                    });
                    prop_assert!(valid, "idle query to {:?} without valid credentials", peer);
                    self.queries.push((*token, asked.unwrap()));
                }
                AllocatorOutput::Event(_) => {}
            }
            self.log.push(out);
        }
        self.check_state()
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let views: Vec<_> = self.a.instances().collect();
        let cfg = config();
        prop_assert!(views.len() <= cfg.max_instances, "{} instances", views.len());
        prop_assert!(views.windows(2).all(|w| w[0].instance < w[1].instance), "not in InstanceId order");
        let mut per_service: BTreeMap<&str, usize> = BTreeMap::new();
        let mut starting: BTreeMap<&str, usize> = BTreeMap::new();
        let (mut cpu, mut mem) = (0u64, 0u64);
        for v in &views {
            let info = self.started.get(&v.instance);
            prop_assert!(info.is_some(), "instance {:?} listed but never started", v.instance);
            let info = info.unwrap();
            prop_assert_eq!(&info.name, &v.service);
            cpu += u64::from(info.cpu_millis);
            mem += u64::from(info.memory_mb);
            *per_service.entry(info.name.as_str()).or_default() += 1;
            if v.peer.is_none() {
                *starting.entry(info.name.as_str()).or_default() += 1;
            } else {
                prop_assert_eq!(v.peer.as_ref(), self.up_peers.get(&v.instance));
            }
        }
        prop_assert!(starting.values().all(|&n| n <= 1), "more than one start in flight: {:?}", starting);
        prop_assert!(per_service.values().all(|&n| n <= 1), "more than one instance per service: {:?}", per_service);
        prop_assert!(cpu <= cfg.cpu_millis && mem <= cfg.memory_mb, "over capacity: {} millis, {} MiB", cpu, mem);
        Ok(())
    }

    fn advance(&mut self, secs: u64) -> Result<(), TestCaseError> {
        self.now += Duration::from_secs(secs);
        // Spurious wake-ups are allowed: handle_timeout is called whether or not a deadline came.
        self.a.handle_timeout(self.now);
        self.drain()?;
        if let Some(t) = self.a.poll_timeout() {
            prop_assert!(t > self.now, "deadline {:?} not after now {:?} after handle_timeout", t, self.now);
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Request(i) => {
                self.next_id += 1;
                let service = service_name(*i);
                self.requests.insert(self.next_id, service);
                let input = AllocatorInput::Request {
                    id: InboundId(self.next_id),
                    from: PeerId("client".into()),
                    service: service.into(),
                };
                self.input(input)?;
            }
            Op::Resolve(i, fail) => {
                if !self.resolves.is_empty() {
                    let (service, _) = self.resolves.remove(i.index(self.resolves.len()));
                    let result = if *fail { Err("registry down".into()) } else { Ok(registry(&service)) };
                    self.input(AllocatorInput::Resolved { service, result })?;
                }
            }
            Op::StartOk(i) => {
                if !self.starts.is_empty() {
                    let instance = self.starts.remove(i.index(self.starts.len()));
                    self.up_peers.insert(instance, peer_of(instance));
                    self.input(AllocatorInput::InstanceStarted { instance, peer: peer_of(instance) })?;
                }
            }
            Op::StartFail(i) => {
                if !self.starts.is_empty() {
                    let instance = self.starts.remove(i.index(self.starts.len()));
                    self.input(AllocatorInput::InstanceFailed { instance, reason: "no such image".into() })?;
                }
            }
            Op::Exit(i) => {
                let ids: Vec<InstanceId> = self.a.instances().map(|v| v.instance).collect();
                if !ids.is_empty() {
                    let instance = ids[i.index(ids.len())];
                    self.starts.retain(|s| *s != instance);
                    self.input(AllocatorInput::InstanceExited { instance })?;
                    prop_assert!(self.a.instances().all(|v| v.instance != instance), "exited instance kept");
                }
            }
            Op::Idle(i, result) => {
                if !self.queries.is_empty() {
                    let (token, instance) = self.queries.remove(i.index(self.queries.len()));
                    let view = self.a.instances().find(|v| v.instance == instance);
                    let listed_before = view.is_some();
                    // The first query carries the instance's credentials: any answer means it took them.
                    let certifying = view.is_some_and(|v| v.peer.is_none());
                    let answer = result.ok_or_else(|| "garbage: \"NaN\"".to_string());
                    self.input(AllocatorInput::IdleAnswer { token, result: answer })?;
                    let listed_after = self.a.instances().any(|v| v.instance == instance);
                    // Idle up to the limit: kept; over it, or no sensible answer: culled.
                    let keep = match certifying {
                        true => result.is_some(),
                        false => result.is_some_and(|secs| secs <= config().idle_limit.as_secs()),
                    };
                    prop_assert_eq!(listed_after, listed_before && keep, "idle answer {:?}", result);
                }
            }
            Op::Bogus(n) => {
                let instance = InstanceId(1000 + n);
                self.input(AllocatorInput::InstanceStarted { instance, peer: peer_of(instance) })?;
                self.input(AllocatorInput::InstanceFailed { instance, reason: "?".into() })?;
                self.input(AllocatorInput::InstanceExited { instance })?;
                self.input(AllocatorInput::IdleAnswer { token: 1000 + n, result: Ok(*n) })?;
                let service = format!("never-asked-{n}");
                self.input(AllocatorInput::Resolved { service, result: Ok(registry("a")) })?;
            }
            Op::Advance(secs) => self.advance(*secs)?,
        }
        Ok(())
    }

    /// Let everything settle: answer the registry, then let the start timeouts run out.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        while let Some((service, _)) = self.resolves.pop() {
            let result = Ok(registry(&service));
            self.input(AllocatorInput::Resolved { service, result })?;
        }
        self.advance(config().start_timeout.as_secs() + 1)
    }
}

fn run(ops: &[Op]) -> Result<Harness, TestCaseError> {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op)?;
    }
    h.settle()?;
    Ok(h)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn allocator_invariants_hold(ops in proptest::collection::vec(arb_op(), 0..120)) {
        let h = run(&ops)?;
        let unanswered: Vec<_> = h.requests.keys().filter(|id| !h.replied.contains_key(id)).collect();
        prop_assert!(unanswered.is_empty(), "requests never answered: {:?}", unanswered);
        prop_assert_eq!(h.a.pending_requests(), 0);
        for (id, service) in &h.requests {
            if *service == GHOST {
                prop_assert!(matches!(h.replied[id], Response::Refused { .. }), "ghost request {} allocated", id);
            }
        }
    }

    #[test]
    fn allocator_is_deterministic(ops in proptest::collection::vec(arb_op(), 0..120)) {
        let first = run(&ops)?;
        let second = run(&ops)?;
        prop_assert_eq!(first.log, second.log);
    }
}

/// The property test can fail: a storm of requests for one service while its
/// instance boots must produce exactly one Start (checked here directly, so a
/// regression shows even if the random search misses it).
#[test]
fn storm_during_boot_starts_once() {
    let mut h = Harness::new();
    for _ in 0..20 {
        h.apply(&Op::Request(0)).unwrap();
        let (service, _) = h.resolves.pop().expect("a Resolve per batch");
        h.input(AllocatorInput::Resolved { service: service.clone(), result: Ok(registry(&service)) }).unwrap();
    }
    assert_eq!(h.starts.len(), 1);
    let instance = h.starts[0];
    h.up_peers.insert(instance, peer_of(instance));
    h.input(AllocatorInput::InstanceStarted { instance, peer: peer_of(instance) }).unwrap();
    assert!(h.replied.is_empty(), "nobody hears of the instance before it holds its credentials");
    let (token, _) = h.queries.pop().expect("the certifying query");
    h.input(AllocatorInput::IdleAnswer { token, result: Ok(0) }).unwrap();
    assert_eq!(h.replied.len(), 20);
    assert!(h.replied.values().all(|r| *r == Response::Allocated { instance: peer_of(instance) }));
}
