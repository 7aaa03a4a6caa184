//! Replay: one seed decides everything (issue 3, item 5).

use physarum_net_sim::{Fault, Scenario, ScenarioBuilder};
use sim_tests::{run_one, seeds};

/// A busy scenario: jittery links, allocations, a crash and restart, a partition, a
/// latency change, two clients.
fn busy() -> Scenario {
    ScenarioBuilder::new("replay", 40_000)
        .service("hello", 20, 100)
        .service("echo", 50, 200)
        .jitter_ms(3)
        .bootstrap("boot1")
        .bootstrap("boot2")
        .registry("registry")
        .allocator("alloc1")
        .allocator("alloc2")
        .service_node("svc1", "echo")
        .client("client1")
        .client("client2")
        .link("client1", "alloc1", 3.0)
        .requests("client1", "hello", 1000, 35_000, 4.0)
        .requests("client2", "hello", 1500, 30_000, 3.0)
        .requests("client2", "echo", 2000, 30_000, 2.0)
        .burst("client1", "echo", 5000, 20)
        .at(8000, Fault::Crash { node: "alloc1".into() })
        .at(14_000, Fault::Restart { node: "alloc1".into() })
        .at(16_000, Fault::Partition { a: vec!["client2".into()], b: vec!["svc1".into(), "alloc2".into()] })
        .at(22_000, Fault::Repair { a: vec!["client2".into()], b: vec!["svc1".into(), "alloc2".into()] })
        .at(25_000, Fault::Latency { a: "client1".into(), b: "alloc2".into(), rtt_ms: 40.0 })
        .build()
        .unwrap()
}

#[test]
fn same_seed_gives_the_same_trace() {
    let s = busy();
    for seed in seeds(2) {
        let a = run_one("same_seed_gives_the_same_trace", &s, seed);
        let b = run_one("same_seed_gives_the_same_trace", &s, seed);
        assert!(a.trace.len() > 500, "a trace worth comparing: {} records", a.trace.len());
        assert!(a.figures.ok > 100, "{}", a.figures_text());
        if a.trace_hash != b.trace_hash {
            let (ta, tb) = (a.trace.text(), b.trace.text());
            let first = ta.lines().zip(tb.lines()).find(|(x, y)| x != y);
            panic!(
                "seed {seed}: trace hashes differ ({} vs {}); first difference: {first:?}\nreplay: SIM_SEED={seed} cargo test -p sim-tests same_seed_gives_the_same_trace",
                a.trace_hash, b.trace_hash
            );
        }
        assert_eq!(a.figures, b.figures);
    }
}

#[test]
fn different_seeds_give_different_traces() {
    let s = busy();
    let a = run_one("different_seeds_give_different_traces", &s, 1);
    let b = run_one("different_seeds_give_different_traces", &s, 2);
    assert_ne!(a.trace_hash, b.trace_hash);
    // Same cluster behaviour in substance, though.
    assert_eq!(a.figures.sent, b.figures.sent);
}
