//! A run as data for analysis and plots: every request with the instance that served
//! it and its latency, the choices clients made (selections, switches, allocations,
//! evictions), the RTTs they measured, the instances allocators ran, the faults, and
//! each scheduled link's RTT over time. Written as JSON lines (`timeline.jsonl`, one
//! object per line, `"kind"` says which) by `physarum-sim run --out DIR`.
//!
//! Everything here comes from the trace, the request records and the scenario, so
//! two runs of one seed give the same timeline, byte for byte.

use crate::cluster::Report;
use crate::node::{service_hash, Fate};
use crate::scenario::{Fault, Scenario};
use crate::topology::{pair, Topology};
use crate::trace::Kind;
use physarum_core::io::Event;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// One line of the timeline. Times are simulated milliseconds from the start.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Row {
    /// A client request: when it was sent and what became of it.
    Request {
        t_ms: f64,
        seq: u64,
        client: String,
        service: String,
        /// `ok`, `failed` (an error status), `error` (no HTTP answer), `timed_out`,
        /// `lost` (its client crashed) or `in_flight` (the run ended first).
        outcome: &'static str,
        status: Option<u16>,
        /// The instance that served it, and that instance's host.
        served_by: Option<String>,
        host: Option<String>,
        latency_ms: Option<f64>,
    },
    /// A scheduled fault as applied (latency changes are `link` rows).
    Fault {
        t_ms: f64,
        what: String,
    },
    /// A link's RTT was set (a latency fault or a step of a sweep or shape).
    Link {
        t_ms: f64,
        a: String,
        b: String,
        rtt_ms: f64,
    },
    /// A client chose an instance (after discovery or allocation), with its RTT.
    Selected {
        t_ms: f64,
        client: String,
        service: String,
        instance: String,
        rtt_ms: f64,
    },
    /// A client moved to a better instance.
    Switched {
        t_ms: f64,
        client: String,
        service: String,
        from: String,
        to: String,
    },
    /// An allocator started (or handed back) an instance for a client.
    Allocated {
        t_ms: f64,
        client: String,
        service: String,
        allocator: String,
        instance: String,
    },
    /// An allocator could not help.
    AllocationRefused {
        t_ms: f64,
        client: String,
        service: String,
        allocator: String,
        reason: String,
    },
    /// A client's peer cache dropped an instance.
    Evicted {
        t_ms: f64,
        client: String,
        service: String,
        instance: String,
        reason: String,
    },
    /// A peer-cache probe: the RTT a client measured to an instance (none: lost).
    Probe {
        t_ms: f64,
        client: String,
        peer: String,
        rtt_ms: Option<f64>,
    },
    /// An allocator's instance came up / ended.
    InstanceUp {
        t_ms: f64,
        allocator: String,
        service: String,
        instance: String,
    },
    InstanceEnded {
        t_ms: f64,
        allocator: String,
        service: String,
        reason: String,
    },
}

impl Row {
    pub fn t_ms(&self) -> f64 {
        match self {
            Row::Request { t_ms, .. }
            | Row::Fault { t_ms, .. }
            | Row::Link { t_ms, .. }
            | Row::Selected { t_ms, .. }
            | Row::Switched { t_ms, .. }
            | Row::Allocated { t_ms, .. }
            | Row::AllocationRefused { t_ms, .. }
            | Row::Evicted { t_ms, .. }
            | Row::Probe { t_ms, .. }
            | Row::InstanceUp { t_ms, .. }
            | Row::InstanceEnded { t_ms, .. } => *t_ms,
        }
    }
}

/// A stretch of time a fault lasted (a partition until its repair, a crash until the
/// restart, ...), for shading; `end_ms` is the run's end if nothing healed it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Span {
    pub from_ms: f64,
    pub to_ms: f64,
    pub label: String,
}

/// A run's timeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    pub scenario: String,
    pub seed: u64,
    pub duration_ms: f64,
    pub rows: Vec<Row>,
    pub spans: Vec<Span>,
    /// Each link whose RTT the schedule changes: its RTT over time, as steps
    /// (from the start of the run).
    pub links: BTreeMap<(String, String), Vec<(f64, f64)>>,
    /// Soft and hard limits of each service, ms.
    pub limits: BTreeMap<String, (f64, f64)>,
}

fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// The host an instance runs on (`bus1~1.i3` → `bus1`; a static instance is its host).
pub fn host_of(instance: &str) -> &str {
    instance.split('~').next().unwrap_or(instance)
}

impl Timeline {
    pub fn of(scenario: &Scenario, report: &Report) -> Timeline {
        let name_of: BTreeMap<String, String> =
            scenario.services.iter().map(|s| (service_hash(&s.name).0, s.name.clone())).collect();
        let svc = |hash: &str| name_of.get(hash).cloned().unwrap_or_else(|| hash.to_string());
        let mut rows = Vec::new();
        for r in &report.requests {
            let (outcome, status, served_by, latency_ms) = match &r.fate {
                Fate::Answered { status, served_by, latency } => {
                    let outcome = if (200..300).contains(status) { "ok" } else { "failed" };
                    (outcome, Some(*status), served_by.clone(), Some(ms(*latency)))
                }
                Fate::Error(_) => ("error", None, None, None),
                Fate::TimedOut => ("timed_out", None, None, None),
                Fate::Pending if r.at + r.deadline >= report.simulated => ("in_flight", None, None, None),
                Fate::Pending => ("lost", None, None, None),
            };
            rows.push(Row::Request {
                t_ms: ms(r.at),
                seq: r.seq,
                client: r.client.clone(),
                service: r.service.clone(),
                outcome,
                status,
                host: served_by.as_deref().map(|s| host_of(s).to_string()),
                served_by,
                latency_ms,
            });
        }
        for rec in report.trace.records() {
            let t_ms = ms(rec.at);
            let node = rec.node.clone();
            let row = match rec.kind {
                Kind::Fault(what) => Row::Fault { t_ms, what },
                Kind::Core(e) => match e {
                    Event::Selected { service, instance, rtt } => Row::Selected {
                        t_ms,
                        client: node,
                        service: svc(&service.0),
                        instance: instance.0,
                        rtt_ms: ms(rtt),
                    },
                    Event::Switched { service, from, to } => {
                        Row::Switched { t_ms, client: node, service: svc(&service.0), from: from.0, to: to.0 }
                    }
                    Event::Allocated { service, allocator, instance } => {
                        Row::Allocated { t_ms, client: node, service, allocator: allocator.0, instance: instance.0 }
                    }
                    Event::AllocationRefused { service, allocator, reason } => {
                        Row::AllocationRefused { t_ms, client: node, service, allocator: allocator.0, reason }
                    }
                    Event::Evicted { service, peer, reason } => {
                        Row::Evicted { t_ms, client: node, service: svc(&service.0), instance: peer.0, reason }
                    }
                    Event::Probed { peer, rtt } => Row::Probe { t_ms, client: node, peer: peer.0, rtt_ms: rtt.map(ms) },
                    Event::InstanceUp { service, peer, .. } => {
                        Row::InstanceUp { t_ms, allocator: node, service, instance: peer.0 }
                    }
                    Event::InstanceCulled { service, reason, .. } | Event::InstanceGone { service, reason, .. } => {
                        Row::InstanceEnded { t_ms, allocator: node, service, reason }
                    }
                    _ => continue,
                },
                _ => continue,
            };
            rows.push(row);
        }
        let end = ms(report.simulated).max(scenario.duration_ms as f64);
        let topology = Topology::of(scenario);
        let mut links: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for s in scenario.expanded_schedule() {
            if let Fault::Latency { a, b, rtt_ms } = &s.fault {
                let t_ms = s.at_ms as f64;
                rows.push(Row::Link { t_ms, a: a.clone(), b: b.clone(), rtt_ms: *rtt_ms });
                let steps = links.entry(pair(a, b)).or_insert_with(|| vec![(0.0, topology.rtt_ms(a, b))]);
                steps.push((t_ms, *rtt_ms));
            }
        }
        // Stable: rows at one time keep the order they were gathered in.
        rows.sort_by(|x, y| x.t_ms().total_cmp(&y.t_ms()));
        let limits = scenario
            .services
            .iter()
            .map(|s| {
                let l = scenario.limits_of(&s.name);
                (s.name.clone(), (l.soft_ms as f64, l.hard_ms as f64))
            })
            .collect();
        Timeline {
            scenario: scenario.name.clone(),
            seed: report.seed,
            duration_ms: end,
            rows,
            spans: fault_spans(scenario, end),
            links,
            limits,
        }
    }

    /// The timeline as JSON lines, one row per line.
    pub fn jsonl(&self) -> String {
        let mut s = String::new();
        for r in &self.rows {
            let _ = writeln!(s, "{}", serde_json::to_string(r).expect("rows always serialise"));
        }
        s
    }

    /// The requests as CSV (`t_ms,seq,client,service,outcome,status,served_by,host,latency_ms`).
    pub fn requests_csv(&self) -> String {
        let mut s = String::from("t_ms,seq,client,service,outcome,status,served_by,host,latency_ms\n");
        for r in &self.rows {
            if let Row::Request { t_ms, seq, client, service, outcome, status, served_by, host, latency_ms } = r {
                let opt = |o: Option<String>| o.unwrap_or_default();
                let _ = writeln!(
                    s,
                    "{t_ms:.3},{seq},{client},{service},{outcome},{},{},{},{}",
                    opt(status.map(|x| x.to_string())),
                    opt(served_by.clone()),
                    opt(host.clone()),
                    opt(latency_ms.map(|l| format!("{l:.3}")))
                );
            }
        }
        s
    }

    /// Hosts that served requests, in order of their first request.
    pub fn serving_hosts(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for r in &self.rows {
            if let Row::Request { host: Some(h), .. } = r {
                if !seen.contains(h) {
                    seen.push(h.clone());
                }
            }
        }
        seen
    }

    /// When the serving host changed: (time, new host), from the requests in order.
    pub fn serving_changes(&self, client: &str) -> Vec<(f64, String)> {
        let mut out: Vec<(f64, String)> = Vec::new();
        for r in &self.rows {
            if let Row::Request { t_ms, client: c, host: Some(h), outcome: "ok", .. } = r {
                if c == client && out.last().is_none_or(|(_, last)| last != h) {
                    out.push((*t_ms, h.clone()));
                }
            }
        }
        out
    }
}

/// Faults that last from one scheduled entry to another (or the end of the run).
fn fault_spans(scenario: &Scenario, end_ms: f64) -> Vec<Span> {
    // Open faults: key → (start, label).
    let mut open: BTreeMap<String, (f64, String)> = BTreeMap::new();
    let mut spans = Vec::new();
    let mut close = |open: &mut BTreeMap<String, (f64, String)>, key: String, at: f64| {
        if let Some((from, label)) = open.remove(&key) {
            spans.push(Span { from_ms: from, to_ms: at, label });
        }
    };
    for s in scenario.expanded_schedule() {
        let at = s.at_ms as f64;
        let sides = |a: &[String], b: &[String]| format!("{}|{}", a.join(","), b.join(","));
        match &s.fault {
            Fault::Partition { a, b } => {
                open.entry(format!("cut {}", sides(a, b))).or_insert((at, s.fault.describe()));
            }
            Fault::Repair { a, b } => close(&mut open, format!("cut {}", sides(a, b)), at),
            Fault::Crash { node } | Fault::BootstrapDown { node } => {
                open.entry(format!("down {node}")).or_insert((at, s.fault.describe()));
            }
            Fault::Restart { node } | Fault::BootstrapUp { node } => close(&mut open, format!("down {node}"), at),
            Fault::HangApps { node } => {
                open.entry(format!("hang {node}")).or_insert((at, s.fault.describe()));
            }
            Fault::ResumeApps { node } => close(&mut open, format!("hang {node}"), at),
            Fault::Loss { a, b, rate } => {
                let (x, y) = pair(a, b);
                let key = format!("loss {x}|{y}");
                close(&mut open, key.clone(), at);
                if *rate > 0.0 {
                    open.insert(key, (at, s.fault.describe()));
                }
            }
            _ => {}
        }
    }
    for (key, (from, label)) in open {
        // Loss for the whole run is a property of the link (`links[].loss`), not an event.
        if !(from == 0.0 && key.starts_with("loss")) {
            spans.push(Span { from_ms: from, to_ms: end_ms, label });
        }
    }
    spans.sort_by(|x, y| x.from_ms.total_cmp(&y.from_ms));
    spans
}
