#![no_main]
//! Scenario files: parsing and validation never panic, a valid scenario's schedule
//! and request times can be computed, and it survives a write and a re-read.
use physarum_net_sim::Scenario;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(scenario) = Scenario::from_json(text) else { return };
    let schedule = scenario.expanded_schedule();
    assert!(schedule.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    let requests = scenario.request_times();
    assert!(requests.iter().all(|(_, w)| *w < scenario.workloads.len()));
    let again = Scenario::from_json(&scenario.to_json()).expect("a written scenario parses");
    assert_eq!(again, scenario);
});
