//! The event-driven engine: the same core `Node` machines as the turmoil runs, driven
//! directly by a discrete-event scheduler of our own, for clusters too large for
//! turmoil's per-tick, per-host-pair work. Time jumps from event to event in
//! microseconds, so sub-millisecond latencies are exact. Discovery runs on the
//! Kademlia model of [`crate::kad`]. Same scenarios, same trace and report as
//! [`crate::cluster::run`].
//!
//! What it models more coarsely than the turmoil runs (which keep real HTTP, TCP and
//! the shared runtime's node loop, and stay the full-stack check at small n):
//! - a tunnelled request is one message to the instance and one back (a pooled
//!   stream: no connection set-up, no HTTP bytes); a try to a crashed host fails
//!   after one round trip (a reset), one into a cut link waits for its try timeout;
//!   as the runtime's front end, a failed try is reported and retried once;
//! - instance credentials are not checked on tunnels (no rogue roles here: the
//!   turmoil runs test trust);
//! - wire requests and pings are single messages that a lost one turns into a
//!   timeout, as over UDP in the turmoil runs; a tunnel message lost on a lossy link
//!   is sent again after TCP's retransmission timeout (200 ms, doubling), as the
//!   turmoil runs' streams do, so there loss is delay; jitter is uniform.

use crate::cluster::{check, figures, NetHistory, Report};
use crate::kad::{self, KadConfig, KadNode, Lookup, LookupStep, Rpc, RpcAnswer};
use crate::node::{Ctx, Fate, INSTANCE_PORT_BASE, MAX_INSTANCE_ID, NODE_PORT};
use crate::scenario::{Fault, Role, Scenario};
use crate::topology::{plane_rtt_ms, Topology};
use crate::trace::{Kind, Trace};
use crate::transport::{MAX_RTO, MIN_RTO};
use physarum_core::dht_policy::{startup_failed, Backoff, BootstrapLink, FindEnd, Retry};
use physarum_core::io::{Event, Input, OpResult, Outcome, Output};
use physarum_core::time::Instant;
use physarum_core::trust::{Grant, Issuer};
use physarum_core::types::{ContentHash, InboundId, InstanceId, OpId, PeerAddr, PeerId, ReqId, ServiceInfo};
use physarum_core::wire::{Request, Response};
use physarum_core::Node;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;
use std::time::Duration;

/// One Kademlia RPC waits this long for its answer.
pub const KAD_RPC_TIMEOUT: Duration = Duration::from_secs(1);
/// Routing-table refresh period (production: libp2p's periodic bootstrap, 60 s).
pub const KAD_REFRESH: Duration = Duration::from_secs(60);
/// Bootstrap keepalives: a hello this often; this many missed in a row is a loss.
const KEEPALIVE: Duration = Duration::from_secs(2);
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_MISSED: u32 = 3;
/// A sidecar checks its application this often.
const APP_CHECK: Duration = Duration::from_secs(1);

/// One provider lookup, as the curve of discovery cost counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupSample {
    pub key: String,
    /// RPCs the lookup sent.
    pub rpcs: u32,
    /// Longest chain of answers that led to the result.
    pub hops: u32,
    pub providers: usize,
    pub took: Duration,
    /// Until the first provider arrived (the lookup then waits a grace for more).
    pub first: Option<Duration>,
}

/// One allocation: how close the allocator a client chose was to the closest one.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocationSample {
    pub client: String,
    pub chosen_rtt_ms: f64,
    pub best_rtt_ms: f64,
    /// Allocators the client probed in that discovery.
    pub probed: usize,
}

/// What the event-driven engine measures beyond the report's figures.
#[derive(Clone, Debug, Default)]
pub struct DhtStats {
    pub lookups: Vec<LookupSample>,
    pub allocations: Vec<AllocationSample>,
    /// Every message the engine delivered or lost (DHT, wire, pings, tunnels).
    pub messages: u64,
    /// Kademlia RPCs (requests, not answers) of every kind.
    pub kad_rpcs: u64,
    /// Events the scheduler processed.
    pub events: u64,
    /// Probes of allocators, all discoveries together.
    pub allocator_probes: u64,
}

/// Percentiles of the discovery cost of one run (see [`DhtStats::summary`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostSummary {
    pub lookups: usize,
    pub rpcs_p50: u32,
    pub rpcs_p99: u32,
    pub hops_p50: u32,
    pub hops_p99: u32,
    pub took_p50: Duration,
    pub took_p99: Duration,
    /// Until the first provider, over the lookups that found one.
    pub first_p50: Duration,
    pub first_p99: Duration,
    pub allocations: usize,
    /// Allocators probed per allocation, at most.
    pub probes_max: usize,
    /// How much farther (RTT, ms) the chosen allocator was than the closest one.
    pub excess_p50_ms: f64,
    pub excess_p90_ms: f64,
    /// The chosen allocator's RTT (median), and the closest one's.
    pub chosen_p50_ms: f64,
    pub best_p50_ms: f64,
}

/// The `p`-quantile of `sorted` by nearest rank (the default value when empty).
pub fn nearest_rank<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

impl DhtStats {
    /// The figures the discovery-cost curve plots.
    pub fn summary(&self) -> CostSummary {
        let mut rpcs: Vec<u32> = self.lookups.iter().map(|l| l.rpcs).collect();
        let mut hops: Vec<u32> = self.lookups.iter().map(|l| l.hops).collect();
        let mut took: Vec<Duration> = self.lookups.iter().map(|l| l.took).collect();
        rpcs.sort_unstable();
        hops.sort_unstable();
        took.sort_unstable();
        let mut first: Vec<Duration> = self.lookups.iter().filter_map(|l| l.first).collect();
        first.sort_unstable();
        let sorted_f = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v
        };
        let excess = sorted_f(self.allocations.iter().map(|a| a.chosen_rtt_ms - a.best_rtt_ms).collect());
        let chosen = sorted_f(self.allocations.iter().map(|a| a.chosen_rtt_ms).collect());
        let best = sorted_f(self.allocations.iter().map(|a| a.best_rtt_ms).collect());
        CostSummary {
            lookups: self.lookups.len(),
            rpcs_p50: nearest_rank(&rpcs, 0.5),
            rpcs_p99: nearest_rank(&rpcs, 0.99),
            hops_p50: nearest_rank(&hops, 0.5),
            hops_p99: nearest_rank(&hops, 0.99),
            took_p50: nearest_rank(&took, 0.5),
            took_p99: nearest_rank(&took, 0.99),
            first_p50: nearest_rank(&first, 0.5),
            first_p99: nearest_rank(&first, 0.99),
            allocations: self.allocations.len(),
            probes_max: self.allocations.iter().map(|a| a.probed).max().unwrap_or(0),
            excess_p50_ms: nearest_rank(&excess, 0.5),
            excess_p90_ms: nearest_rank(&excess, 0.9),
            chosen_p50_ms: nearest_rank(&chosen, 0.5),
            best_p50_ms: nearest_rank(&best, 0.5),
        }
    }
}

type Ix = usize;

/// A scheduled event; the heap pops the earliest, in scheduling order at equal times.
struct Due {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        Reverse((self.at, self.seq)).cmp(&Reverse((other.at, other.seq)))
    }
}

#[derive(Clone, Debug)]
enum ReplyTo {
    Op(OpId),
    Probe { op: OpId, sent: Instant },
}

#[derive(Clone, Debug)]
enum Msg {
    Req { from: Ix, reply: ReplyTo, request: Request },
    Resp { reply: ReplyTo, response: Response },
    Kad { from: Ix, query: u64, rpc: Rpc },
    KadResp { query: u64, from: PeerId, answer: RpcAnswer },
    Hello { from: Ix },
    HelloAck { boot: usize, epoch: u32 },
    Tunnel { seq: u64, attempt: u32, client: Ix },
    TunnelResp { seq: u64, attempt: u32, by: PeerId },
    TunnelRefused { seq: u64, attempt: u32 },
}

impl Msg {
    /// Whether the message travels on a tunnel stream (TCP: a lost segment is resent).
    fn on_stream(&self) -> bool {
        matches!(self, Msg::Tunnel { .. } | Msg::TunnelResp { .. } | Msg::TunnelRefused { .. })
    }
}

/// What the network does with one message.
enum Transit {
    /// A host is down or the link is cut.
    Dropped,
    /// Lost on a lossy link.
    Lost,
    After(Duration),
}

#[derive(Clone, Debug)]
enum Ev {
    Wake(Ix),
    Deliver {
        to: Ix,
        msg: Msg,
    },
    /// A stream message lost on its link goes again after `rto`.
    Resend {
        from: Ix,
        to: Ix,
        msg: Msg,
        rto: Duration,
    },
    Fault(usize),
    Request(u64),
    GiveUp(u64),
    TryTimeout {
        seq: u64,
        attempt: u32,
    },
    BootDone {
        alloc: Ix,
        instance: InstanceId,
        service: Box<ServiceInfo>,
    },
    KadTimeout {
        at: Ix,
        query: u64,
        peer: PeerId,
    },
    FindDue {
        at: Ix,
        query: u64,
    },
    BootTick(Ix),
    AppCheck(Ix),
    Refresh(Ix),
}

enum Purpose {
    Find { op: OpId, key: String, end: FindEnd, found: BTreeMap<PeerId, PeerAddr>, first: Option<Instant> },
    Advertise { key: kad::Key },
    Join,
}

struct Query {
    lookup: Lookup,
    rpc: Rpc,
    purpose: Purpose,
    started: Instant,
}

struct BootState {
    link: BootstrapLink,
    awaiting: bool,
    missed: u32,
    next_try: Instant,
    last_hello: Instant,
    epoch: Option<u32>,
}

#[derive(Clone, Debug)]
struct HttpState {
    seq: u64,
    service: String,
    deadline: Instant,
    attempt: u32,
    retried: bool,
    first_failure: Option<u16>,
    /// The instance of the current try.
    instance: Option<(PeerId, ContentHash)>,
}

enum What {
    Bootstrap,
    Main,
    Instance { allocator: Ix, instance: InstanceId },
}

struct Peer {
    addr: PeerAddr,
    host: usize,
    what: What,
    node: Option<Node>,
    kad: KadNode,
    alive: bool,
    /// Pings go to the node (a sidecar: its answer says whether the app answers).
    serves: bool,
    next_wake: Option<Instant>,
    inbound: BTreeMap<InboundId, (Ix, ReplyTo)>,
    next_inbound: u64,
    queries: BTreeMap<u64, Query>,
    next_query: u64,
    boots: Vec<BootState>,
    up: bool,
    http: BTreeMap<ReqId, HttpState>,
    /// Allocator: instances by id (`None` while booting).
    instances: BTreeMap<InstanceId, Option<Ix>>,
    /// Allocators probed in the running allocator round, per discovery (for samples).
    allocator_probes: usize,
}

struct Host {
    name: String,
    up: bool,
    incarnation: u32,
    main: Option<Ix>,
    hung: bool,
    /// Tunnelled requests a hung application holds.
    held: Vec<(Ix, Msg)>,
}

struct World {
    ctx: Rc<Ctx>,
    scenario: Scenario,
    trace: Trace,
    now: Instant,
    queue: BinaryHeap<Due>,
    next_seq: u64,
    peers: Vec<Peer>,
    hosts: Vec<Host>,
    host_ix: BTreeMap<String, usize>,
    /// Dialable address → the peer living there now.
    by_addr: BTreeMap<String, Ix>,
    by_id: BTreeMap<PeerId, Ix>,
    bootstraps: Vec<String>,
    /// Each host pair's RTT at the start, by host index: the listed links, and the
    /// places on the plane (see [`Topology`]).
    links: BTreeMap<(usize, usize), f64>,
    /// Listed links' own jitter (ms of extra one-way delay at most).
    link_jitter: BTreeMap<(usize, usize), f64>,
    places: Vec<Option<[f64; 2]>>,
    rtt_override: BTreeMap<(usize, usize), f64>,
    cut: BTreeSet<(usize, usize)>,
    loss: BTreeMap<(usize, usize), f64>,
    rng: ChaCha8Rng,
    schedule: Vec<crate::scenario::Scheduled>,
    history: NetHistory,
    kad_config: KadConfig,
    backoff: Backoff,
    stats: DhtStats,
    /// Requests by seq: the client peer and its request id.
    http_of: BTreeMap<u64, (Ix, ReqId)>,
}

fn at_of(t: Instant) -> Duration {
    Duration::from_micros(t.as_micros())
}

/// Run `scenario` with `seed` on the event-driven engine.
pub fn run_des(scenario: &Scenario, seed: u64) -> Result<Report, String> {
    run_des_with_progress(scenario, seed, &mut |_| {})
}

/// [`run_des`], calling `progress` with the simulated time reached as the run goes on.
/// How often (in simulated µs) a run reports its progress.
const PROGRESS_EVERY_US: u64 = 1_000_000;

pub fn run_des_with_progress(
    scenario: &Scenario,
    seed: u64,
    progress: &mut dyn FnMut(Duration),
) -> Result<Report, String> {
    scenario.validate().map_err(|e| e.to_string())?;
    if let Some(n) = scenario.nodes.iter().find(|n| matches!(n.role, Role::RogueService { .. } | Role::RogueRegistry)) {
        return Err(format!("node {:?}: rogue roles need the turmoil engine (trust is checked there)", n.name));
    }
    let wall = std::time::Instant::now();
    let trace = Trace::new();
    let ctx = Ctx::new(scenario.clone(), seed, trace.clone());
    let topology = Topology::of(scenario);
    let mut w = World {
        ctx: ctx.clone(),
        scenario: scenario.clone(),
        trace: trace.clone(),
        now: Instant::ZERO,
        queue: BinaryHeap::new(),
        next_seq: 0,
        peers: Vec::new(),
        hosts: Vec::new(),
        host_ix: BTreeMap::new(),
        by_addr: BTreeMap::new(),
        by_id: BTreeMap::new(),
        bootstraps: scenario.bootstraps(),
        history: NetHistory::new(topology),
        links: BTreeMap::new(),
        link_jitter: BTreeMap::new(),
        places: scenario.nodes.iter().map(|n| n.at).collect(),
        rtt_override: BTreeMap::new(),
        cut: BTreeSet::new(),
        loss: BTreeMap::new(),
        rng: ChaCha8Rng::seed_from_u64(ctx.node_seed("des-network")),
        schedule: scenario.expanded_schedule(),
        kad_config: KadConfig::default(),
        backoff: Backoff::default(),
        stats: DhtStats::default(),
        http_of: BTreeMap::new(),
    };
    for n in &scenario.nodes {
        let i = w.hosts.len();
        w.host_ix.insert(n.name.clone(), i);
        w.hosts.push(Host {
            name: n.name.clone(),
            up: true,
            incarnation: 0,
            main: None,
            hung: false,
            held: Vec::new(),
        });
    }
    for l in &scenario.links {
        if let Some(p) = w.host_pair(&l.a, &l.b) {
            w.links.insert(p, l.rtt_ms);
            if l.jitter_ms > 0.0 {
                w.link_jitter.insert(p, l.jitter_ms);
            }
        }
    }
    // Bootstraps first, so that everyone else finds them up.
    let mut order: Vec<usize> = (0..w.hosts.len()).collect();
    order.sort_by_key(|i| scenario.nodes[*i].role != Role::Bootstrap);
    for i in order {
        w.start_host(i);
    }
    for i in 0..w.schedule.len() {
        w.push(Instant::from_micros(w.schedule[i].at_ms * 1000), Ev::Fault(i));
    }
    let requests: Vec<(u64, Duration)> = ctx.requests.borrow().iter().map(|r| (r.seq, r.at)).collect();
    for (seq, at) in requests {
        w.push(Instant::ZERO + at, Ev::Request(seq));
    }
    let end = Instant::from_micros(scenario.duration_ms * 1000);
    while let Some(Due { at, ev, .. }) = w.queue.pop() {
        if at >= end.as_micros() {
            break;
        }
        if at / PROGRESS_EVERY_US != w.now.as_micros() / PROGRESS_EVERY_US {
            progress(at_of(Instant::from_micros(at)));
        }
        w.now = Instant::from_micros(at);
        w.stats.events += 1;
        w.handle(ev);
    }
    let simulated = at_of(end);
    let requests = ctx.requests.borrow().clone();
    let figures = figures(&requests, &trace, simulated);
    let mut report = Report {
        scenario: scenario.name.clone(),
        seed,
        simulated,
        wall: wall.elapsed(),
        trace_hash: trace.hash(),
        trace,
        requests,
        figures,
        violations: Vec::new(),
        dht: None,
    };
    report.violations = check(scenario, &report, &w.history, &ctx);
    report.dht = Some(std::mem::take(&mut w.stats));
    Ok(report)
}

impl World {
    fn push(&mut self, at: Instant, ev: Ev) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Due { at: at.as_micros().max(self.now.as_micros()), seq, ev });
    }

    /// Provider records live this long (the scenario's `record_ttl_ms`, production's by default).
    fn record_ttl_us(&self) -> u64 {
        self.scenario.tuning.record_ttl_ms * 1000
    }

    fn name(&self, ix: Ix) -> &str {
        &self.peers[ix].addr.peer.0
    }

    // ---- the network -------------------------------------------------------

    fn host_pair(&self, a: &str, b: &str) -> Option<(usize, usize)> {
        let (x, y) = (*self.host_ix.get(a)?, *self.host_ix.get(b)?);
        Some((x.min(y), x.max(y)))
    }

    /// The RTT between hosts `a` and `b` now, and whether a link or a place sets it.
    fn link(&self, a: usize, b: usize) -> (f64, bool) {
        let p = (a.min(b), a.max(b));
        if let Some(r) = self.rtt_override.get(&p).or_else(|| self.links.get(&p)) {
            return (*r, true);
        }
        match (self.places[a], self.places[b]) {
            (Some(x), Some(y)) => (plane_rtt_ms(self.scenario.default_rtt_ms, x, y), true),
            _ => (self.scenario.default_rtt_ms, false),
        }
    }

    fn rtt_ms(&self, a: usize, b: usize) -> f64 {
        self.link(a, b).0
    }

    /// What happens now to a message from host `a` to host `b`.
    fn transit(&mut self, a: usize, b: usize) -> Transit {
        if a == b {
            return Transit::After(Duration::ZERO);
        }
        if !self.hosts[a].up || !self.hosts[b].up {
            return Transit::Dropped;
        }
        let p = (a.min(b), a.max(b));
        if self.cut.contains(&p) {
            return Transit::Dropped;
        }
        if let Some(rate) = self.loss.get(&p) {
            let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if draw < *rate {
                return Transit::Lost;
            }
        }
        let (rtt, set) = self.link(a, b);
        let mut d = Duration::from_micros((rtt * 500.0).round().max(0.0) as u64);
        let jitter = self.scenario.jitter_ms;
        if jitter > 0 && !set {
            d += Duration::from_micros(self.rng.next_u64() % (jitter * 1000));
        }
        if let Some(j) = self.link_jitter.get(&(a.min(b), a.max(b))) {
            d += Duration::from_micros(self.rng.next_u64() % ((j * 1000.0) as u64).max(1));
        }
        Transit::After(d)
    }

    /// One-way delay from host `a` to host `b` now, `None` when the message is lost.
    fn one_way(&mut self, a: usize, b: usize) -> Option<Duration> {
        match self.transit(a, b) {
            Transit::After(d) => Some(d),
            Transit::Dropped | Transit::Lost => None,
        }
    }

    /// Send `msg` from peer `from` to the peer at `to`; lost if the link drops it.
    fn send(&mut self, from: Ix, to: Ix, msg: Msg) {
        self.send_after_loss(from, to, msg, MIN_RTO);
    }

    /// [`World::send`]; a stream message lost on a lossy link goes again after `rto`
    /// (doubling while it keeps being lost).
    fn send_after_loss(&mut self, from: Ix, to: Ix, msg: Msg, rto: Duration) {
        self.stats.messages += 1;
        let (a, b) = (self.peers[from].host, self.peers[to].host);
        match self.transit(a, b) {
            Transit::After(d) => self.push(self.now + d, Ev::Deliver { to, msg }),
            Transit::Lost if msg.on_stream() => {
                let next = (rto * 2).min(MAX_RTO);
                self.push(self.now + rto, Ev::Resend { from, to, msg, rto: next });
            }
            Transit::Lost | Transit::Dropped => {}
        }
    }

    fn peer_at(&self, addr: &PeerAddr) -> Option<Ix> {
        addr.addrs.first().and_then(|a| self.by_addr.get(a)).copied().filter(|ix| self.peers[*ix].alive)
    }

    // ---- hosts and peers -----------------------------------------------------

    fn start_host(&mut self, h: usize) {
        let name = self.hosts[h].name.clone();
        let incarnation = self.ctx.next_incarnation(&name);
        self.hosts[h].incarnation = incarnation;
        self.hosts[h].up = true;
        self.trace.push(at_of(self.now), &name, Kind::NodeStarted { incarnation });
        let role = self.scenario.nodes[h].role.clone();
        let peer = PeerId(name.clone());
        let addr = PeerAddr { peer: peer.clone(), addrs: vec![format!("{name}:{NODE_PORT}")] };
        let ix = match role {
            Role::Bootstrap => self.add_peer(addr, h, What::Bootstrap, None),
            role => {
                let mut config = self.ctx.node_config(&peer);
                let mut serves = false;
                match &role {
                    Role::Registry => config.registry = Some(self.ctx.signed_entries(&self.ctx.key("operator"), false)),
                    Role::Allocator(spec) => {
                        config.allocator = Some(self.ctx.allocator_config(spec));
                        let key = self.ctx.key(&name);
                        let grant = Grant::sign(peer.clone(), key.public(), &self.ctx.key("operator"));
                        config.trust.issuer = Issuer::allocator(key, grant).ok();
                    }
                    Role::Service { service } => {
                        config.trust.issuer = Some(Issuer::operator(self.ctx.key("operator")));
                        config.serve = Some(service.clone());
                        serves = true;
                    }
                    _ => {}
                }
                let node = Node::new(config, self.ctx.node_seed(&name), self.now);
                let ix = self.add_peer(addr, h, What::Main, Some(node));
                self.peers[ix].serves = serves;
                ix
            }
        };
        self.hosts[h].main = Some(ix);
    }

    fn add_peer(&mut self, addr: PeerAddr, host: usize, what: What, node: Option<Node>) -> Ix {
        let ix = self.peers.len();
        let is_boot = matches!(what, What::Bootstrap);
        let boots = self
            .bootstraps
            .iter()
            .map(|_| BootState {
                link: BootstrapLink::default(),
                awaiting: false,
                missed: 0,
                next_try: self.now,
                last_hello: self.now,
                epoch: None,
            })
            .collect();
        self.peers.push(Peer {
            kad: KadNode::new(addr.clone(), self.kad_config.clone()),
            addr: addr.clone(),
            host,
            what,
            node,
            alive: true,
            serves: false,
            next_wake: None,
            inbound: BTreeMap::new(),
            next_inbound: 0,
            queries: BTreeMap::new(),
            next_query: 0,
            boots: if is_boot { Vec::new() } else { boots },
            up: is_boot,
            http: BTreeMap::new(),
            instances: BTreeMap::new(),
            allocator_probes: 0,
        });
        self.by_addr.insert(addr.addrs[0].clone(), ix);
        self.by_id.insert(addr.peer.clone(), ix);
        if is_boot {
            // Bootstraps know each other from their configuration.
            for b in self.bootstraps.clone() {
                if let Some(&other) = self.by_id.get(&PeerId(b)) {
                    if other != ix && self.peers[other].alive {
                        let (a1, a2) = (self.peers[other].addr.clone(), addr.clone());
                        self.peers[ix].kad.saw(&a1, true);
                        self.peers[other].kad.saw(&a2, true);
                    }
                }
            }
        } else {
            self.boot_tick(ix);
            self.push(self.now + KAD_REFRESH, Ev::Refresh(ix));
        }
        if self.peers[ix].node.is_some() {
            self.drain(ix);
        }
        ix
    }

    fn kill(&mut self, ix: Ix) {
        let p = &mut self.peers[ix];
        if !p.alive {
            return;
        }
        p.alive = false;
        p.node = None;
        p.queries.clear();
        for inst in p.instances.values().flatten().copied().collect::<Vec<_>>() {
            self.kill(inst);
        }
    }

    fn crash_host(&mut self, h: usize) {
        if !self.hosts[h].up {
            return;
        }
        self.hosts[h].up = false;
        self.hosts[h].held.clear();
        self.hosts[h].hung = false;
        let on_host: Vec<Ix> = (0..self.peers.len()).filter(|i| self.peers[*i].host == h).collect();
        for ix in on_host {
            self.kill(ix);
        }
    }

    // ---- events ----------------------------------------------------------------

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(ix) => {
                if self.peers[ix].next_wake.is_some_and(|t| t <= self.now) {
                    self.peers[ix].next_wake = None;
                    self.input(ix, Input::Tick);
                }
            }
            Ev::Deliver { to, msg } => {
                if self.peers[to].alive {
                    self.deliver(to, msg);
                }
            }
            Ev::Resend { from, to, msg, rto } => {
                if self.peers[from].alive && self.peers[to].alive {
                    self.send_after_loss(from, to, msg, rto);
                }
            }
            Ev::Fault(i) => self.fault(i),
            Ev::Request(seq) => self.client_request(seq),
            Ev::GiveUp(seq) => {
                // A request whose client host crashed meanwhile stays pending, as in
                // the turmoil runs (its application went down with it).
                if self.http_of.get(&seq).is_some_and(|(ix, _)| !self.peers[*ix].alive) {
                    return;
                }
                let at = at_of(self.now);
                let mut requests = self.ctx.requests.borrow_mut();
                if let Some(r) = requests.get_mut(seq as usize).filter(|r| r.fate == Fate::Pending) {
                    r.fate = Fate::TimedOut;
                    let client = r.client.clone();
                    drop(requests);
                    self.trace.push(at, &client, Kind::TimedOut { seq });
                }
            }
            Ev::TryTimeout { seq, attempt } => {
                self.try_failed(seq, attempt, 504, "no response head within the try timeout")
            }
            Ev::BootDone { alloc, instance, service } => self.boot_done(alloc, instance, *service),
            Ev::KadTimeout { at, query, peer } => {
                if !self.peers[at].alive {
                    return;
                }
                let p = &mut self.peers[at];
                if let Some(q) = p.queries.get_mut(&query) {
                    q.lookup.failed(&peer);
                    p.kad.failed(&peer);
                    self.advance(at, query);
                }
            }
            Ev::FindDue { at, query } => {
                if self.peers[at].alive {
                    self.advance(at, query);
                }
            }
            Ev::BootTick(ix) => {
                if self.peers[ix].alive {
                    self.boot_tick(ix);
                }
            }
            Ev::AppCheck(ix) => {
                if self.peers[ix].alive {
                    let answered = !self.hosts[self.peers[ix].host].hung;
                    self.input(ix, Input::AppChecked { answered });
                    self.push(self.now + APP_CHECK, Ev::AppCheck(ix));
                }
            }
            Ev::Refresh(ix) => {
                if self.peers[ix].alive {
                    let key = self.peers[ix].kad.key;
                    self.start_query(ix, Rpc::FindNode(key), Purpose::Join);
                    self.push(self.now + KAD_REFRESH, Ev::Refresh(ix));
                }
            }
        }
    }

    fn deliver(&mut self, to: Ix, msg: Msg) {
        match msg {
            Msg::Req { from, reply, request } => {
                if let (Request::Ping { nonce }, false) = (&request, self.peers[to].serves) {
                    // Answered by the transport itself, as libp2p's ping.
                    let response = Response::Pong { nonce: *nonce };
                    return self.send(to, from, Msg::Resp { reply, response });
                }
                let Some(node) = self.peers[to].node.as_ref() else { return };
                let _ = node;
                let id = InboundId(self.peers[to].next_inbound);
                self.peers[to].next_inbound += 1;
                self.peers[to].inbound.insert(id, (from, reply));
                let from = self.peers[from].addr.peer.clone();
                self.input(to, Input::PeerRequest { id, from, request });
            }
            Msg::Resp { reply, response } => {
                let (op, result) = match reply {
                    ReplyTo::Op(op) => (op, OpResult::Response(response)),
                    ReplyTo::Probe { op, sent } => match response {
                        Response::Pong { .. } => (op, OpResult::Rtt(self.now.saturating_since(sent))),
                        Response::Error { reason } => (op, OpResult::Failed(reason)),
                        other => (op, OpResult::Failed(format!("unexpected answer to a ping: {other:?}"))),
                    },
                };
                self.input(to, Input::OpDone { op, result });
            }
            Msg::Kad { from, query, rpc } => {
                self.stats.kad_rpcs += 1;
                let ttl = self.record_ttl_us();
                let from_addr = self.peers[from].addr.clone();
                let now = self.now.as_micros();
                let answer = self.peers[to].kad.answer(now, ttl, &from_addr, rpc);
                let me = self.peers[to].addr.peer.clone();
                self.send(to, from, Msg::KadResp { query, from: me, answer });
            }
            Msg::KadResp { query, from, answer } => self.kad_answer(to, query, from, answer),
            Msg::Hello { from } => {
                let boot = self.bootstraps.iter().position(|b| *b == self.peers[to].addr.peer.0);
                if let Some(boot) = boot {
                    let epoch = self.hosts[self.peers[to].host].incarnation;
                    let a = self.peers[from].addr.clone();
                    self.peers[to].kad.saw(&a, true);
                    self.send(to, from, Msg::HelloAck { boot, epoch });
                }
            }
            Msg::HelloAck { boot, epoch } => self.hello_ack(to, boot, epoch),
            Msg::Tunnel { seq, attempt, client } => {
                let h = self.peers[to].host;
                if !self.peers[to].serves {
                    return self.send(to, client, Msg::TunnelRefused { seq, attempt });
                }
                if self.hosts[h].hung {
                    self.input(to, Input::TunnelServed);
                    self.hosts[h].held.push((to, Msg::Tunnel { seq, attempt, client }));
                    return;
                }
                self.input(to, Input::TunnelServed);
                self.input(to, Input::TunnelDone);
                let by = self.peers[to].addr.peer.clone();
                self.send(to, client, Msg::TunnelResp { seq, attempt, by });
            }
            Msg::TunnelResp { seq, attempt, by } => {
                let Some((_, req)) = self.http_of.get(&seq).copied() else { return };
                if self.peers[to].http.get(&req).is_some_and(|h| h.attempt == attempt) {
                    self.peers[to].http.remove(&req);
                    self.answer(seq, 200, Some(by.0));
                }
            }
            Msg::TunnelRefused { seq, attempt } => self.try_failed(seq, attempt, 502, "connection refused"),
        }
    }

    // ---- the core --------------------------------------------------------------

    fn input(&mut self, ix: Ix, input: Input) {
        let now = self.now;
        let Some(node) = self.peers[ix].node.as_mut() else { return };
        node.handle_input(now, input);
        self.drain(ix);
    }

    fn drain(&mut self, ix: Ix) {
        while let Some(out) = self.peers[ix].node.as_mut().and_then(|n| n.poll_output()) {
            if matches!(out, Output::Respond { .. } | Output::Event(_) | Output::Advertise { .. }) {
                let name = self.name(ix).to_string();
                self.trace.output_at(at_of(self.now), &name, &out);
            }
            self.execute(ix, out);
            if !self.peers[ix].alive {
                return;
            }
        }
        let Some(t) = self.peers[ix].node.as_ref().and_then(|n| n.poll_timeout()) else { return };
        let p = &mut self.peers[ix];
        if p.next_wake.is_none_or(|w| t < w || w < self.now) {
            p.next_wake = Some(t);
            self.push(t, Ev::Wake(ix));
        }
    }

    fn execute(&mut self, ix: Ix, out: Output) {
        match out {
            Output::Respond { req, outcome } => self.respond(ix, req, outcome),
            Output::FindProviders { op, key, timeout } => {
                let end = FindEnd::for_key(self.now, timeout, &key);
                let key_name = crate::trace::key_text(&key);
                let purpose = Purpose::Find { op, key: key_name, end, found: BTreeMap::new(), first: None };
                let key = kad::dht_key(&key);
                // Records this node holds itself count too (as libp2p's local store).
                let local: Vec<PeerId> = self.peers[ix].kad.store.get(&key, self.now.as_micros());
                let q = self.start_query(ix, Rpc::GetProviders { key }, purpose);
                if !local.is_empty() {
                    let addrs: Vec<PeerAddr> = local.iter().filter_map(|p| self.peers[ix].kad.addr_of(p)).collect();
                    self.found_providers(ix, q, addrs);
                }
            }
            Output::Probe { op, peer, .. } => {
                if let Some(to) = self.peer_at(&peer) {
                    if matches!(self.peers[to].what, What::Main) && self.is_allocator(to) {
                        self.peers[ix].allocator_probes += 1;
                        self.stats.allocator_probes += 1;
                    }
                    let request = Request::Ping { nonce: op.0 };
                    self.send(ix, to, Msg::Req { from: ix, reply: ReplyTo::Probe { op, sent: self.now }, request });
                }
            }
            Output::SendRequest { op, peer, request, .. } => {
                if let Some(to) = self.peer_at(&peer) {
                    self.send(ix, to, Msg::Req { from: ix, reply: ReplyTo::Op(op), request });
                }
            }
            Output::ReplyToPeer { id, response } => {
                if let Some((to, reply)) = self.peers[ix].inbound.remove(&id) {
                    if self.peers[to].alive {
                        self.send(ix, to, Msg::Resp { reply, response });
                    }
                }
            }
            Output::Advertise { key } => {
                let key = kad::dht_key(&key);
                self.start_query(ix, Rpc::FindNode(key), Purpose::Advertise { key });
            }
            Output::StartInstance { instance, service } => self.start_instance(ix, instance, service),
            Output::StopInstance { instance } => {
                if let Some(Some(inst)) = self.peers[ix].instances.remove(&instance) {
                    let host = self.hosts[self.peers[ix].host].name.clone();
                    let peer = self.name(inst).to_string();
                    self.trace.push(at_of(self.now), &host, Kind::Driver(format!("stop {peer}")));
                    self.kill(inst);
                }
            }
            Output::Event(Event::Allocated { allocator, .. }) => self.allocation_sample(ix, &allocator),
            Output::Event(Event::DiscoveryFinished { .. }) => self.peers[ix].allocator_probes = 0,
            Output::PersistRegistry { .. } | Output::ServeCredentials { .. } | Output::Event(_) => {}
        }
    }

    fn is_allocator(&self, ix: Ix) -> bool {
        matches!(self.scenario.nodes[self.peers[ix].host].role, Role::Allocator(_))
    }

    /// How close the chosen allocator is to the closest allocator reachable now.
    fn allocation_sample(&mut self, client: Ix, allocator: &PeerId) {
        let Some(&a) = self.by_id.get(allocator) else { return };
        let h = self.peers[client].host;
        let chosen = self.rtt_ms(h, self.peers[a].host);
        let best = (0..self.hosts.len())
            .filter(|x| self.hosts[*x].up && matches!(self.scenario.nodes[*x].role, Role::Allocator(_)))
            .filter(|x| !self.cut.contains(&(h.min(*x), h.max(*x))))
            .map(|x| self.rtt_ms(h, x))
            .fold(f64::INFINITY, f64::min);
        self.stats.allocations.push(AllocationSample {
            client: self.name(client).to_string(),
            chosen_rtt_ms: chosen,
            best_rtt_ms: best,
            probed: self.peers[client].allocator_probes,
        });
    }

    // ---- client requests and the tunnel ----------------------------------------------

    fn client_request(&mut self, seq: u64) {
        let r = self.ctx.requests.borrow()[seq as usize].clone();
        let Some(&h) = self.host_ix.get(&r.client) else { return };
        let Some(ix) = self.hosts[h].main.filter(|ix| self.peers[*ix].alive) else { return };
        self.trace.push(at_of(self.now), &r.client, Kind::Request { seq, service: r.service.clone() });
        self.push(self.now + r.deadline, Ev::GiveUp(seq));
        let req = ReqId(seq);
        let deadline = self.now + Duration::from_millis(self.scenario.tuning.request_deadline_ms);
        self.http_of.insert(seq, (ix, req));
        let state = HttpState {
            seq,
            service: r.service.clone(),
            deadline,
            attempt: 0,
            retried: false,
            first_failure: None,
            instance: None,
        };
        self.peers[ix].http.insert(req, state);
        self.input(ix, Input::HttpRequest { req, service: r.service, deadline });
    }

    fn respond(&mut self, ix: Ix, req: ReqId, outcome: Outcome) {
        let Some(state) = self.peers[ix].http.get_mut(&req) else { return };
        let seq = state.seq;
        match outcome {
            Outcome::Route { instance, service, try_timeout } => {
                state.attempt += 1;
                state.instance = Some((instance.peer.clone(), service));
                let attempt = state.attempt;
                let until = state.deadline.min(self.now + try_timeout);
                self.push(until, Ev::TryTimeout { seq, attempt });
                match self.peer_at(&instance) {
                    Some(to) => self.send(ix, to, Msg::Tunnel { seq, attempt, client: ix }),
                    None => {
                        // Nothing listens there any more: the host answers with a reset,
                        // unless it is down or cut off (then only the try timeout ends it).
                        let host = instance.addrs.first().and_then(|a| a.split(':').next()).unwrap_or_default();
                        if let Some(&h) = self.host_ix.get(host) {
                            if self.one_way(self.peers[ix].host, h).is_some() {
                                let rtt = Duration::from_micros((self.rtt_ms(self.peers[ix].host, h) * 1000.0) as u64);
                                self.push(
                                    self.now + rtt,
                                    Ev::Deliver { to: ix, msg: Msg::TunnelRefused { seq, attempt } },
                                );
                            }
                        }
                    }
                }
            }
            Outcome::Fail { status, .. } => {
                let status = state.first_failure.unwrap_or(status);
                self.peers[ix].http.remove(&req);
                self.answer(seq, status, None);
            }
        }
    }

    fn try_failed(&mut self, seq: u64, attempt: u32, status: u16, reason: &str) {
        let Some(&(ix, req)) = self.http_of.get(&seq) else { return };
        if !self.peers[ix].alive {
            return;
        }
        let Some(state) = self.peers[ix].http.get_mut(&req).filter(|s| s.attempt == attempt) else { return };
        let Some((peer, service)) = state.instance.take() else { return };
        let retry = !state.retried && self.now < state.deadline;
        let (name, deadline) = (state.service.clone(), state.deadline);
        if retry {
            state.retried = true;
            state.first_failure = Some(status);
        } else {
            self.peers[ix].http.remove(&req);
        }
        let reason = format!("{reason} ({peer})");
        self.input(ix, Input::RouteFailed { service, peer, reason });
        if retry {
            self.input(ix, Input::HttpRetry { req, service: name, deadline });
        } else {
            self.answer(seq, status, None);
        }
    }

    /// The client application got its answer.
    fn answer(&mut self, seq: u64, status: u16, served_by: Option<String>) {
        let at = at_of(self.now);
        let mut requests = self.ctx.requests.borrow_mut();
        let Some(r) = requests.get_mut(seq as usize).filter(|r| r.fate == Fate::Pending) else { return };
        let latency = at.saturating_sub(r.at);
        r.fate = Fate::Answered { status, served_by: served_by.clone(), latency };
        let client = r.client.clone();
        drop(requests);
        self.trace.push(at, &client, Kind::Response { seq, status, served_by, latency });
    }

    // ---- allocators' instances -------------------------------------------------------

    fn start_instance(&mut self, alloc: Ix, instance: InstanceId, service: ServiceInfo) {
        let h = self.peers[alloc].host;
        if instance.0 > MAX_INSTANCE_ID || self.peers[alloc].instances.contains_key(&instance) {
            let reason = format!("instance id {} refused by the simulated driver", instance.0);
            return self.input(alloc, Input::InstanceFailed { instance, reason });
        }
        self.peers[alloc].instances.insert(instance, None);
        let host = self.hosts[h].name.clone();
        let peer = format!("{host}~{}.i{}", self.hosts[h].incarnation, instance.0);
        let what = match &service.run {
            physarum_core::types::RunSpec::Image { image } => image.clone(),
            physarum_core::types::RunSpec::Exec { program, .. } => program.clone(),
        };
        self.trace.push(at_of(self.now), &host, Kind::Driver(format!("boot {peer} {} {what}", service.name)));
        let delay = self.ctx.boot_delays.borrow().get(&host).copied().unwrap_or_default();
        self.push(self.now + delay, Ev::BootDone { alloc, instance, service: Box::new(service) });
    }

    fn boot_done(&mut self, alloc: Ix, instance: InstanceId, service: ServiceInfo) {
        if !self.peers[alloc].alive || self.peers[alloc].instances.get(&instance) != Some(&None) {
            return;
        }
        let h = self.peers[alloc].host;
        let host = self.hosts[h].name.clone();
        let name = format!("{host}~{}.i{}", self.hosts[h].incarnation, instance.0);
        let peer = PeerId(name.clone());
        let mut config = self.ctx.node_config(&peer);
        config.serve = Some(service.name.clone());
        let port = INSTANCE_PORT_BASE + instance.0 as u16;
        let addr = PeerAddr { peer: peer.clone(), addrs: vec![format!("{host}:{port}")] };
        let node = Node::new(config, self.ctx.node_seed(&name), self.now);
        let ix = self.add_peer(addr.clone(), h, What::Instance { allocator: alloc, instance }, Some(node));
        self.peers[ix].serves = true;
        self.push(self.now + APP_CHECK, Ev::AppCheck(ix));
        self.peers[alloc].instances.insert(instance, Some(ix));
        self.ctx.instance_hosts.borrow_mut().insert(name.clone(), host.clone());
        self.trace.push(at_of(self.now), &host, Kind::Driver(format!("up {name}")));
        self.input(alloc, Input::InstanceStarted { instance, peer: addr });
    }

    // ---- bootstrap connections -------------------------------------------------------

    /// Once a second: judge the hellos sent a second ago, send keepalives and retries.
    fn boot_tick(&mut self, ix: Ix) {
        let now = self.now;
        let backoff = self.backoff.clone();
        let mut send_to = Vec::new();
        let mut lost = Vec::new();
        let node_up = self.peers[ix].up;
        for (b, s) in self.peers[ix].boots.iter_mut().enumerate() {
            if std::mem::take(&mut s.awaiting) {
                if s.link.is_connected() {
                    s.missed += 1;
                    if s.missed >= MAX_MISSED {
                        s.missed = 0;
                        s.next_try = now + s.link.lost(&backoff);
                        lost.push(b);
                    }
                } else {
                    match s.link.failed(&backoff, node_up) {
                        Retry::After(d) => s.next_try = now + d.saturating_sub(HELLO_TIMEOUT),
                        Retry::GiveUp => {}
                    }
                }
            }
            let due = match s.link.is_connected() {
                true => now >= s.last_hello + KEEPALIVE,
                false => !s.link.gave_up() && now >= s.next_try,
            };
            if due {
                s.awaiting = true;
                s.last_hello = now;
                send_to.push(b);
            }
        }
        let me = self.name(ix).to_string();
        for b in lost {
            let name = self.bootstraps[b].clone();
            self.trace.push(at_of(now), &me, Kind::Bootstrap(format!("lost {name}")));
        }
        if !self.peers[ix].up && startup_failed(self.peers[ix].boots.iter().map(|s| &s.link)) {
            let attempts = self.backoff.startup_attempts;
            let reason = format!("no bootstrap reachable after {attempts} attempts ({})", self.bootstraps.join(", "));
            self.trace.push(at_of(now), &me, Kind::NodeExited(reason));
            if let What::Instance { allocator, instance } = self.peers[ix].what {
                self.kill(ix);
                self.input(allocator, Input::InstanceExited { instance });
            }
            self.kill(ix);
            return;
        }
        for b in send_to {
            if let Some(&to) = self.by_id.get(&PeerId(self.bootstraps[b].clone())) {
                if self.peers[to].alive {
                    self.send(ix, to, Msg::Hello { from: ix });
                }
            }
        }
        self.push(now + HELLO_TIMEOUT, Ev::BootTick(ix));
    }

    fn hello_ack(&mut self, ix: Ix, boot: usize, epoch: u32) {
        let Some(s) = self.peers[ix].boots.get_mut(boot) else { return };
        s.awaiting = false;
        s.missed = 0;
        let restarted = s.epoch.is_some_and(|e| e != epoch);
        s.epoch = Some(epoch);
        let fresh = s.link.connected() || restarted;
        if !fresh {
            return;
        }
        let first = !self.peers[ix].up;
        self.peers[ix].up = true;
        if first {
            let backoff = self.backoff.clone();
            for s in self.peers[ix].boots.iter_mut() {
                if let Some(d) = s.link.revive(&backoff) {
                    s.next_try = self.now + d;
                }
            }
        }
        let name = self.bootstraps[boot].clone();
        let me = self.name(ix).to_string();
        self.trace.push(at_of(self.now), &me, Kind::Bootstrap(format!("connected {name}")));
        if let Some(&b) = self.by_id.get(&PeerId(name)) {
            let a = self.peers[b].addr.clone();
            self.peers[ix].kad.saw(&a, true);
        }
        let key = self.peers[ix].kad.key;
        self.start_query(ix, Rpc::FindNode(key), Purpose::Join);
        self.input(ix, Input::BootstrapConnected);
    }

    // ---- Kademlia lookups ------------------------------------------------------------

    fn start_query(&mut self, ix: Ix, rpc: Rpc, purpose: Purpose) -> u64 {
        let target = match &rpc {
            Rpc::FindNode(t) => *t,
            Rpc::GetProviders { key } | Rpc::AddProvider { key, .. } => *key,
        };
        let p = &mut self.peers[ix];
        let k = p.kad.config().k;
        let alpha = p.kad.config().alpha;
        let seeds = p.kad.closest(&target, k);
        let id = p.next_query;
        p.next_query += 1;
        if let Purpose::Find { end, .. } = &purpose {
            let due = end.poll_timeout();
            self.push(due, Ev::FindDue { at: ix, query: id });
        }
        let p = &mut self.peers[ix];
        p.queries.insert(id, Query { lookup: Lookup::new(target, seeds, k, alpha), rpc, purpose, started: self.now });
        self.advance(ix, id);
        id
    }

    fn kad_answer(&mut self, ix: Ix, query: u64, from: PeerId, answer: RpcAnswer) {
        let p = &mut self.peers[ix];
        let Some(q) = p.queries.get_mut(&query) else { return };
        if let Some(a) = p.kad.addr_of(&from) {
            p.kad.saw(&a, true);
        }
        for c in &answer.closer {
            p.kad.saw(c, false);
        }
        q.lookup.answered(&from, answer.closer);
        if !answer.providers.is_empty() {
            self.found_providers(ix, query, answer.providers);
        }
        self.advance(ix, query);
    }

    fn found_providers(&mut self, ix: Ix, query: u64, providers: Vec<PeerAddr>) {
        let now = self.now;
        let p = &mut self.peers[ix];
        for a in &providers {
            p.kad.saw(a, false);
        }
        if let Some(Query { purpose: Purpose::Find { end, found, first, .. }, .. }) = p.queries.get_mut(&query) {
            first.get_or_insert(now);
            let before = found.len();
            for a in providers {
                found.entry(a.peer.clone()).or_insert(a);
            }
            end.found(now, found.len() - before);
            let due = end.poll_timeout();
            self.push(due, Ev::FindDue { at: ix, query });
        }
    }

    /// Move a lookup on: send the RPCs it asks for, or finish it.
    fn advance(&mut self, ix: Ix, query: u64) {
        let now = self.now;
        let Some(q) = self.peers[ix].queries.get_mut(&query) else { return };
        let step = q.lookup.step();
        let exhausted = matches!(step, LookupStep::Done(_));
        if let Purpose::Find { end, .. } = &q.purpose {
            if end.is_over(now, exhausted) {
                return self.finish_find(ix, query);
            }
        }
        match step {
            LookupStep::Ask(peers) => {
                let rpc = q.rpc.clone();
                for peer in peers {
                    self.push(now + KAD_RPC_TIMEOUT, Ev::KadTimeout { at: ix, query, peer: peer.peer.clone() });
                    match self.peer_at(&peer) {
                        Some(to) => self.send(ix, to, Msg::Kad { from: ix, query, rpc: rpc.clone() }),
                        None => self.stats.messages += 1,
                    }
                }
            }
            LookupStep::Wait => {}
            LookupStep::Done(closest) => {
                let Some(q) = self.peers[ix].queries.remove(&query) else { return };
                if let Purpose::Advertise { key } = q.purpose {
                    let me = self.peers[ix].addr.clone();
                    // The record goes on the k closest that answered; ourselves too if we are among them.
                    let expires = now.as_micros() + self.record_ttl_us();
                    self.peers[ix].kad.store.put(key, me.peer.clone(), now.as_micros(), expires);
                    for c in closest {
                        if let Some(to) = self.peer_at(&c) {
                            let rpc = Rpc::AddProvider { key, provider: me.clone() };
                            self.send(ix, to, Msg::Kad { from: ix, query: u64::MAX, rpc });
                        }
                    }
                }
            }
        }
    }

    fn finish_find(&mut self, ix: Ix, query: u64) {
        let Some(q) = self.peers[ix].queries.remove(&query) else { return };
        let Purpose::Find { op, key, found, first, .. } = q.purpose else { return };
        let me = self.peers[ix].addr.peer.clone();
        let providers: Vec<PeerAddr> = found.into_values().filter(|p| p.peer != me).collect();
        self.stats.lookups.push(LookupSample {
            key,
            rpcs: q.lookup.rpcs,
            hops: q.lookup.hops,
            providers: providers.len(),
            took: self.now.saturating_since(q.started),
            first: first.map(|t| t.saturating_since(q.started)),
        });
        self.input(ix, Input::OpDone { op, result: OpResult::Providers(providers) });
    }

    // ---- faults ------------------------------------------------------------------------

    fn fault(&mut self, i: usize) {
        let fault = self.schedule[i].fault.clone();
        let at = at_of(self.now);
        self.trace.push(at, "sim", Kind::Fault(fault.describe()));
        self.history.note(at, &fault);
        let host = |w: &Self, n: &str| w.host_ix.get(n).copied();
        match &fault {
            Fault::Partition { a, b } | Fault::Repair { a, b } => {
                for x in a {
                    for y in b.iter().filter(|y| *y != x) {
                        let Some(p) = self.host_pair(x, y) else { continue };
                        match fault {
                            Fault::Partition { .. } => self.cut.insert(p),
                            _ => self.cut.remove(&p),
                        };
                    }
                }
            }
            Fault::Crash { node } | Fault::BootstrapDown { node } => {
                if let Some(h) = host(self, node) {
                    self.crash_host(h);
                }
            }
            Fault::Restart { node } | Fault::BootstrapUp { node } => {
                if let Some(h) = host(self, node).filter(|h| !self.hosts[*h].up) {
                    self.start_host(h);
                }
            }
            Fault::Latency { a, b, rtt_ms } => {
                if let Some(p) = self.host_pair(a, b) {
                    self.rtt_override.insert(p, *rtt_ms);
                }
            }
            Fault::LatencySweep { .. } | Fault::LatencyWave { .. } => unreachable!("expanded before the run"),
            Fault::Loss { a, b, rate } => {
                if let Some(p) = self.host_pair(a, b) {
                    self.loss.insert(p, *rate);
                }
            }
            Fault::SlowStart { node, boot_delay_ms } => {
                self.ctx.boot_delays.borrow_mut().insert(node.clone(), Duration::from_millis(*boot_delay_ms));
            }
            Fault::HangApps { node } | Fault::ResumeApps { node } => {
                let Some(h) = host(self, node) else { return };
                let hung = matches!(fault, Fault::HangApps { .. });
                if self.hosts[h].hung == hung {
                    return;
                }
                self.hosts[h].hung = hung;
                let what = if hung { "hang" } else { "resume" };
                let apps: Vec<String> = (0..self.peers.len())
                    .filter(|ix| self.peers[*ix].alive && self.peers[*ix].serves && self.peers[*ix].host == h)
                    .map(|ix| self.name(ix).to_string())
                    .collect();
                for app in apps {
                    self.trace.push(at, node, Kind::Driver(format!("{what} {app}")));
                }
                if !hung {
                    for (to, msg) in std::mem::take(&mut self.hosts[h].held) {
                        if self.peers[to].alive {
                            self.input(to, Input::TunnelDone);
                            if let Msg::Tunnel { seq, attempt, client } = msg {
                                let by = self.peers[to].addr.peer.clone();
                                self.send(to, client, Msg::TunnelResp { seq, attempt, by });
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScenarioBuilder;

    fn small() -> Scenario {
        ScenarioBuilder::new("des-small", 30_000)
            .service("echo", 20, 200)
            .bootstrap("boot1")
            .bootstrap("boot2")
            .registry("reg")
            .allocator("alloc1")
            .allocator("alloc2")
            .client("c1")
            .client("c2")
            .link("c1", "alloc1", 0.4)
            .link("c1", "alloc2", 3.0)
            .link("c2", "alloc2", 0.6)
            .link("c2", "alloc1", 5.0)
            .requests("c1", "echo", 2000, 20_000, 5.0)
            .requests("c2", "echo", 2000, 20_000, 5.0)
            .build()
            .unwrap()
    }

    #[test]
    fn requests_are_served_by_the_closest_allocators_instances() {
        let r = run_des(&small(), 1).unwrap();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.figures.ok, r.figures.sent, "{}", r.summary());
        // Sub-millisecond links are told apart: each client lands on its nearer allocator.
        for (client, host) in [("c1", "alloc1"), ("c2", "alloc2")] {
            let served: Vec<String> = r
                .requests
                .iter()
                .filter(|q| q.client == client)
                .filter_map(|q| match &q.fate {
                    Fate::Answered { served_by: Some(b), .. } => Some(b.split('~').next().unwrap().to_string()),
                    _ => None,
                })
                .collect();
            assert!(!served.is_empty() && served.iter().all(|h| h == host), "{client}: {served:?}");
        }
        // p50 is one round trip to a sub-millisecond instance, in simulated time.
        assert!(r.figures.p50 < Duration::from_millis(1), "{:?}", r.figures.p50);
        let dht = r.dht.as_ref().unwrap();
        // Lookups asked peers (all but those made before the node had joined).
        assert!(dht.lookups.iter().filter(|l| l.rpcs > 0).count() * 2 > dht.lookups.len(), "{:?}", dht.lookups);
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let a = run_des(&small(), 9).unwrap();
        let b = run_des(&small(), 9).unwrap();
        assert_eq!(a.trace_hash, b.trace_hash);
    }

    #[test]
    fn a_crashed_allocator_is_replaced_and_no_bootstrap_is_a_clear_exit() {
        let mut s = small();
        s.schedule.push(crate::scenario::Scheduled { at_ms: 10_000, fault: Fault::Crash { node: "alloc1".into() } });
        let r = run_des(&s, 2).unwrap();
        let late_ok =
            r.requests.iter().filter(|q| q.client == "c1" && q.at > Duration::from_secs(13) && q.ok()).count();
        assert!(late_ok > 30, "c1 recovers on alloc2: {}\n{}", late_ok, r.timeline());
        let lonely = ScenarioBuilder::new("lonely", 60_000).bootstrap("boot1").client("c").build().unwrap();
        let mut lonely = lonely;
        lonely
            .schedule
            .push(crate::scenario::Scheduled { at_ms: 0, fault: Fault::BootstrapDown { node: "boot1".into() } });
        let r = run_des(&lonely, 1).unwrap();
        let exit = r.records().into_iter().find(|x| matches!(x.kind, Kind::NodeExited(_))).expect("the client exits");
        // Five attempts, 2 + 4 + 8 + 16 s apart.
        assert!(exit.at >= Duration::from_secs(30) && exit.at <= Duration::from_secs(32), "{:?}", exit.at);
    }
}
