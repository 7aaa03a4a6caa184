//! The scenario format's link properties, periodic latency shapes, range-based
//! partitions and expectations, each run in the simulation.

use physarum_core::io::Event;
use physarum_net_sim::node::Fate;
use physarum_net_sim::scenario::{LinkSpec, Scheduled, WaveShape};
use physarum_net_sim::timeline::host_of;
use physarum_net_sim::{Fault, Invariants, Report, Scenario, ScenarioBuilder};
use sim_tests::{run_one, run_seeds};

fn link(a: &str, b: &str, rtt_ms: f64) -> LinkSpec {
    LinkSpec { a: a.into(), b: b.into(), rtt_ms, jitter_ms: 0.0, loss: 0.0, cut_above_ms: None }
}

/// A client `c` with two static instances of `hello` (soft 5 ms, hard 10 ms): `svc1`
/// (over `l1`) and `svc2` at 3 ms.
fn two_instances(name: &str, l1: LinkSpec, secs: u64) -> ScenarioBuilder {
    ScenarioBuilder::new(name, secs * 1000)
        .service("hello", 5, 10)
        .bootstrap("boot")
        .registry("reg")
        .service_node("svc1", "hello")
        .service_node("svc2", "hello")
        .client("c")
        .link_with(l1)
        .link("c", "svc2", 3.0)
        .requests("c", "hello", 1_000, (secs - 2) * 1000, 4.0)
}

fn hosts_served(r: &Report) -> Vec<(u64, String)> {
    r.requests
        .iter()
        .filter_map(|q| match &q.fate {
            Fate::Answered { served_by: Some(by), .. } => Some((q.at.as_millis() as u64, host_of(by).to_string())),
            _ => None,
        })
        .collect()
}

fn probes(r: &Report, peer: &str) -> Vec<Option<u128>> {
    r.events()
        .into_iter()
        .filter_map(|(_, _, e)| match e {
            Event::Probed { peer: p, rtt } if p.0 == peer => Some(rtt.map(|d| d.as_micros())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_link_with_loss_loses_probes_from_the_start() {
    let lossy = LinkSpec { loss: 0.3, ..link("c", "svc1", 1.0) };
    let s = two_instances("link-loss", lossy, 20).build().unwrap();
    let r = run_one("a_link_with_loss_loses_probes_from_the_start", &s, 5);
    let lost = probes(&r, "svc1").iter().filter(|p| p.is_none()).count();
    assert!(lost >= 2, "{:?}", probes(&r, "svc1"));
    let clean = two_instances("link-loss", link("c", "svc1", 1.0), 20).build().unwrap();
    let r = run_one("a_link_with_loss_loses_probes_from_the_start", &clean, 5);
    assert_eq!(probes(&r, "svc1").iter().filter(|p| p.is_none()).count(), 0);
}

#[test]
fn a_link_with_jitter_varies_its_latency() {
    fn latencies(r: &Report, host: &str) -> Vec<u128> {
        let mut v: Vec<u128> = r
            .requests
            .iter()
            .filter_map(|q| match &q.fate {
                Fate::Answered { served_by: Some(by), latency, .. } if host_of(by) == host => Some(latency.as_micros()),
                _ => None,
            })
            .skip(1) // the first includes the discovery
            .collect();
        v.sort();
        v.dedup();
        v
    }
    for des in [false, true] {
        // Only svc1 exists here, so every request goes over the jittery link.
        let mut s =
            two_instances("link-jitter", LinkSpec { jitter_ms: 4.0, ..link("c", "svc1", 1.0) }, 20).build().unwrap();
        s.nodes.retain(|n| n.name != "svc2");
        s.links.retain(|l| l.b != "svc2");
        let r = if des { physarum_net_sim::run_des(&s, 5).unwrap() } else { run_one("jitter", &s, 5) };
        let jittery = latencies(&r, "svc1");
        assert!(jittery.len() >= 3, "des {des}: {jittery:?}");
        s.links[0].jitter_ms = 0.0;
        let r = if des { physarum_net_sim::run_des(&s, 5).unwrap() } else { run_one("jitter", &s, 5) };
        let steady = latencies(&r, "svc1");
        assert!(steady.len() < jittery.len(), "des {des}: {steady:?} vs {jittery:?}");
    }
}

/// `svc1`'s RTT follows a square wave between 1 and 8 ms (over the 5 ms soft limit
/// for half of each 40 s period): the client moves to `svc2` (3 ms) each time, within
/// the grace plus a discovery, and moves back only when `svc2` is no longer the best.
fn square_wave() -> Scenario {
    two_instances("wave", link("c", "svc1", 1.0), 90)
        .at(
            0,
            Fault::LatencyWave {
                a: "c".into(),
                b: "svc1".into(),
                shape: WaveShape::Square,
                low_ms: 1.0,
                high_ms: 8.0,
                period_ms: 40_000,
                step_ms: 20_000,
                until_ms: 90_000,
            },
        )
        .invariants(Invariants {
            answered_by_deadline: true,
            max_switch_delay_ms: Some(14_000),
            ..Invariants::default()
        })
        .build()
        .unwrap()
}

#[test]
fn a_square_wave_moves_the_client_away_within_the_switch_bound() {
    let s = square_wave();
    assert_eq!(s.expanded_schedule().len(), 5);
    run_seeds("a_square_wave_moves_the_client_away_within_the_switch_bound", &s, 2, |r| {
        let served = hosts_served(r);
        // svc1 goes over soft at 20 s: the client is on svc2 by 34 s.
        assert!(served.iter().any(|(t, h)| *t >= 34_000 && *t < 40_000 && h == "svc2"), "{served:?}");
        assert!(served.iter().any(|(t, h)| *t < 20_000 && h == "svc1"));
    });
}

#[test]
fn the_switch_bound_fails_when_the_client_is_slower_than_it() {
    // The soft grace (10 s) alone is longer than a 5 s bound.
    let mut s = square_wave();
    s.invariants.max_switch_delay_ms = Some(5_000);
    let r = run_one("the_switch_bound_fails_when_the_client_is_slower_than_it", &s, 1);
    assert!(
        r.violations.iter().any(|v| v.contains("over the soft limit for longer than 5000 ms")),
        "{:#?}",
        r.violations
    );
}

#[test]
fn a_link_is_partitioned_while_its_rtt_is_above_the_threshold() {
    // svc1's link goes to 12 ms at 8 s (cut: above 9 ms) and back to 1 ms at 16 s.
    let cut = LinkSpec { cut_above_ms: Some(9.0), ..link("c", "svc1", 1.0) };
    let s = two_instances("cut-above", cut, 30)
        .at(8_000, Fault::Latency { a: "c".into(), b: "svc1".into(), rtt_ms: 12.0 })
        .at(16_000, Fault::Latency { a: "c".into(), b: "svc1".into(), rtt_ms: 1.0 })
        .invariants(Invariants {
            answered_by_deadline: true,
            no_hard_violating_selection: true,
            ..Invariants::default()
        })
        .build()
        .unwrap();
    let faults: Vec<String> = s.expanded_schedule().iter().map(|x| x.fault.describe()).collect();
    assert!(faults.contains(&"partition c | svc1".to_string()) && faults.contains(&"repair c | svc1".to_string()));
    run_seeds("a_link_is_partitioned_while_its_rtt_is_above_the_threshold", &s, 2, |r| {
        let served = hosts_served(r);
        // Cut, nothing reaches svc1 (requests sent a little before may still be on the way).
        assert!(served.iter().all(|(t, h)| !(*t >= 8_100 && *t < 16_000 && h == "svc1")), "{served:?}");
        assert!(served.iter().any(|(t, h)| *t >= 8_100 && *t < 16_000 && h == "svc2"), "{served:?}");
    });
}

#[test]
fn expectations_as_rates_and_fallback_rules() {
    // Only an instance over the soft limit (8 ms, soft 5, hard 10) and no allocator:
    // the client falls back to it.
    let s = ScenarioBuilder::new("fallback", 10_000)
        .service("hello", 5, 10)
        .bootstrap("boot")
        .registry("reg")
        .service_node("svc1", "hello")
        .client("c")
        .link("c", "svc1", 8.0)
        .requests("c", "hello", 1_000, 8_000, 2.0)
        .invariants(Invariants { min_success_rate: Some(1.0), fallback_allowed: Some(true), ..Invariants::default() })
        .build()
        .unwrap();
    let r = run_one("expectations_as_rates_and_fallback_rules", &s, 3);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let mut strict = s.clone();
    strict.invariants.fallback_allowed = Some(false);
    let r = run_one("expectations_as_rates_and_fallback_rules", &strict, 3);
    assert!(
        r.violations.iter().any(|v| v.contains("over the soft limit (fallback not allowed)")),
        "{:#?}",
        r.violations
    );

    // A partition that fails some requests: 100 % is not met, 20 % is.
    let mut cut = s.clone();
    cut.schedule
        .push(Scheduled { at_ms: 3_000, fault: Fault::Partition { a: vec!["c".into()], b: vec!["svc1".into()] } });
    cut.schedule.push(Scheduled { at_ms: 6_000, fault: Fault::Repair { a: vec!["c".into()], b: vec!["svc1".into()] } });
    let r = run_one("expectations_as_rates_and_fallback_rules", &cut, 3);
    assert!(r.figures.ok < r.figures.sent);
    assert!(r.violations.iter().any(|v| v.contains("% of requests succeeded")), "{:#?}", r.violations);
    cut.invariants.min_success_rate = Some(0.2);
    let r = run_one("expectations_as_rates_and_fallback_rules", &cut, 3);
    assert!(r.violations.is_empty(), "{} {:#?}", r.figures_text(), r.violations);
}
