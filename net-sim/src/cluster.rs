//! Running a scenario: the turmoil simulation is built from the scenario (one host per
//! node, `rng_seed` from the run's seed), driven with `sim.step()`, and the scheduled
//! faults are applied between steps. The result is a [`Report`]: figures, the trace and
//! its hash, and the invariants that did not hold.

use crate::node::{host_main, Ctx, Fate, RequestRecord};
use crate::scenario::{Fault, Scenario};
use crate::topology::{pair, Topology};
use crate::trace::{Kind, Record, Trace};
use physarum_core::io::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

/// Half of a round-trip time: turmoil's latency is one way.
fn one_way(rtt_ms: f64) -> Duration {
    Duration::from_micros((rtt_ms * 500.0).round().max(0.0) as u64)
}

/// The figures of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Requests the workloads sent.
    pub sent: u64,
    /// Answered with a 2xx status.
    pub ok: u64,
    /// Answered with another status, or the connection failed.
    pub failed: u64,
    /// No answer by the client's deadline.
    pub timed_out: u64,
    /// Never answered because the client's host crashed.
    pub lost: u64,
    /// Still waiting for an answer when the run ended (not counted as sent).
    pub in_flight: u64,
    /// Instances allocators began to start / that came up.
    pub instances_started: u64,
    pub instances_up: u64,
    /// Allocations clients obtained (`Event::Allocated`).
    pub allocations: u64,
    /// Clients moving to a better instance (`Event::Switched`).
    pub switches: u64,
    pub evictions: u64,
    pub culls: u64,
    /// Latency of successful requests in simulated time.
    pub p50: Duration,
    pub p99: Duration,
}

/// What a run produced.
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub simulated: Duration,
    /// Wall-clock time the run took (not part of the trace).
    pub wall: Duration,
    pub trace: Trace,
    pub trace_hash: String,
    pub requests: Vec<RequestRecord>,
    pub figures: Figures,
    /// Invariants of the scenario that did not hold, one sentence each.
    pub violations: Vec<String>,
    /// The event-driven engine's DHT and discovery measurements (`None` from turmoil).
    pub dht: Option<crate::des::DhtStats>,
}

impl Report {
    pub fn records(&self) -> Vec<Record> {
        self.trace.records()
    }

    /// Core events of the run with the node they happened on and when.
    pub fn events(&self) -> Vec<(Duration, String, Event)> {
        self.trace
            .records()
            .into_iter()
            .filter_map(|r| match r.kind {
                Kind::Core(e) => Some((r.at, r.node, e)),
                _ => None,
            })
            .collect()
    }

    /// How many core events match `f`.
    pub fn count_events(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events().iter().filter(|(_, _, e)| f(e)).count()
    }

    /// Instances allocators began to start for `service`.
    pub fn starts_of(&self, service: &str) -> usize {
        self.count_events(|e| matches!(e, Event::InstanceStarting { service: s, .. } if s == service))
    }

    /// The instance that served each successful request, in request order.
    pub fn served_by(&self) -> Vec<(Duration, String)> {
        self.requests
            .iter()
            .filter_map(|r| match &r.fate {
                Fate::Answered { status, served_by: Some(by), .. } if (200..300).contains(status) => {
                    Some((r.at, by.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Requests sent in `[from, to)`.
    pub fn requests_between(&self, from: Duration, to: Duration) -> Vec<&RequestRecord> {
        self.requests.iter().filter(|r| r.at >= from && r.at < to).collect()
    }

    /// The figures as printed by `physarum-sim run`.
    pub fn figures_text(&self) -> String {
        let f = &self.figures;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "requests: {} sent, {} ok, {} failed, {} timed out, {} lost, {} in flight at the end",
            f.sent, f.ok, f.failed, f.timed_out, f.lost, f.in_flight
        );
        let _ = writeln!(
            s,
            "instances: {} started, {} up, {} culled; allocations: {}; switches: {}; evictions: {}",
            f.instances_started, f.instances_up, f.culls, f.allocations, f.switches, f.evictions
        );
        let _ = writeln!(
            s,
            "latency (simulated): p50 {:.3} ms, p99 {:.3} ms",
            f.p50.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0
        );
        s
    }

    /// Faults and notable events, one line each, in time order.
    pub fn timeline(&self) -> String {
        let mut s = String::new();
        for r in self.trace.records() {
            let notable = match &r.kind {
                Kind::Fault(_) | Kind::NodeExited(_) | Kind::Bootstrap(_) | Kind::Driver(_) => true,
                Kind::Core(e) => matches!(
                    e,
                    Event::Allocated { .. }
                        | Event::AllocationRefused { .. }
                        | Event::Evicted { .. }
                        | Event::SeekBetter { .. }
                        | Event::Switched { .. }
                        | Event::InstanceCulled { .. }
                        | Event::InstanceGone { .. }
                ),
                _ => false,
            };
            if notable {
                let line = r.line();
                let text = line.trim_start().split_once(' ').map(|x| x.1).unwrap_or("");
                let _ = writeln!(s, "{:>10.3}s {text}", r.at.as_secs_f64());
            }
        }
        s
    }

    /// How long the run took in wall time; kept out of [`Report::summary`] so that two
    /// runs of one seed print the same summary.
    pub fn wall_text(&self) -> String {
        format!(
            "simulated {:.1} s in {:.2} s wall ({:.1} simulated s per wall s)",
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64(),
            self.simulated.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
        )
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario {} seed {}", self.scenario, self.seed);
        let _ = writeln!(s, "simulated {:.1} s", self.simulated.as_secs_f64());
        s.push_str(&self.figures_text());
        if self.violations.is_empty() {
            s.push_str("invariants: all hold\n");
        } else {
            for v in &self.violations {
                let _ = writeln!(s, "VIOLATED: {v}");
            }
        }
        let _ = writeln!(s, "trace: {} records, hash {}", self.trace.len(), self.trace_hash);
        s
    }
}

/// A change of the network or of a host, for the invariant checks.
#[derive(Clone, Debug)]
enum NetChange {
    Rtt(String, String, f64),
    Cut(String, String),
    Heal(String, String),
    Down(String),
    Up(String),
}

/// The network's history: how each link looked at each moment.
pub(crate) struct NetHistory {
    initial: Topology,
    changes: Vec<(Duration, NetChange)>,
}

impl NetHistory {
    pub(crate) fn new(initial: Topology) -> Self {
        NetHistory { initial, changes: Vec::new() }
    }

    /// Record what `fault`, applied at `at`, does to links and hosts.
    pub(crate) fn note(&mut self, at: Duration, fault: &Fault) {
        let mut add = |c| self.changes.push((at, c));
        match fault {
            Fault::Partition { a, b } | Fault::Repair { a, b } => {
                for x in a {
                    for y in b.iter().filter(|y| *y != x) {
                        match fault {
                            Fault::Partition { .. } => add(NetChange::Cut(x.clone(), y.clone())),
                            _ => add(NetChange::Heal(x.clone(), y.clone())),
                        }
                    }
                }
            }
            Fault::Crash { node } | Fault::BootstrapDown { node } => add(NetChange::Down(node.clone())),
            Fault::Restart { node } | Fault::BootstrapUp { node } => add(NetChange::Up(node.clone())),
            Fault::Latency { a, b, rtt_ms } => add(NetChange::Rtt(a.clone(), b.clone(), *rtt_ms)),
            _ => {}
        }
    }

    /// The RTT between hosts `a` and `b` at `at` (`None`: cut or a host down).
    fn rtt_at(&self, a: &str, b: &str, at: Duration) -> Option<f64> {
        let p = pair(a, b);
        let mut rtt = self.initial.rtt_ms(a, b);
        let mut cut = false;
        let mut down: BTreeSet<&str> = BTreeSet::new();
        for (t, c) in &self.changes {
            if *t > at {
                break;
            }
            match c {
                NetChange::Rtt(x, y, r) if pair(x, y) == p => rtt = *r,
                NetChange::Cut(x, y) if pair(x, y) == p => cut = true,
                NetChange::Heal(x, y) if pair(x, y) == p => cut = false,
                NetChange::Down(h) => {
                    down.insert(h);
                }
                NetChange::Up(h) => {
                    down.remove(h.as_str());
                }
                _ => {}
            }
        }
        if cut || down.contains(a) || down.contains(b) {
            None
        } else {
            Some(rtt)
        }
    }

    /// When the stretch began during which the link has been over `limit_ms` (or cut)
    /// up to `at`; `None` if it is within the limit at `at`.
    pub(crate) fn over_since(&self, a: &str, b: &str, limit_ms: f64, at: Duration) -> Option<Duration> {
        let over = |t: Duration| self.rtt_at(a, b, t).is_none_or(|r| r > limit_ms);
        if !over(at) {
            return None;
        }
        // `Duration::MAX`: within the limit at that point.
        let mut since = if self.initial.rtt_ms(a, b) > limit_ms { Duration::ZERO } else { Duration::MAX };
        for (t, _) in self.changes.iter().filter(|(t, _)| *t <= at) {
            if !over(*t) {
                since = Duration::MAX;
            } else if since == Duration::MAX {
                since = *t;
            }
        }
        Some(if since == Duration::MAX { at } else { since })
    }

    /// Whether the link was over `hard_ms` (or cut) at every moment of `[from, to]`.
    pub(crate) fn bad_throughout(&self, a: &str, b: &str, hard_ms: f64, from: Duration, to: Duration) -> bool {
        let bad = |t: Duration| self.rtt_at(a, b, t).is_none_or(|r| r > hard_ms);
        bad(from) && self.changes.iter().filter(|(t, _)| *t > from && *t <= to).all(|(t, _)| bad(*t))
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Run `scenario` with `seed`.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, String> {
    run_with_progress(scenario, seed, &mut |_| {})
}

/// [`run`], calling `progress` with the simulated time reached, once per simulated second.
pub fn run_with_progress(scenario: &Scenario, seed: u64, progress: &mut dyn FnMut(Duration)) -> Result<Report, String> {
    scenario.validate().map_err(|e| e.to_string())?;
    let wall = std::time::Instant::now();
    let trace = Trace::new();
    let ctx = Ctx::new(scenario.clone(), seed, trace.clone());
    let end = Duration::from_millis(scenario.duration_ms);
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .simulation_duration(end + Duration::from_secs(1))
        .tick_duration(Duration::from_micros(scenario.tick_us))
        .min_message_latency(one_way(scenario.default_rtt_ms))
        .max_message_latency(one_way(scenario.default_rtt_ms) + Duration::from_millis(scenario.jitter_ms))
        .udp_capacity(4096)
        .tcp_capacity(4096);
    let mut sim = builder.build();
    for n in &scenario.nodes {
        let ctx = ctx.clone();
        let name = n.name.clone();
        sim.host(n.name.as_str(), move || host_main(ctx.clone(), name.clone()));
    }
    let topology = Topology::of(scenario);
    for l in &scenario.links {
        set_link(&mut sim, scenario, &l.a, &l.b, l.rtt_ms);
    }
    let placed: Vec<&String> = topology.placed().collect();
    for (i, a) in placed.iter().enumerate() {
        for b in &placed[i + 1..] {
            sim.set_link_latency(a.as_str(), b.as_str(), one_way(topology.rtt_ms(a, b)));
        }
    }
    let mut history = NetHistory::new(topology);
    let schedule = scenario.expanded_schedule();
    let mut next = 0;
    while sim.elapsed() < end {
        while next < schedule.len() && Duration::from_millis(schedule[next].at_ms) <= sim.elapsed() {
            let at = sim.elapsed();
            let fault = &schedule[next].fault;
            trace.push(at, "sim", Kind::Fault(fault.describe()));
            apply(&mut sim, &ctx, fault, at, &mut history);
            next += 1;
        }
        let before = sim.elapsed().as_secs();
        sim.step().map_err(|e| format!("simulation failed at {:?}: {e}", sim.elapsed()))?;
        if sim.elapsed().as_secs() != before {
            progress(sim.elapsed());
        }
    }
    let simulated = sim.elapsed();
    drop(sim);
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
    report.violations = check(scenario, &report, &history, &ctx);
    Ok(report)
}

fn apply(sim: &mut turmoil::Sim<'_>, ctx: &Ctx, fault: &Fault, at: Duration, h: &mut NetHistory) {
    h.note(at, fault);
    match fault {
        Fault::Partition { a, b } | Fault::Repair { a, b } => {
            let cut = matches!(fault, Fault::Partition { .. });
            for x in a {
                for y in b.iter().filter(|y| *y != x) {
                    if cut {
                        sim.partition(x.as_str(), y.as_str());
                    } else {
                        sim.repair(x.as_str(), y.as_str());
                    }
                }
            }
        }
        Fault::Crash { node } | Fault::BootstrapDown { node } => {
            if sim.is_host_running(node.as_str()) {
                sim.crash(node.as_str());
            }
        }
        Fault::Restart { node } | Fault::BootstrapUp { node } => {
            if !sim.is_host_running(node.as_str()) {
                sim.bounce(node.as_str());
            }
        }
        Fault::Latency { a, b, rtt_ms } => set_link(sim, &ctx.scenario, a, b, *rtt_ms),
        Fault::LatencySweep { .. } | Fault::LatencyWave { .. } => unreachable!("expanded before the run"),
        Fault::Loss { a, b, rate } => ctx.loss.set(a, b, *rate),
        Fault::SlowStart { node, boot_delay_ms } => {
            ctx.boot_delays.borrow_mut().insert(node.clone(), Duration::from_millis(*boot_delay_ms));
        }
        Fault::HangApps { node } => ctx.set_apps_hung(node, true),
        Fault::ResumeApps { node } => ctx.set_apps_hung(node, false),
    }
}

/// Set a link's RTT, keeping the jitter the scenario gives it.
fn set_link(sim: &mut turmoil::Sim<'_>, scenario: &Scenario, a: &str, b: &str, rtt_ms: f64) {
    sim.set_link_latency(a, b, one_way(rtt_ms));
    let p = pair(a, b);
    if let Some(l) = scenario.links.iter().find(|l| pair(&l.a, &l.b) == p && l.jitter_ms > 0.0) {
        let jitter = Duration::from_micros((l.jitter_ms * 1000.0) as u64);
        sim.set_link_max_message_latency(a, b, one_way(rtt_ms) + jitter);
    }
}

pub(crate) fn figures(requests: &[RequestRecord], trace: &Trace, end: Duration) -> Figures {
    let mut f = Figures::default();
    let mut lat = Vec::new();
    for r in requests {
        match &r.fate {
            Fate::Pending if r.at + r.deadline >= end => {
                f.in_flight += 1;
                continue;
            }
            Fate::Pending => {
                f.lost += 1;
                continue;
            }
            Fate::Answered { status, latency, .. } if (200..300).contains(status) => {
                f.ok += 1;
                lat.push(*latency);
            }
            Fate::Answered { .. } | Fate::Error(_) => f.failed += 1,
            Fate::TimedOut => f.timed_out += 1,
        }
        f.sent += 1;
    }
    f.sent += f.lost;
    lat.sort();
    f.p50 = percentile(&lat, 0.50);
    f.p99 = percentile(&lat, 0.99);
    for r in trace.records() {
        if let Kind::Core(e) = &r.kind {
            match e {
                Event::InstanceStarting { .. } => f.instances_started += 1,
                Event::InstanceUp { .. } => f.instances_up += 1,
                Event::Allocated { .. } => f.allocations += 1,
                Event::Switched { .. } => f.switches += 1,
                Event::Evicted { .. } => f.evictions += 1,
                Event::InstanceCulled { .. } => f.culls += 1,
                _ => {}
            }
        }
    }
    f
}

pub(crate) fn check(scenario: &Scenario, report: &Report, history: &NetHistory, ctx: &Ctx) -> Vec<String> {
    let inv = &scenario.invariants;
    let f = &report.figures;
    let mut v = Vec::new();
    if inv.answered_by_deadline && f.timed_out > 0 {
        let seqs: Vec<String> = report
            .requests
            .iter()
            .filter(|r| r.fate == Fate::TimedOut)
            .take(10)
            .map(|r| format!("#{} at {:?}", r.seq, r.at))
            .collect();
        v.push(format!("{} requests got no answer by their deadline: {}", f.timed_out, seqs.join(", ")));
    }
    if let Some(min) = inv.min_ok {
        if f.ok < min {
            v.push(format!("only {} requests succeeded, expected at least {min}", f.ok));
        }
    }
    if let Some(max) = inv.max_not_ok {
        let not_ok = f.failed + f.timed_out;
        if not_ok > max {
            v.push(format!("{not_ok} requests failed or timed out, expected at most {max}"));
        }
    }
    for s in &scenario.services {
        let starts = report.starts_of(&s.name) as u64;
        if let Some(max) = inv.max_starts_per_service {
            if starts > max {
                v.push(format!("{starts} instances of {} were started, expected at most {max}", s.name));
            }
        }
    }
    if inv.bounded_allocations {
        let t = &scenario.tuning;
        v.extend(starts_over_the_bound(&report.trace.records(), t.max_starts_per_window, ms(t.start_window_ms)));
    }
    if inv.no_hard_violating_selection {
        let hosts = ctx.instance_hosts.borrow();
        let svc_of_hash: BTreeMap<String, String> = scenario
            .services
            .iter()
            .filter_map(|s| ctx.service_info(&s.name).map(|i| (i.hash.0, s.name.clone())))
            .collect();
        let hard_of = |hash: &str| {
            let name = svc_of_hash.get(hash).cloned().unwrap_or_else(|| hash.to_string());
            scenario.limits_of(&name).hard_ms as f64
        };
        let host_of = |instance: &str| hosts.get(instance).cloned().unwrap_or_else(|| instance.to_string());
        let age = ms(scenario.tuning.measurement_age_ms);
        let window = ms(scenario.tuning.selection_window_ms);
        let (mut chosen, mut routed) = (Vec::new(), Vec::new());
        for r in report.trace.records() {
            let (service, instance, look_back, bad) = match &r.kind {
                Kind::Core(Event::Selected { service, instance, .. }) => (&service.0, &instance.0, age, &mut chosen),
                Kind::Routed { service, instance } => (service, instance, window, &mut routed),
                _ => continue,
            };
            let host = host_of(instance);
            let from = r.at.saturating_sub(look_back);
            if host != r.node && history.bad_throughout(&r.node, &host, hard_of(service), from, r.at) {
                bad.push(format!("{} -> {instance} at {:?}", r.node, r.at));
            }
        }
        for (what, bad) in [("selected", chosen), ("routed from the cache", routed)] {
            if !bad.is_empty() {
                v.push(format!(
                    "{} instances {what} over the hard limit (or cut): {}",
                    bad.len(),
                    bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        }
    }
    if let Some(within) = inv.recover_within_ms {
        let last = scenario.last_disturbance_ms();
        let from = Duration::from_millis(last + within);
        let failing: Vec<String> = report
            .requests
            .iter()
            .filter(|r| r.at >= from && !r.ok() && !matches!(r.fate, Fate::Pending))
            .take(10)
            .map(|r| format!("#{} at {:?}: {:?}", r.seq, r.at, r.fate))
            .collect();
        if !failing.is_empty() {
            v.push(format!("requests still failing {within} ms after the last fault: {}", failing.join("; ")));
        }
    }
    if let Some(min) = inv.min_success_rate {
        let done = f.ok + f.failed + f.timed_out + f.lost;
        let rate = if done == 0 { 1.0 } else { f.ok as f64 / done as f64 };
        if rate < min {
            v.push(format!(
                "{:.1} % of requests succeeded ({} of {done}), expected at least {:.1} %",
                rate * 100.0,
                f.ok,
                min * 100.0
            ));
        }
    }
    let hash_to_name: BTreeMap<String, String> =
        scenario.services.iter().map(|s| (crate::node::service_hash(&s.name).0, s.name.clone())).collect();
    if inv.fallback_allowed == Some(false) {
        let over: Vec<String> = report
            .events()
            .into_iter()
            .filter_map(|(at, node, e)| match e {
                Event::Selected { service, instance, rtt } => {
                    let name = hash_to_name.get(&service.0)?;
                    let soft = ms(scenario.limits_of(name).soft_ms);
                    (rtt > soft).then(|| format!("{node} -> {instance} ({} us) at {at:?}", rtt.as_micros()))
                }
                _ => None,
            })
            .collect();
        if !over.is_empty() {
            v.push(format!(
                "{} selections over the soft limit (fallback not allowed): {}",
                over.len(),
                over.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    }
    if let Some(bound) = inv.max_switch_delay_ms {
        let hosts = ctx.instance_hosts.borrow();
        let mut late = Vec::new();
        // Each client's instance and since when it has been using it (a client that
        // falls back to a slow instance is judged from when it began using it).
        let mut using: BTreeMap<(&str, &str), (&str, Duration)> = BTreeMap::new();
        for r in &report.requests {
            let Fate::Answered { served_by: Some(by), .. } = &r.fate else { continue };
            let key = (r.client.as_str(), r.service.as_str());
            let began = match using.get(&key) {
                Some((instance, began)) if *instance == by.as_str() => *began,
                _ => r.at,
            };
            using.insert(key, (by.as_str(), began));
            let host = hosts.get(by).cloned().unwrap_or_else(|| crate::timeline::host_of(by).to_string());
            let soft = scenario.limits_of(&r.service).soft_ms as f64;
            if host == r.client {
                continue;
            }
            if let Some(since) = history.over_since(&r.client, &host, soft, r.at) {
                let since = since.max(began);
                if r.at.saturating_sub(since) > ms(bound) {
                    late.push(format!("#{} at {:?} by {by}, over the soft limit since {since:?}", r.seq, r.at));
                }
            }
        }
        if !late.is_empty() {
            v.push(format!(
                "{} requests served by an instance over the soft limit for longer than {bound} ms: {}",
                late.len(),
                late.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    }
    // Always: at most one live instance per service on one allocator (the storm bound).
    let mut live: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in report.trace.records() {
        if let Kind::Core(e) = &r.kind {
            match e {
                Event::InstanceStarting { service, .. } => {
                    let n = live.entry((r.node.clone(), service.clone())).or_insert(0);
                    *n += 1;
                    if *n > 1 {
                        v.push(format!("allocator {} runs {} instances of {service} at {:?}", r.node, n, r.at));
                    }
                }
                Event::InstanceCulled { service, .. } | Event::InstanceGone { service, .. } => {
                    *live.entry((r.node.clone(), service.clone())).or_insert(1) -= 1;
                }
                _ => {}
            }
        }
        if let Kind::NodeStarted { .. } = &r.kind {
            // A restarted allocator starts from nothing.
            live.retain(|(n, _), _| *n != r.node);
        }
    }
    v
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Allocators that started more than `max` instances of one service within some
/// `window`, beyond one more for each instance of it that ended there in that window
/// (each run of an allocator counted on its own: a restarted one starts from nothing).
fn starts_over_the_bound(records: &[Record], max: u64, window: Duration) -> Vec<String> {
    // (allocator, service) → times of starts, and of instances ending.
    let mut starts: BTreeMap<(String, String), Vec<Duration>> = BTreeMap::new();
    let mut ends: BTreeMap<(String, String), Vec<Duration>> = BTreeMap::new();
    let mut v = Vec::new();
    for r in records {
        match &r.kind {
            Kind::NodeStarted { .. } => {
                starts.retain(|(node, _), _| *node != r.node);
                ends.retain(|(node, _), _| *node != r.node);
            }
            Kind::Core(Event::InstanceCulled { service, .. } | Event::InstanceGone { service, .. }) => {
                ends.entry((r.node.clone(), service.clone())).or_default().push(r.at);
            }
            Kind::Core(Event::InstanceStarting { service, .. }) => {
                let key = (r.node.clone(), service.clone());
                let recent = |t: &Duration| *t + window > r.at;
                let times = starts.entry(key.clone()).or_default();
                times.retain(recent);
                times.push(r.at);
                let ended = ends.get(&key).map_or(0, |e| e.iter().filter(|t| recent(t)).count()) as u64;
                if times.len() as u64 > max + ended {
                    v.push(format!(
                        "allocator {} started {} instances of {service} within {window:?} (at most {max}, \
                         plus {ended} for instances that ended), the last at {:?}",
                        r.node,
                        times.len(),
                        r.at
                    ));
                }
            }
            _ => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_history_judges_selections() {
        let s = crate::ScenarioBuilder::new("t", 1000).bootstrap("c").bootstrap("i").bootstrap("x").link("c", "i", 4.0);
        let mut h = NetHistory::new(Topology::of(&s.build().unwrap()));
        h.changes.push((Duration::from_secs(10), NetChange::Cut("i".into(), "c".into())));
        h.changes.push((Duration::from_secs(20), NetChange::Heal("c".into(), "i".into())));
        h.changes.push((Duration::from_secs(30), NetChange::Rtt("c".into(), "i".into(), 50.0)));
        h.changes.push((Duration::from_secs(40), NetChange::Down("i".into())));
        let s = Duration::from_secs;
        assert_eq!(h.rtt_at("c", "i", s(5)), Some(4.0));
        assert_eq!(h.rtt_at("c", "x", s(5)), Some(2.0));
        assert_eq!(h.rtt_at("i", "c", s(15)), None);
        assert_eq!(h.rtt_at("c", "i", s(35)), Some(50.0));
        assert_eq!(h.rtt_at("c", "x", s(45)), Some(2.0));
        assert_eq!(h.rtt_at("x", "i", s(45)), None);
        // Cut for the whole window: bad. Window reaching back before the cut: not bad.
        assert!(h.bad_throughout("c", "i", 10.0, s(11), s(13)));
        assert!(!h.bad_throughout("c", "i", 10.0, s(9), s(13)));
        // Over the hard limit (10 ms) after 30 s; under a 100 ms limit it is fine.
        assert!(h.bad_throughout("c", "i", 10.0, s(31), s(33)));
        assert!(!h.bad_throughout("c", "i", 100.0, s(31), s(33)));
        // Healed at 20 s, 4 ms again.
        assert!(!h.bad_throughout("c", "i", 10.0, s(21), s(23)));
        // Over 10 ms (or cut) since: the cut at 10 s; nothing at 25 s; 50 ms from 30 s.
        assert_eq!(h.over_since("c", "i", 10.0, s(15)), Some(s(10)));
        assert_eq!(h.over_since("c", "i", 10.0, s(25)), None);
        assert_eq!(h.over_since("c", "i", 10.0, s(35)), Some(s(30)));
        assert_eq!(h.over_since("c", "i", 10.0, s(45)), Some(s(30)));
        assert_eq!(h.over_since("c", "i", 100.0, s(35)), None);
        assert_eq!(h.over_since("c", "i", 3.0, s(5)), Some(Duration::ZERO));
    }

    #[test]
    fn the_start_bound_counts_per_allocator_service_and_window() {
        let rec = |s: u64, node: &str, e: Event| Record {
            at: Duration::from_secs(s),
            node: node.into(),
            kind: Kind::Core(e),
        };
        let start = |s: u64, node: &str, svc: &str| {
            rec(s, node, Event::InstanceStarting { instance: physarum_core::types::InstanceId(s), service: svc.into() })
        };
        let gone = |s: u64, node: &str, svc: &str| {
            let instance = physarum_core::types::InstanceId(s);
            rec(s, node, Event::InstanceGone { instance, service: svc.into(), reason: "exited".into() })
        };
        let w = Duration::from_secs(10);
        // Other allocators, other services, or outside the window: fine.
        let ok = vec![start(1, "a", "x"), start(2, "b", "x"), start(3, "a", "y"), start(12, "a", "x")];
        assert!(starts_over_the_bound(&ok, 1, w).is_empty());
        // Twice within 10 s on one allocator: over.
        let twice = vec![start(1, "a", "x"), start(5, "a", "x")];
        assert_eq!(starts_over_the_bound(&twice, 1, w).len(), 1);
        assert!(starts_over_the_bound(&twice, 2, w).is_empty());
        // Unless the first instance ended meanwhile.
        let again = vec![start(1, "a", "x"), gone(3, "a", "x"), start(5, "a", "x")];
        assert!(starts_over_the_bound(&again, 1, w).is_empty());
        // A restarted allocator starts from nothing.
        let restarted = vec![
            start(1, "a", "x"),
            Record { at: Duration::from_secs(2), node: "a".into(), kind: Kind::NodeStarted { incarnation: 2 } },
            start(3, "a", "x"),
        ];
        assert!(starts_over_the_bound(&restarted, 1, w).is_empty());
    }

    #[test]
    fn percentiles_pick_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
