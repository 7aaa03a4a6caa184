//! The run's trace: significant events in the order they happened, each stamped with
//! simulated time and the node it happened on, and a stable hash over a canonical
//! text form of it (SHA-256). Nothing that varies between runs of the same seed goes
//! in: no wall clock, no IP addresses, no `HashMap` order.

use physarum_core::io::{Event, Outcome, Output};
use physarum_core::types::DhtKey;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

/// One trace entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Simulated time since the start of the run.
    pub at: Duration,
    /// Peer id of the node it happened on (`sim` for the fault injector).
    pub node: String,
    pub kind: Kind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A fault was applied.
    Fault(String),
    /// A node (re)started on a host; `incarnation` counts the starts of that host.
    NodeStarted { incarnation: u32 },
    /// A node's bootstrap connection state changed.
    Bootstrap(String),
    /// A node stopped on its own (e.g. no bootstrap reachable).
    NodeExited(String),
    /// A client application sent request `seq` for `service`.
    Request { seq: u64, service: String },
    /// The client application got an answer to request `seq`.
    Response { seq: u64, status: u16, served_by: Option<String>, latency: Duration },
    /// The client application got no HTTP answer (connection error).
    RequestError { seq: u64, reason: String },
    /// The client gave up on request `seq` at its deadline.
    TimedOut { seq: u64 },
    /// The core routed a client request to `instance`.
    Routed { service: String, instance: String },
    /// The core answered a client request with an error.
    Refused { status: u16, reason: String },
    /// A core event.
    Core(Event),
    /// The core asked to advertise a key in the DHT.
    Advertise(String),
    /// The instance driver started / stopped an instance process.
    Driver(String),
}

impl Record {
    /// The canonical one-line text form the hash is computed over.
    pub fn line(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "{:>12} {} ", self.at.as_micros(), self.node);
        match &self.kind {
            Kind::Fault(f) => {
                let _ = write!(s, "fault {f}");
            }
            Kind::NodeStarted { incarnation } => {
                let _ = write!(s, "started incarnation={incarnation}");
            }
            Kind::Bootstrap(m) => {
                let _ = write!(s, "bootstrap {m}");
            }
            Kind::NodeExited(m) => {
                let _ = write!(s, "exited {m}");
            }
            Kind::Request { seq, service } => {
                let _ = write!(s, "request #{seq} {service}");
            }
            Kind::Response { seq, status, served_by, latency } => {
                let _ = write!(
                    s,
                    "response #{seq} {status} by={} in={}us",
                    served_by.as_deref().unwrap_or("-"),
                    latency.as_micros()
                );
            }
            Kind::RequestError { seq, reason } => {
                let _ = write!(s, "request-error #{seq} {reason}");
            }
            Kind::TimedOut { seq } => {
                let _ = write!(s, "timed-out #{seq}");
            }
            Kind::Routed { service, instance } => {
                let _ = write!(s, "route {service} -> {instance}");
            }
            Kind::Refused { status, reason } => {
                let _ = write!(s, "refuse {status} {reason}");
            }
            Kind::Core(e) => {
                let _ = write!(s, "event {}", event_text(e));
            }
            Kind::Advertise(k) => {
                let _ = write!(s, "advertise {k}");
            }
            Kind::Driver(m) => {
                let _ = write!(s, "driver {m}");
            }
        }
        s
    }
}

/// Canonical text of a DHT key.
pub fn key_text(k: &DhtKey) -> String {
    match k {
        DhtKey::Service(h) => format!("service:{h}"),
        DhtKey::Allocators => "allocators".into(),
        DhtKey::Registry => "registry".into(),
    }
}

/// Canonical text of a core event (durations in µs, no `Debug` formatting of floats).
pub fn event_text(e: &Event) -> String {
    match e {
        Event::CacheHit { service, instance } => format!("cache-hit {service} {instance}"),
        Event::DiscoveryFinished { service, took, allocated, found } => {
            format!("discovery {service} took={}us allocated={allocated} found={found}", took.as_micros())
        }
        Event::Allocated { service, allocator, instance } => format!("allocated {service} by={allocator} {instance}"),
        Event::AllocationRefused { service, allocator, reason } => {
            format!("allocation-refused {service} by={allocator} {reason}")
        }
        Event::Evicted { service, peer, reason } => format!("evicted {service} {peer} {reason}"),
        Event::Selected { service, instance, rtt } => format!("selected {service} {instance} {}us", rtt.as_micros()),
        Event::Retried { service } => format!("retried {service}"),
        Event::RetryRefused { service } => format!("retry-refused {service}"),
        Event::AppHealth { service, answering } => format!("app-health {service} answering={answering}"),
        Event::Untrusted { service, peer, reason } => format!("untrusted {service} {peer} {reason}"),
        Event::SeekBetter { service, peer } => format!("seek-better {service} {peer}"),
        Event::Switched { service, from, to } => format!("switched {service} {from} -> {to}"),
        Event::Probed { peer, rtt } => match rtt {
            Some(r) => format!("probed {peer} {}us", r.as_micros()),
            None => format!("probed {peer} lost"),
        },
        Event::InstanceStarting { instance, service } => format!("instance-starting {instance} {service}"),
        Event::InstanceUp { instance, service, peer } => format!("instance-up {instance} {service} {peer}"),
        Event::InstanceCulled { instance, service, reason } => format!("instance-culled {instance} {service} {reason}"),
        Event::InstanceGone { instance, service, reason } => format!("instance-gone {instance} {service} {reason}"),
    }
}

/// The shared, append-only trace of one run. Cheap to clone (a handle); everything in
/// a turmoil simulation runs on one thread.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    records: Rc<RefCell<Vec<Record>>>,
}

impl Trace {
    pub fn new() -> Self {
        Trace::default()
    }

    /// Record `kind` on `node` at simulated time `at`.
    pub fn push(&self, at: Duration, node: &str, kind: Kind) {
        self.records.borrow_mut().push(Record { at, node: node.to_string(), kind });
    }

    /// Record from inside a host: the time is the simulation's.
    pub fn here(&self, node: &str, kind: Kind) {
        self.push(sim_now(), node, kind);
    }

    /// Record an output of a node's core worth tracing (routing decisions, errors, events).
    pub fn output(&self, node: &str, output: &Output) {
        self.output_at(sim_now(), node, output)
    }

    /// [`Trace::output`] at a given simulated time (the event-driven engine's clock).
    pub fn output_at(&self, at: Duration, node: &str, output: &Output) {
        let kind = match output {
            Output::Respond { outcome: Outcome::Route { instance, service, .. }, .. } => {
                Kind::Routed { service: service.to_string(), instance: instance.peer.to_string() }
            }
            Output::Respond { outcome: Outcome::Fail { status, reason }, .. } => {
                Kind::Refused { status: *status, reason: reason.clone() }
            }
            Output::Event(e) => Kind::Core(e.clone()),
            Output::Advertise { key } => Kind::Advertise(key_text(key)),
            _ => return,
        };
        self.push(at, node, kind);
    }

    pub fn len(&self) -> usize {
        self.records.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every record so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.borrow().clone()
    }

    /// The canonical text: one line per record.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for r in self.records.borrow().iter() {
            s.push_str(&r.line());
            s.push('\n');
        }
        s
    }

    /// SHA-256 of [`Trace::text`], as 64 lowercase hex digits.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for r in self.records.borrow().iter() {
            h.update(r.line().as_bytes());
            h.update(b"\n");
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The simulated time, from inside a host (zero outside a simulation).
pub fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_content_and_order() {
        let a = Trace::new();
        a.push(Duration::from_millis(1), "n1", Kind::Fault("crash x".into()));
        a.push(Duration::from_millis(2), "n2", Kind::TimedOut { seq: 3 });
        let b = Trace::new();
        b.push(Duration::from_millis(1), "n1", Kind::Fault("crash x".into()));
        b.push(Duration::from_millis(2), "n2", Kind::TimedOut { seq: 3 });
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
        let c = Trace::new();
        c.push(Duration::from_millis(2), "n2", Kind::TimedOut { seq: 3 });
        c.push(Duration::from_millis(1), "n1", Kind::Fault("crash x".into()));
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.text().lines().count(), 2);
        assert!(a.text().starts_with("        1000 n1 fault crash x\n"));
    }
}
