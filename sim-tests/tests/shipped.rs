//! The scenario files that show the format's features, the placement policies and the
//! paper's experiments (`scenarios/*.json`) run with their invariants holding, and
//! show what they are there to show.

use physarum_core::io::Event;
use physarum_net_sim::scenario::PlacementSpec;
use physarum_net_sim::timeline::{host_of, Row, Timeline};
use physarum_net_sim::Scenario;
use sim_tests::run_seeds;

fn load(name: &str) -> Scenario {
    let path = format!("{}/../scenarios/{name}.json", env!("CARGO_MANIFEST_DIR"));
    Scenario::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn latency_wave_switches_within_its_bound() {
    let s = load("latency-wave");
    run_seeds("latency_wave_switches_within_its_bound", &s, 1, |r| {
        assert!(r.figures.switches >= 1, "{}", r.figures_text());
    });
}

#[test]
fn link_properties_cut_the_link_while_it_is_too_slow() {
    let s = load("link-properties");
    assert!(s.expanded_schedule().iter().any(|x| x.fault.describe() == "partition client1 | svc1"));
    run_seeds("link_properties_cut_the_link_while_it_is_too_slow", &s, 1, |r| {
        let tl = Timeline::of(&s, r);
        // Over 30 ms from 22 s (cut) until 35 s: served by svc2 meanwhile.
        let mid: Vec<&str> = tl
            .rows
            .iter()
            .filter_map(|row| match row {
                Row::Request { t_ms, host: Some(h), .. } if (23_000.0..35_000.0).contains(t_ms) => Some(h.as_str()),
                _ => None,
            })
            .collect();
        assert!(!mid.is_empty() && mid.iter().all(|h| *h == "svc2"), "{mid:?}");
    });
}

/// Where each camera's service was allocated, in camera order.
fn placed(r: &physarum_net_sim::Report) -> Vec<String> {
    let mut v: Vec<(String, String)> = r
        .events()
        .into_iter()
        .filter_map(|(_, node, e)| match e {
            Event::Allocated { instance, .. } => Some((node, host_of(&instance.0).to_string())),
            _ => None,
        })
        .collect();
    v.sort();
    v.into_iter().map(|x| x.1).collect()
}

#[test]
fn the_example_policies_place_the_cameras_differently() {
    for (policy, want) in [
        ("lowest_rtt", ["near", "near", "near"]),
        ("least_loaded", ["near", "mid", "far"]),
        ("rtt_load_cost", ["near", "mid", "near"]),
    ] {
        let mut s = load("placement");
        // RTTs as measured (turmoil rounds each way up to its 1 ms tick): near 2 ms,
        // mid 4 ms, far 6 ms. At 3 ms per instance, a busy `near` costs 5 ms, a busy
        // `mid` 7 ms.
        let params =
            if policy == "rtt_load_cost" { [("ms_per_instance".to_string(), 3.0)].into() } else { Default::default() };
        s.placement = Some(PlacementSpec { policy: policy.into(), params });
        run_seeds("the_example_policies_place_the_cameras_differently", &s, 1, |r| {
            assert_eq!(placed(r), want, "{policy}");
        });
    }
}

#[test]
fn paper_mobile_edge_switches_about_ten_seconds_after_the_soft_limit() {
    let s = load("paper-mobile-edge");
    run_seeds("paper_mobile_edge_switches_about_ten_seconds_after_the_soft_limit", &s, 2, |r| {
        // bus1's RTT passes the 5 ms soft limit at 30 s (6 ms); the first switch
        // follows after the 10 s grace and one discovery.
        let first = r
            .events()
            .into_iter()
            .find(|(_, _, e)| matches!(e, Event::Switched { .. }))
            .map(|(at, _, _)| at.as_secs_f64())
            .expect("a switch");
        assert!((38.0..44.0).contains(&first), "first switch at {first} s");
        assert_eq!(r.figures.instances_started, 3);
    });
}

#[test]
fn paper_cold_allocation_answers_the_first_request_after_one_start() {
    let s = load("paper-cold-allocation");
    run_seeds("paper_cold_allocation_answers_the_first_request_after_one_start", &s, 2, |r| {
        let first = r.requests.first().unwrap();
        let physarum_net_sim::node::Fate::Answered { latency, served_by: Some(by), .. } = &first.fate else {
            panic!("{:?}", first.fate)
        };
        // The 500 ms boot of the instance, plus discovery and allocation.
        assert!(latency.as_millis() >= 500 && latency.as_millis() < 1_000, "{latency:?}");
        assert_eq!(host_of(by), "edge1");
    });
}
