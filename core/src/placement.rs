//! Placement policies: which of the instances a discovery found is used, and in
//! which order allocators are asked for a new one. The manager keeps the rules that
//! make a choice safe (only candidates within the hard limit, measured recently, and
//! when seeking better only those faster than the instance in use); a policy orders
//! what is left. The default, [`LowestRtt`], is the original's: lowest RTT first.
//!
//! A policy is a plain deterministic function of what was measured (RTT, and the load
//! a candidate reported when the policy asks for it), so the simulation can replay it.
//! Policies beyond the default live outside the core (the simulation's are in
//! `physarum_net_sim::policies`) and are handed to a node through
//! [`crate::config::ManagerConfig::placement`].

use crate::perf::Requirements;
use crate::types::PeerId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What a candidate reported about its load (`wire::Request::Load`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// An allocator: instances running or starting. An instance: requests in flight.
    pub running: u32,
    /// An allocator: how many instances it may run. An instance: 0.
    pub capacity: u32,
    /// An instance: requests it began to serve recently (the last 10 to 20 s).
    pub recent: u32,
}

impl Load {
    /// The share of capacity in use, 0.0 to 1.0 (0 when there is no capacity to speak of).
    pub fn fraction(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            (f64::from(self.running) / f64::from(self.capacity)).min(1.0)
        }
    }
}

/// What is being chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choosing {
    /// An instance found in the DHT (or found again after an allocation).
    Instance,
    /// The order in which to ask allocators for a new instance.
    Allocator,
}

/// A candidate as a policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub peer: &'a PeerId,
    pub rtt: Duration,
    /// `None` unless the policy [`wants_load`](PlacementPolicy::wants_load) and the
    /// candidate answered in time.
    pub load: Option<Load>,
}

/// A placement policy. Lower scores come first; ties go to the lower RTT, then to
/// the lower peer id (so any policy gives one order).
pub trait PlacementPolicy: Send + Sync {
    /// The name a scenario or config selects it by.
    fn name(&self) -> &str;
    /// Whether candidates are asked for their load in each probe round (one more
    /// message to each).
    fn wants_load(&self) -> bool {
        false
    }
    fn score(&self, choosing: Choosing, requirements: &Requirements, candidate: &Candidate<'_>) -> u64;
}

/// The original's rule: the lowest RTT first.
#[derive(Clone, Copy, Debug, Default)]
pub struct LowestRtt;

impl PlacementPolicy for LowestRtt {
    fn name(&self) -> &str {
        "lowest_rtt"
    }

    fn score(&self, _: Choosing, _: &Requirements, c: &Candidate<'_>) -> u64 {
        micros(c.rtt)
    }
}

/// An RTT in whole microseconds (saturating).
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A shared policy in a config: compared and printed by name.
#[derive(Clone)]
pub struct Placement(pub Arc<dyn PlacementPolicy>);

impl Placement {
    pub fn new(policy: impl PlacementPolicy + 'static) -> Self {
        Placement(Arc::new(policy))
    }

    /// `candidates` ordered by the policy: score, then RTT, then peer id.
    pub fn order<T>(
        &self,
        choosing: Choosing,
        reqs: &Requirements,
        candidates: &mut [T],
        view: impl Fn(&T) -> Candidate<'_>,
    ) {
        candidates.sort_by_cached_key(|t| {
            let c = view(t);
            (self.0.score(choosing, reqs, &c), c.rtt, c.peer.clone())
        });
    }
}

impl Default for Placement {
    fn default() -> Self {
        Placement::new(LowestRtt)
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Placement({})", self.0.name())
    }
}

impl PartialEq for Placement {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl Eq for Placement {}

#[cfg(test)]
mod tests {
    use super::*;

    struct MostLoaded;
    impl PlacementPolicy for MostLoaded {
        fn name(&self) -> &str {
            "most_loaded"
        }
        fn score(&self, _: Choosing, _: &Requirements, c: &Candidate<'_>) -> u64 {
            u64::MAX - u64::from(c.load.map_or(0, |l| l.running))
        }
    }

    fn order(p: &Placement, c: &[(&str, u64, u32)]) -> Vec<String> {
        let reqs = Requirements::rtt(Duration::from_millis(5), Duration::from_millis(10));
        let mut v: Vec<(PeerId, Duration, Load)> = c
            .iter()
            .map(|(p, ms, running)| {
                (PeerId(p.to_string()), Duration::from_millis(*ms), Load { running: *running, ..Load::default() })
            })
            .collect();
        p.order(Choosing::Instance, &reqs, &mut v, |(peer, rtt, load)| Candidate {
            peer,
            rtt: *rtt,
            load: Some(*load),
        });
        v.into_iter().map(|x| x.0 .0).collect()
    }

    #[test]
    fn the_default_orders_by_rtt_then_peer() {
        let p = Placement::default();
        assert_eq!(order(&p, &[("b", 3, 0), ("c", 1, 9), ("a", 3, 0)]), ["c", "a", "b"]);
        assert_eq!(format!("{p:?}"), "Placement(lowest_rtt)");
    }

    #[test]
    fn another_policy_reorders_and_ties_fall_back_to_rtt() {
        let p = Placement::new(MostLoaded);
        assert_eq!(order(&p, &[("b", 3, 1), ("c", 1, 9), ("a", 2, 1)]), ["c", "a", "b"]);
        assert_ne!(p, Placement::default());
    }

    #[test]
    fn load_fraction_is_bounded() {
        assert_eq!(Load { running: 3, capacity: 4, recent: 0 }.fraction(), 0.75);
        assert_eq!(Load { running: 9, capacity: 4, recent: 0 }.fraction(), 1.0);
        assert_eq!(Load::default().fraction(), 0.0);
    }
}
