//! The network's round-trip times as a scenario sets them at the start: a listed
//! link's RTT; else, between two nodes placed on the plane (`NodeSpec::at`, in ms),
//! the default RTT plus their distance; else the default RTT. Both engines (turmoil
//! and [`crate::des`]) and the invariant checks read links through this.

use crate::scenario::Scenario;
use std::collections::BTreeMap;

/// A host pair in a canonical order.
pub fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// The RTT between two placed nodes: the default RTT plus their distance.
pub fn plane_rtt_ms(default_rtt_ms: f64, p: [f64; 2], q: [f64; 2]) -> f64 {
    default_rtt_ms + ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt()
}

#[derive(Clone, Debug, Default)]
pub struct Topology {
    default_rtt_ms: f64,
    links: BTreeMap<(String, String), f64>,
    positions: BTreeMap<String, [f64; 2]>,
}

impl Topology {
    pub fn of(scenario: &Scenario) -> Topology {
        Topology {
            default_rtt_ms: scenario.default_rtt_ms,
            links: scenario.links.iter().map(|l| (pair(&l.a, &l.b), l.rtt_ms)).collect(),
            positions: scenario.nodes.iter().filter_map(|n| n.at.map(|p| (n.name.clone(), p))).collect(),
        }
    }

    /// The RTT in ms between hosts `a` and `b` at the start of a run.
    pub fn rtt_ms(&self, a: &str, b: &str) -> f64 {
        if let Some(r) = self.links.get(&pair(a, b)) {
            return *r;
        }
        match (self.positions.get(a), self.positions.get(b)) {
            (Some(p), Some(q)) => plane_rtt_ms(self.default_rtt_ms, *p, *q),
            _ => self.default_rtt_ms,
        }
    }

    /// Whether `a`'s link to `b` is set by a listed link or by positions (not by the default).
    pub fn is_set(&self, a: &str, b: &str) -> bool {
        self.links.contains_key(&pair(a, b)) || (self.positions.contains_key(a) && self.positions.contains_key(b))
    }

    pub fn placed(&self) -> impl Iterator<Item = &String> {
        self.positions.keys()
    }
}
