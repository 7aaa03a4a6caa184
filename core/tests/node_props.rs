//! Properties of the composite `Node` over random networks and request schedules.

mod world;

use physarum_core::io::{Input, Outcome};
use physarum_core::types::{PeerId, ReqId};
use proptest::prelude::*;
use std::time::Duration;
use world::*;

/// What an allocator does when asked: start an instance (its rtt ms, listed in the
/// DHT, boot delay ms), or refuse (`None`).
type Starts = Option<(u64, bool, u64)>;

/// One thing that happens at a time: a request (service index, deadline ms) or a
/// route failure for the n-th request.
enum Step {
    Request(usize, u64),
    RouteFailure(usize),
}

#[derive(Clone, Debug)]
struct Scenario {
    /// Per service: instances as (rtt ms, reachable).
    instances: Vec<Vec<(u64, bool)>>,
    /// Allocators: (rtt ms, starts an instance with this rtt, listed in the DHT, boot delay ms) or refuses.
    allocators: Vec<(u64, Starts)>,
    registry_up: bool,
    /// Requests: (at ms, service index — 3 is unknown, deadline ms).
    requests: Vec<(u64, usize, u64)>,
    /// Route failures reported for the n-th request, at a time.
    failures: Vec<(u64, usize)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop::collection::vec((1u64..200, any::<bool>()), 0..4), 3),
        prop::collection::vec((1u64..150, prop::option::of((1u64..150, any::<bool>(), 0u64..3000))), 0..4),
        prop::bool::weighted(0.9),
        prop::collection::vec((0u64..20_000, 0usize..4, 1u64..6000), 1..40),
        prop::collection::vec((0u64..20_000, 0usize..40), 0..5),
    )
        .prop_map(|(instances, allocators, registry_up, requests, failures)| Scenario {
            instances,
            allocators,
            registry_up,
            requests,
            failures,
        })
}

const NAMES: [&str; 4] = ["s0", "s1", "s2", "unknown"];

/// Run a scenario; returns the world for inspection.
fn run(sc: &Scenario) -> World {
    let services: Vec<_> = NAMES[..3].iter().map(|n| service(n, 50, 100)).collect();
    let mut w = World::new(&services);
    if !sc.registry_up {
        w.rtt.remove(&PeerId(REGISTRY.into()));
    }
    for (s, insts) in sc.instances.iter().enumerate() {
        for (i, (rtt, reachable)) in insts.iter().enumerate() {
            let name = format!("i{s}-{i}");
            w.add_instance(&services[s], &name, ms(*rtt));
            if !reachable {
                w.rtt.remove(&PeerId(name));
            }
        }
    }
    for (a, (rtt, starts)) in sc.allocators.iter().enumerate() {
        let behaviour = match starts {
            Some((irtt, in_dht, _)) => {
                AllocatorBehaviour::Start { instance: peer(&format!("new{a}")), rtt: ms(*irtt), in_dht: *in_dht }
            }
            None => AllocatorBehaviour::Refuse("full".into()),
        };
        w.add_allocator(&format!("a{a}"), ms(*rtt), behaviour);
        if let Some((_, _, boot)) = starts {
            w.reachable_from.insert(PeerId(format!("new{a}")), physarum_core::Instant::from_micros(boot * 1000));
        }
    }
    // Interleave requests and failures in time order.
    let mut timeline: Vec<(u64, Step)> = Vec::new();
    timeline.extend(sc.requests.iter().map(|(at, svc, deadline)| (*at, Step::Request(*svc, *deadline))));
    timeline.extend(sc.failures.iter().map(|(at, nth)| (*at, Step::RouteFailure(*nth))));
    timeline.sort_by_key(|(at, _)| *at);
    let mut reqs: Vec<ReqId> = Vec::new();
    for (at, step) in timeline {
        w.run_until(physarum_core::Instant::from_micros(at * 1000));
        match step {
            Step::Request(svc, deadline) => reqs.push(w.request(NAMES[svc], ms(deadline))),
            Step::RouteFailure(nth) => {
                let routed = reqs.get(nth).and_then(|r| w.outcome(*r).cloned());
                if let Some(Outcome::Route { instance, service, .. }) = routed {
                    w.input(Input::RouteFailed { service, peer: instance.peer, reason: "test".into() });
                }
            }
        }
    }
    w.run_for(Duration::from_secs(10));
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_request_gets_exactly_one_response_by_its_deadline(sc in scenario()) {
        let w = run(&sc);
        // (the world itself panics on a second response to one request)
        prop_assert_eq!(w.responses.len(), w.deadlines.len(), "every request answered");
        for (req, deadline) in &w.deadlines {
            let (at, _) = &w.responses[req];
            prop_assert!(at <= deadline, "request {} answered at {:?} after its deadline {:?}", req, at, deadline);
        }
    }

    #[test]
    fn routed_instances_meet_the_hard_limit_and_unknown_names_never_route(sc in scenario()) {
        let w = run(&sc);
        for (req, (_, outcome)) in &w.responses {
            let asked = &w.asked[req];
            match outcome {
                Outcome::Route { instance, .. } => {
                    prop_assert!(asked != "unknown", "request {} for an unregistered name was routed", req);
                    // RTTs are static in these scenarios, so today's RTT is the one measured at selection.
                    let rtt = w.rtt.get(&instance.peer).copied();
                    prop_assert!(rtt.is_some_and(|r| r <= ms(100)), "request {} routed to {:?} with rtt {:?}", req, instance.peer, rtt);
                }
                Outcome::Fail { status, .. } if asked == "unknown" && sc.registry_up => {
                    prop_assert!([404, 504].contains(status), "unknown name answered {}", status);
                }
                Outcome::Fail { status, .. } => prop_assert!([404, 503, 504].contains(status), "status {}", status),
            }
        }
    }

    #[test]
    fn same_inputs_give_the_same_outputs(sc in scenario()) {
        let a = run(&sc);
        let b = run(&sc);
        prop_assert_eq!(a.log, b.log);
    }
}
