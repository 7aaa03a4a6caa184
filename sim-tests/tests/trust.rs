//! Rogue nodes against the trust checks: an impostor that advertises a service's hash
//! and answers probes faster than anyone, and a registry that serves forged entries.
//! Neither may ever be served a request or decide what runs.

use physarum_core::io::Event;
use physarum_net_sim::node::Fate;
use physarum_net_sim::scenario::Invariants;
use physarum_net_sim::trace::Kind;
use physarum_net_sim::ScenarioBuilder;
use sim_tests::{host_of, run_seeds};

#[test]
fn rogue_instances_and_rogue_registries_are_never_used() {
    let s = ScenarioBuilder::new("rogues", 30_000)
        .service("hello", 50, 200)
        .bootstrap("boot1")
        .bootstrap("boot2")
        // The rogue registry is listed first and answers fastest.
        .rogue_registry("fake-registry")
        .registry("registry")
        .allocator("alloc1")
        .rogue_service("impostor", "hello")
        .client("client1")
        .client("client2")
        .link("client1", "impostor", 1.0)
        .link("client2", "impostor", 1.0)
        .link("client1", "fake-registry", 1.0)
        .link("client2", "fake-registry", 1.0)
        .link("alloc1", "fake-registry", 1.0)
        .link("client1", "alloc1", 6.0)
        .link("client2", "alloc1", 6.0)
        .requests("client1", "hello", 1000, 25_000, 4.0)
        .requests("client2", "hello", 1500, 25_000, 4.0)
        .invariants(Invariants { answered_by_deadline: true, ..Invariants::default() })
        .build()
        .unwrap();
    run_seeds("rogue_instances_and_rogue_registries_are_never_used", &s, 2, |r| {
        // The impostor's application never served anything; every answer came from an
        // instance the allocator started.
        for q in &r.requests {
            if let Fate::Answered { served_by: Some(by), .. } = &q.fate {
                assert_eq!(host_of(by), "alloc1", "request #{} served by {by}", q.seq);
            }
        }
        assert!(r.figures.ok * 100 >= r.figures.sent * 95, "{}", r.figures_text());
        // The impostor was found, measured, refused before any request byte, and not chosen again.
        let untrusted: Vec<_> = r
            .events()
            .into_iter()
            .filter(|(_, _, e)| matches!(e, Event::Untrusted { peer, .. } if peer.0 == "impostor"))
            .collect();
        assert!(!untrusted.is_empty(), "the impostor was never even tried: the test proves nothing");
        assert!(untrusted.len() <= 4, "refused at most once per client and per ban expiry: {untrusted:?}");
        // Nothing the rogue registry said was run: the only image started is the real one.
        let boots: Vec<String> = r
            .records()
            .into_iter()
            .filter_map(|rec| match rec.kind {
                Kind::Driver(m) if m.starts_with("boot ") => Some(m),
                _ => None,
            })
            .collect();
        assert!(!boots.is_empty());
        assert!(boots.iter().all(|b| b.ends_with(" hello sim/hello:latest")), "{boots:?}");
        assert!(r.starts_of("hello") >= 1);
    });
}
