//! A few-second smoke run of `physarum bench`: every section runs end to end and
//! its rows carry figures. Timings are not asserted (benchmarks report them). Skips,
//! saying why, where nginx and wrk can be neither found nor installed.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn a_short_bench_run_prints_every_section() {
    if let Err(e) = physarum::bench::ensure_tools() {
        eprintln!("SKIPPED physarum bench smoke run: {e:#}");
        return;
    }
    let dir = TempDir::new("bench");
    let out_file = dir.path().join("bench.md");
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/cold-start.json");
    let mut cmd = command("physarum", dir.path());
    cmd.args(["bench", "--duration", "1", "--rounds", "1", "--cold-runs", "2"]);
    cmd.args(["--discovery", "6", "--discovery-samples", "2", "--out"]).arg(&out_file);
    cmd.arg("--sim-scenario").arg(&scenario);
    let mut bench = Proc::spawn("physarum-bench", cmd, dir.path());
    let status = bench.wait_exit(Duration::from_secs(240));
    let log = bench.log_text();
    assert!(status.is_some_and(|s| s.success()), "physarum bench failed ({status:?}):\n{log}");
    let table = std::fs::read_to_string(&out_file).unwrap_or_else(|e| panic!("no report ({e}):\n{log}"));
    eprintln!("{table}");
    let row = |prefix: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {prefix}")))
            .unwrap_or_else(|| panic!("no row {prefix:?} in:\n{table}"));
        line.split('|').map(|c| c.trim().to_string()).collect()
    };
    // | figure | direct | reference | physarum | ratio | target |
    let c1 = row("c1 requests/s");
    for (i, what) in [(2, "direct"), (3, "nginx"), (4, "physarum")] {
        let v: f64 = c1[i].parse().unwrap_or_else(|_| panic!("{what} c1 req/s {:?}", c1[i]));
        assert!(v > 0.0, "{what} served nothing at c1");
    }
    assert!(c1[5].ends_with('×'), "no ratio: {c1:?}");
    assert_eq!(row("errors")[4], "0", "physarum answered errors under load");
    for prefix in [
        "c32 p99 µs",
        "c1 CPU µs per request per hop",
        "RSS idle, client proxy",
        "RSS idle, allocator",
        "RSS under load",
        "cold start p50 (2 runs",
        "cold start: share",
        "discovery, 6 nodes",
        "failover: failed GETs",
        "failover: time until",
        "simulation speed, cold-start.json",
    ] {
        let r = row(prefix);
        assert!(!r[4].is_empty() && r[4] != "-", "row {prefix:?} has no physarum figure: {r:?}");
    }
}
