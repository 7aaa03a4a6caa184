//! The timeline `physarum-sim run --out` writes: every request with the host that
//! served it, the choices, the faults as spans, the scheduled links' RTTs; the same
//! seed gives the same timeline, byte for byte.

use physarum_net_sim::timeline::{host_of, Row, Timeline};
use physarum_net_sim::{Fault, ScenarioBuilder};
use sim_tests::run_one;

fn scenario() -> physarum_net_sim::Scenario {
    ScenarioBuilder::new("timeline", 30_000)
        .service("hello", 5, 10)
        .bootstrap("boot")
        .registry("reg")
        .allocator("near")
        .allocator("far")
        .client("c")
        .link("c", "near", 1.0)
        .link("c", "far", 3.0)
        .at(
            8_000,
            Fault::LatencySweep { a: "c".into(), b: "near".into(), from_ms: 1.0, to_ms: 8.0, steps: 7, every_ms: 1000 },
        )
        .at(3_000, Fault::Crash { node: "far".into() })
        .at(5_000, Fault::Restart { node: "far".into() })
        .requests("c", "hello", 1_000, 28_000, 4.0)
        .build()
        .unwrap()
}

#[test]
fn the_timeline_tells_who_served_each_request_and_what_happened() {
    let s = scenario();
    let report = run_one("the_timeline_tells_who_served_each_request_and_what_happened", &s, 11);
    let tl = Timeline::of(&s, &report);

    // One row per request, served by the instance the client saw.
    let requests: Vec<&Row> = tl.rows.iter().filter(|r| matches!(r, Row::Request { .. })).collect();
    assert_eq!(requests.len(), report.requests.len());
    let served = report.served_by();
    let ok: Vec<(f64, String, String)> = requests
        .iter()
        .filter_map(|r| match r {
            Row::Request { t_ms, outcome: "ok", served_by: Some(by), host: Some(h), latency_ms: Some(_), .. } => {
                Some((*t_ms, by.clone(), h.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(ok.len(), served.len());
    for ((t, by, host), (at, by2)) in ok.iter().zip(&served) {
        assert_eq!((*t, by), (at.as_millis() as f64, by2));
        assert_eq!(host, host_of(by));
    }
    // The sweep moves the client from `near` (over the soft limit) to `far`.
    assert_eq!(tl.serving_changes("c").iter().map(|c| c.1.as_str()).collect::<Vec<_>>(), ["near", "far"]);
    assert!(tl.rows.iter().any(|r| matches!(r, Row::Switched { to, .. } if host_of(to) == "far")));
    assert!(tl.rows.iter().any(|r| matches!(r, Row::Selected { .. })));
    assert!(tl.rows.iter().any(|r| matches!(r, Row::Allocated { .. })));
    // The sweep is one link's RTT in 8 steps, after its starting value.
    let steps = &tl.links[&("c".to_string(), "near".to_string())];
    assert_eq!(steps.len(), 9);
    assert_eq!(steps[0], (0.0, 1.0));
    assert_eq!(steps[8], (15_000.0, 8.0));
    // The crash is one span, from the crash to the restart.
    assert_eq!(tl.spans.len(), 1);
    assert_eq!((tl.spans[0].from_ms, tl.spans[0].to_ms), (3_000.0, 5_000.0));
    // Rows in time order; every line is a JSON object that says its kind.
    assert!(tl.rows.windows(2).all(|w| w[0].t_ms() <= w[1].t_ms()));
    let text = tl.jsonl();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["kind"].is_string() && v["t_ms"].is_number(), "{line}");
    }
    assert_eq!(text.lines().count(), tl.rows.len());
    assert_eq!(tl.requests_csv().lines().count(), requests.len() + 1);

    // The same seed, the same timeline.
    let again = run_one("the_timeline_tells_who_served_each_request_and_what_happened", &s, 11);
    assert_eq!(Timeline::of(&s, &again).jsonl(), text);
}
