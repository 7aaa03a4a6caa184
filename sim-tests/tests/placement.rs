//! Placement policies chosen by name in a scenario change where clients are served,
//! and per-node allocator capacity is honoured. The default (lowest RTT) is what every
//! other test runs.

use physarum_core::io::Event;
use physarum_net_sim::node::{Fate, RequestRecord};
use physarum_net_sim::scenario::AllocatorSpec;
use physarum_net_sim::timeline::host_of;
use physarum_net_sim::{Report, Scenario, ScenarioBuilder};
use sim_tests::run_seeds;

/// A client needing two services, `s1` then `s2`, with allocators `near` (1 ms) and
/// `mid` (3 ms), both within the 5 ms soft limit.
fn two_services(near: AllocatorSpec, policy: Option<(&str, &[(&str, f64)])>) -> Scenario {
    let mut b = ScenarioBuilder::new("placement-allocators", 14_000)
        .service("s1", 5, 10)
        .service("s2", 5, 10)
        .bootstrap("boot")
        .registry("reg")
        .allocator_with("near", near)
        .allocator("mid")
        .client("c")
        .link("c", "near", 1.0)
        .link("c", "mid", 3.0)
        .requests("c", "s1", 1_000, 12_000, 2.0)
        .requests("c", "s2", 6_000, 7_000, 2.0);
    if let Some((name, params)) = policy {
        b = b.placement(name, params);
    }
    b.build().unwrap()
}

/// The host of the allocator that started `service`'s instance.
fn allocated_on(r: &Report, service: &str) -> Vec<String> {
    r.events()
        .into_iter()
        .filter_map(|(_, _, e)| match e {
            Event::Allocated { service: s, instance, .. } if s == service => Some(host_of(&instance.0).to_string()),
            _ => None,
        })
        .collect()
}

fn check_allocations(test: &str, s: &Scenario, want_s2: &str) {
    run_seeds(test, s, 2, |r| {
        assert_eq!(allocated_on(r, "s1"), ["near"]);
        assert_eq!(allocated_on(r, "s2"), [want_s2]);
        let s2_hosts: Vec<String> = served(r, |q| q.service == "s2");
        assert_eq!(s2_hosts, [want_s2]);
        assert!(r.figures.failed + r.figures.timed_out == 0, "{}", r.figures_text());
    });
}

#[test]
fn the_default_asks_the_closest_allocator() {
    check_allocations("the_default_asks_the_closest_allocator", &two_services(AllocatorSpec::default(), None), "near");
}

#[test]
fn least_loaded_asks_the_allocator_with_spare_capacity() {
    let s = two_services(AllocatorSpec::default(), Some(("least_loaded", &[])));
    check_allocations("least_loaded_asks_the_allocator_with_spare_capacity", &s, "mid");
}

#[test]
fn the_cost_function_weighs_rtt_against_allocator_load() {
    // One instance on `near` costs 4 ms: 1 + 4 > 3, so `mid`; at 1 ms, 1 + 1 < 3: `near`.
    let dear = two_services(AllocatorSpec::default(), Some(("rtt_load_cost", &[("ms_per_instance", 4.0)])));
    check_allocations("the_cost_function_weighs_rtt_against_allocator_load", &dear, "mid");
    let cheap = two_services(AllocatorSpec::default(), Some(("rtt_load_cost", &[("ms_per_instance", 1.0)])));
    check_allocations("the_cost_function_weighs_rtt_against_allocator_load", &cheap, "near");
}

#[test]
fn a_full_allocator_refuses_and_the_next_one_starts_the_instance() {
    // `near` may run one instance: the default asks it first for s2, it refuses, `mid` starts it.
    let small = AllocatorSpec { max_instances: 1, ..AllocatorSpec::default() };
    let s = two_services(small, None);
    run_seeds("a_full_allocator_refuses_and_the_next_one_starts_the_instance", &s, 2, |r| {
        assert_eq!(allocated_on(r, "s2"), ["mid"]);
        let refused = r.count_events(|e| {
            matches!(e, Event::AllocationRefused { service, allocator, reason }
                if service == "s2" && allocator.0 == "near" && reason.contains("no capacity"))
        });
        assert!(refused >= 1);
    });
    // CPU capacity counts too: room for one 100-millicore instance only.
    let cpu = AllocatorSpec { cpu_millis: 150, ..AllocatorSpec::default() };
    run_seeds("a_full_allocator_refuses_and_the_next_one_starts_the_instance", &two_services(cpu, None), 1, |r| {
        assert_eq!(allocated_on(r, "s2"), ["mid"]);
    });
}

/// Two static instances of one service, `svc1` at 1 ms and `svc2` at 3 ms from both
/// clients; `busy` sends 5 requests a second from the start, `late` starts at 8 s.
fn static_instances(policy: Option<&str>) -> Scenario {
    let mut b = ScenarioBuilder::new("placement-instances", 12_000)
        .service("hello", 5, 10)
        .bootstrap("boot")
        .registry("reg")
        .service_node("svc1", "hello")
        .service_node("svc2", "hello")
        .client("busy")
        .client("late")
        .link("busy", "svc1", 1.0)
        .link("busy", "svc2", 3.0)
        .link("late", "svc1", 1.0)
        .link("late", "svc2", 3.0)
        .requests("busy", "hello", 1_000, 10_000, 5.0)
        .requests("late", "hello", 8_000, 3_000, 2.0);
    if let Some(p) = policy {
        b = b.placement(p, &[]);
    }
    b.build().unwrap()
}

/// The hosts that served the requests `which` picks, in order, repeats left out.
fn served(r: &Report, which: impl Fn(&RequestRecord) -> bool) -> Vec<String> {
    let mut hosts: Vec<String> = r
        .requests
        .iter()
        .filter(|q| which(q))
        .filter_map(|q| match &q.fate {
            Fate::Answered { served_by: Some(by), .. } => Some(host_of(by).to_string()),
            _ => None,
        })
        .collect();
    hosts.dedup();
    hosts
}

#[test]
fn least_loaded_sends_a_new_client_to_the_idle_instance() {
    run_seeds("least_loaded_sends_a_new_client_to_the_idle_instance", &static_instances(None), 1, |r| {
        assert_eq!(served(r, |q| q.client == "late"), ["svc1"]);
    });
    let s = static_instances(Some("least_loaded"));
    run_seeds("least_loaded_sends_a_new_client_to_the_idle_instance", &s, 2, |r| {
        assert_eq!(served(r, |q| q.client == "late"), ["svc2"]);
    });
}

#[test]
fn a_scenario_names_its_policy() {
    let text = two_services(AllocatorSpec::default(), Some(("rtt_load_cost", &[("ms_per_instance", 4.0)]))).to_json();
    assert!(text.contains("\"policy\": \"rtt_load_cost\""), "{text}");
    let s = Scenario::from_json(&text).unwrap();
    assert_eq!(s.placement.as_ref().unwrap().params["ms_per_instance"], 4.0);
    let bad = text.replace("rtt_load_cost", "fastest_please");
    assert!(Scenario::from_json(&bad).unwrap_err().0.contains("unknown placement policy"));
}
