//! Each invariant the random fault schedules check can fire: a small scenario holds
//! it with the real core and breaks it with a deliberately broken one (a test-only
//! defect switched on in every node, `physarum_core::config::Defects`), on both
//! engines (the random cases run on the event-driven one).

use physarum_net_sim::scenario::{Defect, Invariants, Tuning};
use physarum_net_sim::{Fault, Scenario, ScenarioBuilder, Workload};
use sim_tests::{run_one_on, Engine, BASE_SEED};

/// The violations of `scenario` with the real core, and with `defect` switched on,
/// on each engine: `(engine, sound, broken)`.
fn with_and_without(test: &str, scenario: Scenario, defect: Defect) -> Vec<(Engine, Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    for engine in [Engine::Turmoil, Engine::Des] {
        let sound = run_one_on(engine, test, &scenario, BASE_SEED).violations;
        let mut broken = scenario.clone();
        broken.tuning.defects = vec![defect];
        let report = run_one_on(engine, test, &broken, BASE_SEED);
        if std::env::var_os("DEBUG_BROKEN").is_some() {
            eprintln!("--- {} ---\n{}\n{}", engine.name(), report.summary(), report.timeline());
            for r in report.requests.iter().filter(|r| !r.ok()) {
                eprintln!("{r:?}");
            }
        }
        out.push((engine, sound, report.violations));
    }
    out
}

fn base(name: &str, duration_ms: u64) -> ScenarioBuilder {
    ScenarioBuilder::new(name, duration_ms).service("hello", 50, 200).bootstrap("boot1").registry("registry")
}

#[test]
fn a_request_dropped_unanswered_breaks_answered_by_deadline() {
    // Requests keep coming while an instance boots for 3 s: they join the discovery.
    let s = base("dropped-requests", 16_000)
        .allocator("alloc1")
        .client("client1")
        .at(0, Fault::SlowStart { node: "alloc1".into(), boot_delay_ms: 3000 })
        .workload(Workload {
            client: "client1".into(),
            service: "hello".into(),
            start_ms: 2000,
            duration_ms: 4000,
            rate_per_s: 4.0,
            burst: 0,
            deadline_ms: 8000,
        })
        .invariants(Invariants { answered_by_deadline: true, ..Invariants::default() })
        .tuning(Tuning { request_deadline_ms: 7000, ..Tuning::default() })
        .build()
        .unwrap();
    for (engine, sound, broken) in with_and_without("dropped_requests", s, Defect::DropJoiningRequests) {
        assert!(sound.is_empty(), "{engine:?}: {sound:#?}");
        assert!(broken.iter().any(|v| v.contains("no answer by their deadline")), "{engine:?}: {broken:#?}");
    }
}

#[test]
fn using_instances_over_the_hard_limit_breaks_the_selection_check() {
    // The only instance is at 300 ms (hard limit 200 ms); an allocator is close.
    let s = base("over-hard", 12_000)
        .service_node("svc1", "hello")
        .allocator("alloc1")
        .client("client1")
        .link("client1", "svc1", 300.0)
        .link("client1", "alloc1", 4.0)
        .requests("client1", "hello", 2000, 6000, 2.0)
        .invariants(Invariants { no_hard_violating_selection: true, ..Invariants::default() })
        .build()
        .unwrap();
    for (engine, sound, broken) in with_and_without("over_hard", s, Defect::IgnoreHardLimit) {
        assert!(sound.is_empty(), "{engine:?}: {sound:#?}");
        assert!(broken.iter().any(|v| v.contains("selected over the hard limit")), "{engine:?}: {broken:#?}");
    }
}

#[test]
fn starting_an_instance_per_request_breaks_the_allocation_bounds() {
    // One client, one allocator: the repeated start request of a discovery (sent again
    // while the 1.5 s boot runs) must join the start under way.
    let s = base("start-per-request", 12_000)
        .allocator("alloc1")
        .client("client1")
        .at(0, Fault::SlowStart { node: "alloc1".into(), boot_delay_ms: 1500 })
        .requests("client1", "hello", 2000, 6000, 2.0)
        .invariants(Invariants { bounded_allocations: true, ..Invariants::default() })
        .build()
        .unwrap();
    for (engine, sound, broken) in with_and_without("start_per_request", s, Defect::StartPerRequest) {
        assert!(sound.is_empty(), "{engine:?}: {sound:#?}");
        assert!(broken.iter().any(|v| v.contains("instances of hello within")), "{engine:?}: window: {broken:#?}");
        assert!(broken.iter().any(|v| v.contains("runs 2 instances of hello")), "{engine:?}: one live: {broken:#?}");
    }
}

#[test]
fn ejecting_for_good_breaks_recovery() {
    // The only instance is down for 8 s; requests failing meanwhile eject it (for 30 s,
    // so requests succeed again from about 40 s on; the check starts at 48 s).
    let s = base("eject-forever", 62_000)
        .service_node("svc1", "hello")
        .client("client1")
        .at(10_000, Fault::Crash { node: "svc1".into() })
        .at(18_000, Fault::Restart { node: "svc1".into() })
        .requests("client1", "hello", 2000, 56_000, 2.0)
        .invariants(Invariants { recover_within_ms: Some(30_000), ..Invariants::default() })
        .tuning(Tuning { request_deadline_ms: 4000, ..Tuning::default() })
        .build()
        .unwrap();
    for (engine, sound, broken) in with_and_without("eject_forever", s, Defect::EjectForever) {
        assert!(sound.is_empty(), "{engine:?}: {sound:#?}");
        assert!(broken.iter().any(|v| v.contains("still failing")), "{engine:?}: {broken:#?}");
    }
}
