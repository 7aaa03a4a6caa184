//! Placement policies beyond the core's default, selected by name in a scenario
//! (`"placement": {"policy": "least_loaded"}`). Each is a small implementation of
//! `physarum_core::placement::PlacementPolicy`; the core keeps its safety rules
//! (hard limit, fresh measurements, only faster instances when seeking better) and
//! asks the policy only for an order.
//!
//! To add one: implement the trait (a name, whether it wants load reports, a score —
//! lower is better), and add it to [`by_name`].

use physarum_core::perf::Requirements;
use physarum_core::placement::{micros, Candidate, Choosing, LowestRtt, Placement, PlacementPolicy};
use std::collections::BTreeMap;

/// Every policy name [`by_name`] knows.
pub const NAMES: [&str; 3] = ["lowest_rtt", "least_loaded", "rtt_load_cost"];

/// The policy called `name`, with its parameters (unknown names and parameters are
/// an error).
pub fn by_name(name: &str, params: &BTreeMap<String, f64>) -> Result<Placement, String> {
    let allowed: &[&str] = match name {
        "lowest_rtt" | "least_loaded" => &[],
        "rtt_load_cost" => &["ms_per_instance", "ms_per_request"],
        other => return Err(format!("unknown placement policy {other:?} (known: {})", NAMES.join(", "))),
    };
    for (k, v) in params {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("placement policy {name:?} has no parameter {k:?}"));
        }
        if !v.is_finite() || *v < 0.0 || *v > 1e6 {
            return Err(format!("placement parameter {k:?} must be within 0..=1e6"));
        }
    }
    let get = |k: &str, default: f64| params.get(k).copied().unwrap_or(default);
    Ok(match name {
        "lowest_rtt" => Placement::new(LowestRtt),
        "least_loaded" => Placement::new(LeastLoaded),
        _ => Placement::new(RttLoadCost {
            ms_per_instance: get("ms_per_instance", 2.0),
            ms_per_request: get("ms_per_request", 0.05),
        }),
    })
}

/// Scores past every score of a candidate within the soft limit.
const OVER_SOFT: u64 = 1 << 62;

/// The least-loaded candidate within the soft limit; beyond it, the lowest RTT. An
/// allocator's load is the share of its capacity in use, an instance's the requests
/// it served recently; a candidate that did not report counts as the most loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastLoaded;

impl PlacementPolicy for LeastLoaded {
    fn name(&self) -> &str {
        "least_loaded"
    }

    fn wants_load(&self) -> bool {
        true
    }

    fn score(&self, choosing: Choosing, reqs: &Requirements, c: &Candidate<'_>) -> u64 {
        if reqs.soft.rtt.is_some_and(|soft| c.rtt > soft) {
            return OVER_SOFT.saturating_add(micros(c.rtt));
        }
        match (choosing, c.load) {
            (_, None) => OVER_SOFT - 1,
            (Choosing::Allocator, Some(l)) => (l.fraction() * 1e6) as u64,
            (Choosing::Instance, Some(l)) => u64::from(l.recent) + u64::from(l.running),
        }
    }
}

/// A cost in milliseconds: the RTT plus `ms_per_instance` for each instance an
/// allocator runs, or `ms_per_request` for each request an instance served recently.
/// Unreported load costs nothing (the RTT alone decides).
#[derive(Clone, Copy, Debug)]
pub struct RttLoadCost {
    pub ms_per_instance: f64,
    pub ms_per_request: f64,
}

impl PlacementPolicy for RttLoadCost {
    fn name(&self) -> &str {
        "rtt_load_cost"
    }

    fn wants_load(&self) -> bool {
        true
    }

    fn score(&self, choosing: Choosing, _: &Requirements, c: &Candidate<'_>) -> u64 {
        let l = c.load.unwrap_or_default();
        let penalty_ms = match choosing {
            Choosing::Allocator => self.ms_per_instance * f64::from(l.running),
            Choosing::Instance => self.ms_per_request * (f64::from(l.recent) + f64::from(l.running)),
        };
        micros(c.rtt).saturating_add((penalty_ms * 1000.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::placement::Load;
    use physarum_core::types::PeerId;
    use std::time::Duration;

    fn order(p: &Placement, choosing: Choosing, c: &[(&str, u64, Option<Load>)]) -> Vec<String> {
        let reqs = Requirements::rtt(Duration::from_millis(5), Duration::from_millis(10));
        let mut v: Vec<(PeerId, Duration, Option<Load>)> =
            c.iter().map(|(p, ms, l)| (PeerId(p.to_string()), Duration::from_millis(*ms), *l)).collect();
        p.order(choosing, &reqs, &mut v, |(peer, rtt, load)| Candidate { peer, rtt: *rtt, load: *load });
        v.into_iter().map(|x| x.0 .0).collect()
    }

    fn alloc(running: u32) -> Option<Load> {
        Some(Load { running, capacity: 4, recent: 0 })
    }

    #[test]
    fn least_loaded_prefers_spare_capacity_within_the_soft_limit() {
        let p = by_name("least_loaded", &BTreeMap::new()).unwrap();
        let a = Choosing::Allocator;
        assert_eq!(
            order(&p, a, &[("near", 1, alloc(2)), ("mid", 3, alloc(1)), ("far", 7, alloc(0))]),
            ["mid", "near", "far"]
        );
        // Unreported load counts as the most loaded; over the soft limit, RTT alone.
        assert_eq!(
            order(&p, a, &[("near", 1, None), ("mid", 3, alloc(3)), ("far", 8, None), ("f2", 6, alloc(0))]),
            ["mid", "near", "f2", "far"]
        );
        let busy = Some(Load { running: 0, capacity: 0, recent: 40 });
        let idle = Some(Load { running: 0, capacity: 0, recent: 2 });
        assert_eq!(order(&p, Choosing::Instance, &[("a", 1, busy), ("b", 4, idle)]), ["b", "a"]);
    }

    #[test]
    fn the_cost_weighs_rtt_against_load() {
        let cheap = by_name("rtt_load_cost", &[("ms_per_instance".to_string(), 1.0)].into()).unwrap();
        let dear = by_name("rtt_load_cost", &[("ms_per_instance".to_string(), 4.0)].into()).unwrap();
        let c = [("near", 1, alloc(1)), ("mid", 3, alloc(0))];
        assert_eq!(order(&cheap, Choosing::Allocator, &c), ["near", "mid"]);
        assert_eq!(order(&dear, Choosing::Allocator, &c), ["mid", "near"]);
    }

    #[test]
    fn unknown_names_and_parameters_are_refused() {
        assert!(by_name("fastest", &BTreeMap::new()).unwrap_err().contains("unknown placement policy"));
        let bad = [("ms_per_instance".to_string(), 1.0)].into();
        assert!(by_name("least_loaded", &bad).unwrap_err().contains("no parameter"));
        let nan = [("ms_per_instance".to_string(), f64::NAN)].into();
        assert!(by_name("rtt_load_cost", &nan).is_err());
        for n in NAMES {
            assert_eq!(by_name(n, &BTreeMap::new()).unwrap().0.name(), n);
        }
    }
}
