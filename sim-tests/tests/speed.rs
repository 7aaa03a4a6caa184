//! Simulation speed (a benchmark, not a test: it prints, asserts no timing).
//!
//! `cargo test -p sim-tests --test speed -- --ignored --nocapture` (the event-driven
//! engine; with `SIM_SPEED_TURMOIL=1` turmoil too, side by side).

use physarum_net_sim::{run, run_des, Report, Scenario};

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn twenty_nodes_ten_minutes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/twenty-nodes-10min.json");
    let scenario = Scenario::from_json(&std::fs::read_to_string(path).expect("scenario file")).expect("valid");
    let seed = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let speed = |engine: &str, r: &Report| {
        println!("{}", r.summary());
        println!(
            "speed ({engine}): {} nodes, {:.0} simulated s in {:.2} wall s = {:.1} simulated s per wall s",
            scenario.nodes.len(),
            r.simulated.as_secs_f64(),
            r.wall.as_secs_f64(),
            r.simulated.as_secs_f64() / r.wall.as_secs_f64()
        );
    };
    speed("event-driven", &run_des(&scenario, seed).expect("des run"));
    if std::env::var_os("SIM_SPEED_TURMOIL").is_some() {
        speed("turmoil", &run(&scenario, seed).expect("turmoil run"));
    }
}
