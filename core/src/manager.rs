//! The LCA manager inside every proxy: find or allocate an instance for each client
//! request (DESIGN.md §2), keep the peer cache fresh, and, in service mode,
//! advertise the served service and answer idle queries.
//!
//! Requests for one service share one discovery. A discovery runs up to
//! `attempts` rounds of: find providers → probe them within one shared budget →
//! use the best, or (none usable / best too slow) ask the closest allocators for a
//! new instance → dial the instance the allocator names directly → if that fails,
//! re-find with backoff. Every accepted request gets exactly one
//! [`ManagerOutput::Respond`] no later than its deadline.
//!
//! An instance that showed no valid credentials ([`Manager::untrusted`]) is
//! evicted and skipped for [`UNTRUSTED_FOR`]: it is neither probed nor accepted
//! from an allocator, so a rogue provider cannot win a discovery by answering fast.

use crate::config::{ManagerConfig, PeerCacheConfig};
use crate::io::{Event, OpResult, Outcome};
use crate::peer_cache::{PeerCache, PeerCacheOutput};
use crate::perf::{Class, PerfSample, Requirements};
use crate::placement::{Candidate, Choosing, Load};
use crate::registry_cache::Resolution;
use crate::resilience::{Ejections, RetryBudget, FAILED_A_REQUEST};
use crate::time::{earliest, Instant};
use crate::types::{ContentHash, DhtKey, PeerAddr, PeerId, ReqId, ServiceInfo};
use crate::wire::{Request, Response};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How long a peer that failed the trust check is skipped (it shares the bounded
/// ejection list with peers that failed a request).
pub const UNTRUSTED_FOR: Duration = Duration::from_secs(600);
/// Why a peer that failed the trust check is ejected.
const FAILED_TRUST: &str = "failed the trust check";
/// Service infos of cached services kept before those with no cached instance are dropped.
const KNOWN_KEEP: usize = 256;
/// "For good" (the `eject_forever` defect).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// An instance counts the requests it began in windows this long and reports those of
/// the current and the previous window as its recent load.
const LOAD_WINDOW: Duration = Duration::from_secs(10);
/// Shortest interval between two copies of a control message (a zero setting would
/// send copies at one instant forever).
const MIN_RETRY: Duration = Duration::from_millis(1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagerOutput {
    Respond {
        req: ReqId,
        outcome: Outcome,
    },
    /// Resolve a service name through the registry cache.
    Resolve {
        name: String,
    },
    Find {
        token: u64,
        key: DhtKey,
        timeout: Duration,
    },
    Probe {
        token: u64,
        peer: PeerAddr,
        timeout: Duration,
    },
    Send {
        token: u64,
        peer: PeerAddr,
        request: Request,
        timeout: Duration,
    },
    Advertise {
        key: DhtKey,
    },
    Event(Event),
}

/// Why a discovery runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Purpose {
    /// Requests are waiting for an instance.
    Serve,
    /// The cached `current` instance has been too slow for a while: find one with a
    /// lower RTT than its `rtt`, or keep it.
    SeekBetter { current: PeerId, rtt: Duration },
}

/// A candidate with its measured RTT and when it was measured.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Measured {
    peer: PeerAddr,
    rtt: Duration,
    at: Instant,
}

/// What to do with a candidate once a fresh probe confirms it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Choose it: cache it and route everyone waiting; the discovery ends.
    Choose,
    /// Route everyone waiting to it now, and go on looking for a better one.
    ServeMeanwhile,
}

/// A start request to one allocator, sent again while unanswered (see
/// [`ManagerConfig::control_retry`]); the first answer to any copy counts.
#[derive(Clone, Debug)]
struct Asking {
    /// Copies sent and not yet failed.
    tokens: std::collections::BTreeSet<u64>,
    deadline: Instant,
    retry_at: Instant,
    retry_delay: Duration,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Between two steps: the phase has been taken out to be advanced, and the next
    /// one is put in before the call returns.
    Deciding,
    FindingInstances {
        token: u64,
    },
    ProbingInstances(ProbeRound),
    FindingAllocators {
        token: u64,
    },
    ProbingAllocators(ProbeRound),
    /// Asked `order[next - 1]`; the rest of `order` is asked in turn on refusal.
    Allocating {
        order: Vec<Measured>,
        next: usize,
        asking: Asking,
    },
    /// Probing `candidate` again, its last measurement being too old to act on.
    Confirming {
        token: u64,
        candidate: PeerAddr,
        then: Then,
    },
    /// Dialling the instance an allocator just started.
    ProbingNew {
        token: u64,
        instance: PeerAddr,
    },
    /// Backing off before re-finding the new instance in the DHT.
    RefindWait {
        until: Instant,
        tries: u32,
    },
    Refinding {
        token: u64,
        tries: u32,
    },
    ProbingRefound {
        round: ProbeRound,
        tries: u32,
    },
}

/// Probes sent to a set of candidates, sharing one deadline. Candidates that have
/// not answered are probed again at `retry_at` (a lost probe is not a lost candidate).
/// When the placement policy weighs load, each candidate is also asked for it once.
#[derive(Clone, Debug, Default)]
struct ProbeRound {
    /// Outstanding probes: token → candidate (a candidate probed twice has two).
    pending: BTreeMap<u64, PeerAddr>,
    answered: Vec<Measured>,
    /// Outstanding load queries, and the loads reported.
    load_pending: BTreeMap<u64, PeerId>,
    loads: BTreeMap<PeerId, Load>,
    deadline: Instant,
    retry_at: Instant,
    retry_delay: Duration,
}

impl ProbeRound {
    fn is_done(&self, now: Instant) -> bool {
        (self.pending.is_empty() && self.load_pending.is_empty()) || now >= self.deadline
    }

    /// Candidates still waited for, once each.
    fn unanswered(&self) -> Vec<PeerAddr> {
        let mut seen = std::collections::BTreeSet::new();
        self.pending.values().filter(|p| seen.insert(p.peer.clone())).cloned().collect()
    }
}

#[derive(Clone, Debug)]
struct Discovery {
    info: ServiceInfo,
    requirements: Requirements,
    purpose: Purpose,
    waiters: Vec<ReqId>,
    attempt: u32,
    started: Instant,
    /// The best instance found but over the soft limit: kept if no allocator does better
    /// (probed again first if its measurement is old).
    fallback: Option<Measured>,
    allocated: bool,
    phase: Phase,
}

#[derive(Clone, Debug)]
struct PendingRequest {
    service: String,
    deadline: Instant,
}

/// Service mode state.
#[derive(Clone, Debug)]
struct Serving {
    name: String,
    info: Option<ServiceInfo>,
    last_served: Instant,
    next_advertise: Instant,
    /// Tunnelled requests being served now: the instance is not idle while any are.
    in_flight: u32,
    /// Requests begun in the window starting at `window_start`, and in the one before.
    window_start: Instant,
    this_window: u32,
    last_window: u32,
    /// Application checks failed in a row.
    failed_checks: u32,
}

pub struct Manager {
    config: ManagerConfig,
    defaults: Requirements,
    local: PeerId,
    cache: PeerCache,
    /// Requests accepted and not yet answered.
    requests: BTreeMap<ReqId, PendingRequest>,
    /// Requests waiting for their service name to resolve, by name.
    resolving: BTreeMap<String, Vec<ReqId>>,
    /// At most one discovery per service name.
    discoveries: BTreeMap<String, Discovery>,
    /// Which discovery each outstanding operation belongs to.
    ops: BTreeMap<u64, String>,
    /// Peer-cache probe tokens, mapped to our own op tokens.
    cache_probes: BTreeMap<u64, u64>,
    /// Service info of everything we cached an instance of (for seek-better rounds).
    known: BTreeMap<ContentHash, ServiceInfo>,
    next_token: u64,
    serving: Option<Serving>,
    retry_budget: RetryBudget,
    /// Peers that failed a request or the trust check, not picked again for a while.
    ejected: Ejections,
    out: VecDeque<ManagerOutput>,
}

impl Manager {
    pub fn new(
        config: ManagerConfig,
        cache_config: PeerCacheConfig,
        defaults: Requirements,
        local: PeerId,
        serve: Option<String>,
        now: Instant,
    ) -> Self {
        let cache = PeerCache::new(cache_config, config.soft_grace);
        let mut m = Manager {
            config,
            defaults,
            local,
            cache,
            requests: BTreeMap::new(),
            resolving: BTreeMap::new(),
            discoveries: BTreeMap::new(),
            ops: BTreeMap::new(),
            cache_probes: BTreeMap::new(),
            known: BTreeMap::new(),
            next_token: 0,
            serving: None,
            retry_budget: RetryBudget::default(),
            ejected: Ejections::default(),
            out: VecDeque::new(),
        };
        if let Some(name) = serve {
            m.out.push_back(ManagerOutput::Resolve { name: name.clone() });
            m.serving = Some(Serving {
                name,
                info: None,
                last_served: now,
                next_advertise: now,
                in_flight: 0,
                window_start: now,
                this_window: 0,
                last_window: 0,
                failed_checks: 0,
            });
        }
        m
    }

    pub fn peer_cache(&self) -> &PeerCache {
        &self.cache
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn respond(&mut self, req: ReqId, outcome: Outcome) {
        if self.requests.remove(&req).is_some() {
            self.out.push_back(ManagerOutput::Respond { req, outcome });
        }
    }

    fn fail(&mut self, req: ReqId, status: u16, reason: String) {
        self.respond(req, Outcome::Fail { status, reason });
    }

    // ---- client requests -------------------------------------------------

    /// A client request for `service` (`retry`: a request whose try failed, routed
    /// again only while the retry budget lasts, else answered 503 at once).
    /// `resolution` is the registry cache's answer when it had one at hand; otherwise
    /// the request waits for [`Self::resolved`].
    pub fn http_request(
        &mut self,
        now: Instant,
        req: ReqId,
        service: String,
        deadline: Instant,
        resolution: Option<Resolution>,
        retry: bool,
    ) {
        if retry {
            return self.retry(now, req, service, deadline, resolution);
        }
        if now >= deadline {
            self.out.push_back(ManagerOutput::Respond {
                req,
                outcome: Outcome::Fail { status: 504, reason: "request deadline already passed".into() },
            });
            return;
        }
        self.retry_budget.record_request(now, &self.config.resilience);
        self.accept(now, req, service, deadline, resolution);
    }

    fn retry(&mut self, now: Instant, req: ReqId, service: String, deadline: Instant, resolution: Option<Resolution>) {
        if now >= deadline || !self.retry_budget.try_spend(now, &self.config.resilience) {
            self.out.push_back(ManagerOutput::Event(Event::RetryRefused { service: service.clone() }));
            let reason = match now >= deadline {
                true => "no time left for a retry".to_string(),
                false => "not retried: the proxy's retry budget is spent".to_string(),
            };
            self.out.push_back(ManagerOutput::Respond { req, outcome: Outcome::Fail { status: 503, reason } });
            return;
        }
        self.out.push_back(ManagerOutput::Event(Event::Retried { service: service.clone() }));
        self.accept(now, req, service, deadline, resolution);
    }

    fn accept(&mut self, now: Instant, req: ReqId, service: String, deadline: Instant, resolution: Option<Resolution>) {
        self.requests.insert(req, PendingRequest { service: service.clone(), deadline });
        match resolution {
            Some(r) => self.proceed(now, req, &service, r),
            None => {
                let waiting = self.resolving.entry(service.clone()).or_default();
                waiting.push(req);
                if waiting.len() == 1 {
                    self.out.push_back(ManagerOutput::Resolve { name: service });
                }
            }
        }
    }

    /// The registry cache resolved `name`.
    pub fn resolved(&mut self, now: Instant, name: &str, resolution: Resolution) {
        if let Some(s) = self.serving.as_mut().filter(|s| s.name == name) {
            // Advertise at once only what is new: the registry cache confirms names in use every second.
            if let Resolution::Found(info) = &resolution {
                if s.info.as_ref() != Some(info) {
                    s.info = Some(info.clone());
                    s.next_advertise = now;
                }
            }
        }
        for req in self.resolving.remove(name).unwrap_or_default() {
            self.proceed(now, req, name, resolution.clone());
        }
    }

    fn proceed(&mut self, now: Instant, req: ReqId, name: &str, resolution: Resolution) {
        let info = match resolution {
            Resolution::Found(info) => info,
            Resolution::Unknown => {
                return self.fail(req, 404, format!("unknown service '{name}': it is not in the registry"));
            }
            Resolution::Unavailable(e) => {
                return self.fail(req, 503, format!("cannot resolve service '{name}': registry unavailable: {e}"));
            }
        };
        if let Some(entry) = self.cache.lookup(&info.hash) {
            let instance = entry.peer.clone();
            self.out.push_back(ManagerOutput::Event(Event::CacheHit {
                service: name.to_string(),
                instance: instance.peer.clone(),
            }));
            let try_timeout = self.config.resilience.try_timeout(&info.requirements.or(self.defaults));
            return self.respond(req, Outcome::Route { instance, service: info.hash, try_timeout });
        }
        match self.discoveries.get_mut(name) {
            Some(_) if self.config.defects.drop_joining_requests => {
                self.requests.remove(&req);
            }
            Some(d) => d.waiters.push(req),
            None => self.start_discovery(now, info, Purpose::Serve, vec![req]),
        }
    }

    /// Forwarding to `peer` failed: it is no longer trusted for `service`.
    pub fn route_failed(&mut self, now: Instant, service: &ContentHash, peer: &PeerId, reason: &str) {
        match self.config.defects.eject_forever {
            true => self.ejected.eject_for(now, peer, FOREVER, self.config.resilience.max_ejected, FAILED_A_REQUEST),
            false => self.ejected.eject(now, peer, &self.config.resilience),
        }
        self.cache.remove(service, peer, &format!("request failed: {reason}"));
        self.drain_cache(now);
    }

    /// `peer` showed no valid credentials for `service`: evict it and skip it for a while.
    pub fn untrusted(&mut self, now: Instant, service: &ContentHash, peer: &PeerId, reason: &str) {
        self.cache.remove(service, peer, &format!("untrusted: {reason}"));
        let max = self.config.resilience.max_ejected;
        self.ejected.eject_for(now, peer, UNTRUSTED_FOR, max, FAILED_TRUST);
        self.out.push_back(ManagerOutput::Event(Event::Untrusted {
            service: service.clone(),
            peer: peer.clone(),
            reason: reason.to_string(),
        }));
        self.drain_cache(now);
    }

    // ---- discovery -------------------------------------------------------

    fn start_discovery(&mut self, now: Instant, info: ServiceInfo, purpose: Purpose, waiters: Vec<ReqId>) {
        let requirements = info.requirements.or(self.defaults);
        let name = info.name.clone();
        let d = Discovery {
            info,
            requirements,
            purpose,
            waiters,
            attempt: 0,
            started: now,
            fallback: None,
            allocated: false,
            phase: Phase::Deciding, // `find_instances` sets the first step
        };
        self.discoveries.insert(name.clone(), d);
        self.find_instances(&name);
    }

    fn find_instances(&mut self, name: &str) {
        let token = self.token();
        let Some(d) = self.discoveries.get_mut(name) else { return };
        d.fallback = None;
        d.phase = Phase::FindingInstances { token };
        let key = DhtKey::Service(d.info.hash.clone());
        self.ops.insert(token, name.to_string());
        self.out.push_back(ManagerOutput::Find { token, key, timeout: self.config.find_timeout });
    }

    fn find_allocators(&mut self, name: &str) {
        let token = self.token();
        let Some(d) = self.discoveries.get_mut(name) else { return };
        d.phase = Phase::FindingAllocators { token };
        self.ops.insert(token, name.to_string());
        self.out.push_back(ManagerOutput::Find { token, key: DhtKey::Allocators, timeout: self.config.find_timeout });
    }

    /// Probe `peers` (minus ourselves) within the shared budget.
    fn probe_round(&mut self, now: Instant, name: &str, peers: Vec<PeerAddr>, timeout: Duration) -> ProbeRound {
        let retry_delay = self.config.control_retry.max(MIN_RETRY);
        let mut round =
            ProbeRound { deadline: now + timeout, retry_at: now + retry_delay, retry_delay, ..ProbeRound::default() };
        let mut seen = std::collections::BTreeSet::new();
        for peer in peers {
            if peer.peer == self.local || self.ejected.is_ejected(now, &peer.peer) || !seen.insert(peer.peer.clone()) {
                continue;
            }
            if self.config.placement.0.wants_load() {
                let token = self.token();
                self.ops.insert(token, name.to_string());
                round.load_pending.insert(token, peer.peer.clone());
                let request = Request::Load;
                self.out.push_back(ManagerOutput::Send { token, peer: peer.clone(), request, timeout });
            }
            self.probe_candidate(name, &mut round, peer, timeout);
        }
        round
    }

    /// The answered candidates of `round` in the placement policy's order.
    fn ranked(&self, round: &ProbeRound, choosing: Choosing, reqs: &Requirements) -> Vec<Measured> {
        let mut v = round.answered.clone();
        self.config.placement.order(choosing, reqs, &mut v, |m| Candidate {
            peer: &m.peer.peer,
            rtt: m.rtt,
            load: round.loads.get(&m.peer.peer).copied(),
        });
        v
    }

    fn probe_candidate(&mut self, name: &str, round: &mut ProbeRound, peer: PeerAddr, timeout: Duration) {
        let token = self.token();
        self.ops.insert(token, name.to_string());
        round.pending.insert(token, peer.clone());
        self.out.push_back(ManagerOutput::Probe { token, peer, timeout });
    }

    /// Probe again, within the round's deadline, the candidates that have not answered.
    fn retry_round(&mut self, now: Instant, name: &str, mut round: ProbeRound) -> ProbeRound {
        if now < round.retry_at || round.is_done(now) {
            return round;
        }
        let timeout = round.deadline.saturating_since(now);
        for peer in round.unanswered() {
            self.probe_candidate(name, &mut round, peer, timeout);
        }
        round.retry_delay = round.retry_delay.saturating_mul(2);
        round.retry_at = now + round.retry_delay;
        round
    }

    /// The result of an operation this manager asked for.
    pub fn op_done(&mut self, now: Instant, token: u64, result: OpResult) {
        if let Some(cache_token) = self.cache_probes.remove(&token) {
            let rtt = match &result {
                OpResult::Rtt(rtt) => Some(*rtt),
                _ => None,
            };
            self.cache.probe_result(now, cache_token, rtt);
            self.drain_cache(now);
            return;
        }
        let Some(name) = self.ops.remove(&token) else { return };
        let Some(d) = self.discoveries.get_mut(&name) else { return };
        let phase = std::mem::replace(&mut d.phase, Phase::Deciding);
        self.advance(now, &name, phase, Some((token, result)));
    }

    /// Move discovery `name` on from `phase`, given an operation result (or none,
    /// when only time passed).
    fn advance(&mut self, now: Instant, name: &str, phase: Phase, result: Option<(u64, OpResult)>) {
        let budget = self.config.probe_budget;
        match (phase, result) {
            (Phase::FindingInstances { token }, Some((t, result))) if t == token => {
                let providers = providers_of(result);
                if providers.is_empty() {
                    return self.find_allocators(name);
                }
                let round = self.probe_round(now, name, providers, budget);
                self.set_phase(name, Phase::ProbingInstances(round));
                self.check_round(now, name);
            }
            (Phase::ProbingInstances(round), r) => {
                let round = self.retry_round(now, name, record_probe(round, r, now));
                self.set_phase(name, Phase::ProbingInstances(round));
                self.check_round(now, name);
            }
            (Phase::FindingAllocators { token }, Some((t, result))) if t == token => {
                let allocators = providers_of(result);
                if allocators.is_empty() {
                    return self.no_allocation(now, name, "no allocator found in the DHT".into());
                }
                let round = self.probe_round(now, name, allocators, budget);
                self.set_phase(name, Phase::ProbingAllocators(round));
                self.check_round(now, name);
            }
            (Phase::ProbingAllocators(round), r) => {
                let round = self.retry_round(now, name, record_probe(round, r, now));
                self.set_phase(name, Phase::ProbingAllocators(round));
                self.check_round(now, name);
            }
            (Phase::Allocating { order, next, mut asking }, Some((t, result))) if asking.tokens.contains(&t) => {
                let Some(allocator) = next.checked_sub(1).and_then(|i| order.get(i)).map(|a| a.peer.clone()) else {
                    // Cannot happen (`next` counts the allocators asked); fail the round rather than stall.
                    return self.attempt_failed(now, name, "allocator bookkeeping out of range".into());
                };
                let service = name.to_string();
                match result {
                    // An allocator that hands back an instance we ejected (it reuses its
                    // running instance) cannot help: ask the next one. But when no
                    // allocator is left to ask, ejection would turn one failed request into
                    // an outage: as Envoy's panic routing, a fresh probe decides instead.
                    OpResult::Response(Response::Allocated { instance })
                        if self.ejected.is_ejected(now, &instance.peer)
                            && !self.last_resort(now, &instance.peer, next, order.len()) =>
                    {
                        let why = self.ejected.why(now, &instance.peer).unwrap_or_default();
                        let reason = format!("offered instance {}, which {why}", instance.peer);
                        self.out.push_back(ManagerOutput::Event(Event::AllocationRefused {
                            service,
                            allocator: allocator.peer,
                            reason: reason.clone(),
                        }));
                        self.ask_next_allocator(now, name, order, next, reason);
                    }
                    OpResult::Response(Response::Allocated { instance }) => {
                        self.out.push_back(ManagerOutput::Event(Event::Allocated {
                            service,
                            allocator: allocator.peer,
                            instance: instance.peer.clone(),
                        }));
                        let token = self.token();
                        self.ops.insert(token, name.to_string());
                        let timeout = self.requirements_of(name).probe_timeout();
                        if self.ejected.is_ejected(now, &instance.peer) {
                            // The last resort: chosen only if it answers now.
                            self.set_phase(
                                name,
                                Phase::Confirming { token, candidate: instance.clone(), then: Then::Choose },
                            );
                            self.out.push_back(ManagerOutput::Probe { token, peer: instance, timeout });
                            return;
                        }
                        if let Some(d) = self.discoveries.get_mut(name) {
                            d.allocated = true;
                        }
                        self.set_phase(name, Phase::ProbingNew { token, instance: instance.clone() });
                        self.out.push_back(ManagerOutput::Probe { token, peer: instance, timeout });
                    }
                    // A copy failed (timed out at the deadline, or could not be sent);
                    // the others may still be answered.
                    OpResult::Failed(_) if asking.tokens.len() > 1 => {
                        asking.tokens.remove(&t);
                        self.set_phase(name, Phase::Allocating { order, next, asking });
                    }
                    other => {
                        let reason = match other {
                            OpResult::Response(Response::Refused { reason } | Response::Error { reason }) => reason,
                            OpResult::Failed(e) => e,
                            unexpected => format!("unexpected answer {unexpected:?}"),
                        };
                        self.out.push_back(ManagerOutput::Event(Event::AllocationRefused {
                            service,
                            allocator: allocator.peer,
                            reason: reason.clone(),
                        }));
                        self.ask_next_allocator(now, name, order, next, reason);
                    }
                }
            }
            (Phase::Allocating { order, next, mut asking }, None)
                if now >= asking.retry_at && now < asking.deadline =>
            {
                // No answer yet: the request or its answer may have been lost. Send it again.
                if let Some(allocator) = next.checked_sub(1).and_then(|i| order.get(i)).map(|a| a.peer.clone()) {
                    let token = self.token();
                    self.ops.insert(token, name.to_string());
                    asking.tokens.insert(token);
                    let timeout = asking.deadline.saturating_since(now);
                    let request = Request::Allocate { service: name.to_string() };
                    self.out.push_back(ManagerOutput::Send { token, peer: allocator, request, timeout });
                }
                asking.retry_delay = asking.retry_delay.saturating_mul(2);
                asking.retry_at = now + asking.retry_delay;
                self.set_phase(name, Phase::Allocating { order, next, asking });
            }
            (Phase::ProbingNew { token, instance }, Some((t, result))) if t == token => {
                let reqs = self.requirements_of(name);
                match result {
                    OpResult::Rtt(rtt) if reqs.classify(Some(&PerfSample::rtt(rtt))) != Class::HardViolated => {
                        self.choose(now, name, instance, rtt)
                    }
                    _ => self.refind_later(now, name, 0),
                }
            }
            (Phase::Confirming { token, candidate, then }, Some((t, result))) if t == token => {
                let reqs = self.requirements_of(name);
                match result {
                    OpResult::Rtt(rtt) if reqs.classify(Some(&PerfSample::rtt(rtt))) != Class::HardViolated => {
                        self.select(now, name, Measured { peer: candidate, rtt, at: now }, then)
                    }
                    _ => {
                        let reason = format!("{} no longer answers within the hard limit", candidate.peer);
                        if let Some(d) = self.discoveries.get_mut(name) {
                            d.fallback = None;
                        }
                        match then {
                            Then::Choose => self.attempt_failed(now, name, reason),
                            Then::ServeMeanwhile => self.find_allocators(name),
                        }
                    }
                }
            }
            (Phase::RefindWait { until, tries }, None) if now >= until => {
                let token = self.token();
                let Some(d) = self.discoveries.get(name) else { return };
                let key = DhtKey::Service(d.info.hash.clone());
                self.ops.insert(token, name.to_string());
                self.set_phase(name, Phase::Refinding { token, tries });
                self.out.push_back(ManagerOutput::Find { token, key, timeout: self.config.find_timeout });
            }
            (Phase::Refinding { token, tries }, Some((t, result))) if t == token => {
                let providers = providers_of(result);
                if providers.is_empty() {
                    return self.refind_later(now, name, tries + 1);
                }
                let round = self.probe_round(now, name, providers, budget);
                self.set_phase(name, Phase::ProbingRefound { round, tries });
                self.check_round(now, name);
            }
            (Phase::ProbingRefound { round, tries }, r) => {
                let round = self.retry_round(now, name, record_probe(round, r, now));
                self.set_phase(name, Phase::ProbingRefound { round, tries });
                self.check_round(now, name);
            }
            // A stale result (an earlier phase's) or a tick that changes nothing.
            (phase, _) => self.set_phase(name, phase),
        }
    }

    fn set_phase(&mut self, name: &str, phase: Phase) {
        if let Some(d) = self.discoveries.get_mut(name) {
            d.phase = phase;
        }
    }

    fn requirements_of(&self, name: &str) -> Requirements {
        self.discoveries.get(name).map(|d| d.requirements).unwrap_or(self.defaults)
    }

    /// If the current probe round is complete, act on it.
    fn check_round(&mut self, now: Instant, name: &str) {
        let Some(d) = self.discoveries.get(name) else { return };
        let reqs = d.requirements;
        let ignore_hard = self.config.defects.ignore_hard_limit;
        let within_hard =
            |m: &Measured| ignore_hard || reqs.classify(Some(&PerfSample::rtt(m.rtt))) != Class::HardViolated;
        match &d.phase {
            Phase::ProbingInstances(round) if round.is_done(now) => {
                let found: Vec<Measured> =
                    self.ranked(round, Choosing::Instance, &reqs).into_iter().filter(within_hard).collect();
                // Seeking better: only instances faster than the current one count, and
                // the current one is what we keep if nothing better turns up.
                let (best, fallback) = match &d.purpose {
                    Purpose::Serve => (found.into_iter().next(), None),
                    Purpose::SeekBetter { current, rtt } => {
                        let hash = &d.info.hash;
                        let measured_now = found.iter().find(|m| &m.peer.peer == current).cloned();
                        let cached = self
                            .cache
                            .entries()
                            .find(|e| &e.service == hash && &e.peer.peer == current)
                            .map(|e| Measured { peer: e.peer.clone(), rtt: *rtt, at: d.started });
                        let best = found.into_iter().find(|m| &m.peer.peer != current && m.rtt < *rtt);
                        (best, measured_now.or(cached))
                    }
                };
                let serving = d.purpose == Purpose::Serve;
                match best {
                    Some(m) if reqs.classify(Some(&PerfSample::rtt(m.rtt))) == Class::Good => {
                        self.select(now, name, m, Then::Choose)
                    }
                    // Over the soft limit, but usable: requests waiting go to it now,
                    // while allocators closer than it are asked for a better one.
                    Some(m) if serving => self.select(now, name, m, Then::ServeMeanwhile),
                    best => {
                        // Nothing usable, or seeking better: ask allocators (closer than
                        // what we have) for a new instance; keep what we have if none can.
                        if let Some(d) = self.discoveries.get_mut(name) {
                            d.fallback = best.or(fallback);
                        }
                        self.find_allocators(name);
                    }
                }
            }
            Phase::ProbingAllocators(round) if round.is_done(now) => {
                // An allocator over the hard limit could only start an instance no
                // request may use.
                let mut order: Vec<Measured> =
                    self.ranked(round, Choosing::Allocator, &reqs).into_iter().filter(within_hard).collect();
                // With a slow instance in hand, only allocators closer than it can do better.
                if let Some(fallback) = &d.fallback {
                    order.retain(|m| m.rtt < fallback.rtt);
                }
                if order.is_empty() {
                    return self.no_allocation(now, name, "no reachable allocator within the hard limit".into());
                }
                self.ask_next_allocator(now, name, order, 0, String::new());
            }
            Phase::ProbingRefound { round, tries } if round.is_done(now) => {
                let tries = *tries;
                match self.ranked(round, Choosing::Instance, &reqs).into_iter().find(within_hard) {
                    Some(m) => self.select(now, name, m, Then::Choose),
                    None => self.refind_later(now, name, tries + 1),
                }
            }
            _ => {}
        }
    }

    /// Act on candidate `m` as `then` says, once its measurement is fresh: a candidate
    /// measured too long ago is probed again first (links change, and are cut).
    fn select(&mut self, now: Instant, name: &str, m: Measured, then: Then) {
        if now.saturating_since(m.at) <= self.config.fresh_measurement || self.config.defects.ignore_hard_limit {
            return match then {
                Then::Choose => self.choose(now, name, m.peer, m.rtt),
                Then::ServeMeanwhile => self.serve_meanwhile(now, name, m),
            };
        }
        let token = self.token();
        self.ops.insert(token, name.to_string());
        let timeout = self.requirements_of(name).probe_timeout();
        self.set_phase(name, Phase::Confirming { token, candidate: m.peer.clone(), then });
        self.out.push_back(ManagerOutput::Probe { token, peer: m.peer, timeout });
    }

    /// Whether an ejected instance that the last allocator of the round (`next` of
    /// `allocators` asked) offers may be tried after a fresh probe: only one that failed
    /// a request, never one that failed the trust check.
    fn last_resort(&self, now: Instant, peer: &PeerId, next: usize, allocators: usize) -> bool {
        next >= allocators
            && !self.config.defects.eject_forever
            && self.ejected.why(now, peer) == Some(FAILED_A_REQUEST)
    }

    /// Ask `order[next]` for an instance; `last` is why the previous one refused.
    fn ask_next_allocator(&mut self, now: Instant, name: &str, order: Vec<Measured>, next: usize, last: String) {
        let Some(allocator) = order.get(next).map(|m| m.peer.clone()) else {
            let reason = format!("no allocator could start '{name}': {last}");
            return self.no_allocation(now, name, reason);
        };
        let token = self.token();
        self.ops.insert(token, name.to_string());
        let retry_delay = self.config.control_retry.max(MIN_RETRY);
        let asking = Asking {
            tokens: [token].into(),
            deadline: now + self.config.allocate_timeout,
            retry_at: now + retry_delay,
            retry_delay,
        };
        self.set_phase(name, Phase::Allocating { order, next: next + 1, asking });
        self.out.push_back(ManagerOutput::Send {
            token,
            peer: allocator,
            request: Request::Allocate { service: name.to_string() },
            timeout: self.config.allocate_timeout,
        });
    }

    /// Allocation is not possible this round: use the slow instance found, if any
    /// (probed again if need be), else the round failed.
    fn no_allocation(&mut self, now: Instant, name: &str, reason: String) {
        match self.discoveries.get(name).and_then(|d| d.fallback.clone()) {
            Some(m) => self.select(now, name, m, Then::Choose),
            None => self.attempt_failed(now, name, reason),
        }
    }

    fn refind_later(&mut self, now: Instant, name: &str, tries: u32) {
        if tries >= self.config.refind_tries {
            return self.attempt_failed(now, name, format!("the new instance of '{name}' could not be reached"));
        }
        let delay = self.config.refind_initial.saturating_mul(1 << tries.min(16)).min(self.config.refind_max);
        self.set_phase(name, Phase::RefindWait { until: now + delay, tries });
    }

    fn attempt_failed(&mut self, now: Instant, name: &str, reason: String) {
        let Some(d) = self.discoveries.get_mut(name) else { return };
        d.attempt += 1;
        if d.attempt < self.config.attempts {
            return self.find_instances(name);
        }
        let Some(d) = self.discoveries.remove(name) else { return };
        self.out.push_back(ManagerOutput::Event(Event::DiscoveryFinished {
            service: name.to_string(),
            took: now.saturating_since(d.started),
            allocated: d.allocated,
            found: false,
        }));
        for req in d.waiters {
            self.fail(req, 503, format!("no instance of '{name}' could be found or allocated: {reason}"));
        }
    }

    /// Keep `info` for seek-better rounds of its service (bounded).
    fn remember(&mut self, info: ServiceInfo) {
        let hash = info.hash.clone();
        self.known.insert(hash.clone(), info);
        if self.known.len() > KNOWN_KEEP {
            let cached: std::collections::BTreeSet<ContentHash> =
                self.cache.entries().map(|e| e.service.clone()).collect();
            self.known.retain(|h, _| cached.contains(h) || *h == hash);
        }
    }

    /// Use `instance` for the service: cache it and route everyone waiting.
    fn choose(&mut self, now: Instant, name: &str, instance: PeerAddr, rtt: Duration) {
        let Some(d) = self.discoveries.remove(name) else { return };
        let hash = d.info.hash.clone();
        self.ejected.lift(&instance.peer);
        self.remember(d.info.clone());
        self.cache.insert(now, &hash, d.requirements, instance.clone(), rtt);
        self.out.push_back(ManagerOutput::Event(Event::Selected {
            service: hash.clone(),
            instance: instance.peer.clone(),
            rtt,
        }));
        if let Purpose::SeekBetter { current, .. } = &d.purpose {
            if *current != instance.peer {
                self.cache.remove(&hash, current, "replaced by a better instance");
                self.drain_cache(now);
                self.out.push_back(ManagerOutput::Event(Event::Switched {
                    service: hash.clone(),
                    from: current.clone(),
                    to: instance.peer.clone(),
                }));
            }
        }
        self.out.push_back(ManagerOutput::Event(Event::DiscoveryFinished {
            service: name.to_string(),
            took: now.saturating_since(d.started),
            allocated: d.allocated,
            found: true,
        }));
        let try_timeout = self.config.resilience.try_timeout(&d.requirements);
        for req in d.waiters {
            self.respond(req, Outcome::Route { instance: instance.clone(), service: hash.clone(), try_timeout });
        }
    }

    /// The best instance found is over the soft limit but usable: cache it and route
    /// everyone waiting to it now; the discovery goes on as a search for a better one
    /// (an allocation can take seconds, and a lost message more).
    fn serve_meanwhile(&mut self, now: Instant, name: &str, m: Measured) {
        let Some(d) = self.discoveries.get_mut(name) else { return };
        d.fallback = Some(m.clone());
        d.purpose = Purpose::SeekBetter { current: m.peer.peer.clone(), rtt: m.rtt };
        let waiters = std::mem::take(&mut d.waiters);
        let (info, requirements) = (d.info.clone(), d.requirements);
        let hash = info.hash.clone();
        self.remember(info);
        self.cache.insert(now, &hash, requirements, m.peer.clone(), m.rtt);
        self.out.push_back(ManagerOutput::Event(Event::Selected {
            service: hash.clone(),
            instance: m.peer.peer.clone(),
            rtt: m.rtt,
        }));
        let try_timeout = self.config.resilience.try_timeout(&requirements);
        for req in waiters {
            self.respond(req, Outcome::Route { instance: m.peer.clone(), service: hash.clone(), try_timeout });
        }
        self.find_allocators(name);
    }

    // ---- service mode ----------------------------------------------------

    /// Service mode: a tunnelled request began.
    pub fn tunnel_served(&mut self, now: Instant) {
        if let Some(s) = self.serving.as_mut() {
            s.in_flight = s.in_flight.saturating_add(1);
            s.last_served = now;
            let elapsed = now.saturating_since(s.window_start);
            if elapsed >= LOAD_WINDOW {
                s.last_window = if elapsed >= LOAD_WINDOW * 2 { 0 } else { s.this_window };
                s.this_window = 0;
                s.window_start = now;
            }
            s.this_window = s.this_window.saturating_add(1);
        }
    }

    /// Service mode: the content hash of the served service, once resolved.
    pub fn served_hash(&self) -> Option<&ContentHash> {
        self.serving.as_ref()?.info.as_ref().map(|i| &i.hash)
    }

    /// Service mode: a tunnelled request ended.
    pub fn tunnel_done(&mut self, now: Instant) {
        if let Some(s) = self.serving.as_mut() {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_served = now;
        }
    }

    /// Service mode: the sidecar's check of its application.
    pub fn app_checked(&mut self, answered: bool) {
        let down_after = self.config.app_down_after.max(1);
        let Some(s) = self.serving.as_mut() else { return };
        let was_down = s.failed_checks >= down_after;
        s.failed_checks = if answered { 0 } else { s.failed_checks.saturating_add(1) };
        let is_down = s.failed_checks >= down_after;
        if was_down != is_down {
            let service = s.name.clone();
            self.out.push_back(ManagerOutput::Event(Event::AppHealth { service, answering: !is_down }));
        }
    }

    /// Service mode: why this instance should not be used now (its application does
    /// not answer), if so. Probes and idle queries are answered with it.
    pub fn unhealthy(&self) -> Option<String> {
        let s = self.serving.as_ref()?;
        (s.failed_checks >= self.config.app_down_after.max(1)).then(|| {
            format!("the application of '{}' does not answer ({} checks failed in a row)", s.name, s.failed_checks)
        })
    }

    /// Service mode: what this instance reports to a load query.
    pub fn load(&self, now: Instant) -> Option<Load> {
        let s = self.serving.as_ref()?;
        let elapsed = now.saturating_since(s.window_start);
        let recent = match elapsed {
            e if e >= LOAD_WINDOW * 2 => 0,
            e if e >= LOAD_WINDOW => s.this_window,
            _ => s.this_window.saturating_add(s.last_window),
        };
        Some(Load { running: s.in_flight, capacity: 0, recent })
    }

    /// Answer an allocator's idle query: busy while a request is in flight; an error
    /// (which the allocator culls on) while the application does not answer.
    pub fn idle_query(&self, now: Instant) -> Response {
        if let Some(reason) = self.unhealthy() {
            return Response::Error { reason };
        }
        match &self.serving {
            Some(s) if s.in_flight > 0 => Response::Idle { seconds: 0 },
            Some(s) => Response::Idle { seconds: now.saturating_since(s.last_served).as_secs() },
            None => Response::Error { reason: "this node serves no service".into() },
        }
    }

    /// A bootstrap (re)connected: advertise what we serve now.
    pub fn bootstrap_connected(&mut self, now: Instant) {
        if let Some(s) = self.serving.as_mut() {
            s.next_advertise = now;
        }
    }

    // ---- time ------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        self.ejected.prune(now);
        // Deadlines: every request still waiting at its deadline gets 504.
        let expired: Vec<ReqId> =
            self.requests.iter().filter(|(_, p)| p.deadline <= now).map(|(req, _)| *req).collect();
        for req in expired {
            let service = self.requests.get(&req).map(|p| p.service.clone()).unwrap_or_default();
            self.fail(req, 504, format!("deadline exceeded while finding an instance of '{service}'"));
        }
        for waiting in self.resolving.values_mut() {
            waiting.retain(|r| self.requests.contains_key(r));
        }
        for d in self.discoveries.values_mut() {
            d.waiters.retain(|r| self.requests.contains_key(r));
        }
        // Probe rounds whose budget ran out, and re-find backoffs that ended.
        let names: Vec<String> = self.discoveries.keys().cloned().collect();
        for name in names {
            let Some(d) = self.discoveries.get_mut(&name) else { continue };
            let phase = std::mem::replace(&mut d.phase, Phase::Deciding);
            self.advance(now, &name, phase, None);
        }
        // Service mode: keep our advertisement fresh.
        if let Some(s) = self.serving.as_mut() {
            if now >= s.next_advertise {
                s.next_advertise = now + self.config.advertise_interval;
                match &s.info {
                    Some(info) => {
                        self.out.push_back(ManagerOutput::Advertise { key: DhtKey::Service(info.hash.clone()) })
                    }
                    // Not resolved yet (registry unreachable or name unknown): ask again.
                    None => self.out.push_back(ManagerOutput::Resolve { name: s.name.clone() }),
                }
            }
        }
        self.cache.handle_timeout(now);
        self.drain_cache(now);
    }

    fn drain_cache(&mut self, now: Instant) {
        while let Some(o) = self.cache.poll_output() {
            match o {
                PeerCacheOutput::Probe { token: cache_token, peer, timeout } => {
                    let token = self.token();
                    self.cache_probes.insert(token, cache_token);
                    self.out.push_back(ManagerOutput::Probe { token, peer, timeout });
                }
                PeerCacheOutput::Evicted { service, peer, reason } => {
                    self.out.push_back(ManagerOutput::Event(Event::Evicted { service, peer, reason }));
                }
                PeerCacheOutput::SeekBetter { service, peer, rtt } => {
                    self.out.push_back(ManagerOutput::Event(Event::SeekBetter {
                        service: service.clone(),
                        peer: peer.clone(),
                    }));
                    self.seek_better(now, &service, peer, rtt);
                }
            }
        }
    }

    /// Look for a better instance than the soft-violating `current`, unless a
    /// discovery for that service is already running.
    fn seek_better(&mut self, now: Instant, hash: &ContentHash, current: PeerId, rtt: Duration) {
        let Some(info) = self.known.get(hash).cloned() else { return };
        if !self.discoveries.contains_key(&info.name) {
            self.start_discovery(now, info, Purpose::SeekBetter { current, rtt }, Vec::new());
        }
    }

    pub fn poll_output(&mut self) -> Option<ManagerOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.cache.poll_timeout();
        t = earliest(t, self.requests.values().map(|p| p.deadline).min());
        for d in self.discoveries.values() {
            let phase_t = match &d.phase {
                Phase::ProbingInstances(r) | Phase::ProbingAllocators(r) | Phase::ProbingRefound { round: r, .. } => {
                    Some(r.deadline.min(r.retry_at))
                }
                Phase::Allocating { asking, .. } if asking.retry_at < asking.deadline => Some(asking.retry_at),
                Phase::RefindWait { until, .. } => Some(*until),
                _ => None,
            };
            t = earliest(t, phase_t);
        }
        if let Some(s) = &self.serving {
            t = earliest(t, Some(s.next_advertise));
        }
        t
    }

    /// Requests accepted and not yet answered.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }
}

fn providers_of(result: OpResult) -> Vec<PeerAddr> {
    match result {
        OpResult::Providers(p) => p,
        _ => Vec::new(),
    }
}

/// Record a probe answer (or nothing, if only time passed) in a round: the first
/// answer of a candidate settles it (its other probes are no longer waited for).
fn record_probe(mut round: ProbeRound, result: Option<(u64, OpResult)>, now: Instant) -> ProbeRound {
    if let Some((token, result)) = result {
        if let Some(peer) = round.load_pending.remove(&token) {
            if let OpResult::Response(Response::Load { load }) = result {
                round.loads.insert(peer, load);
            }
            return round;
        }
        if let Some(peer) = round.pending.remove(&token) {
            round.pending.retain(|_, p| p.peer != peer.peer);
            if let OpResult::Rtt(rtt) = result {
                round.answered.push(Measured { peer, rtt, at: now });
            }
        }
    }
    round
}
