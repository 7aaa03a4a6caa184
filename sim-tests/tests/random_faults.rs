//! Random clusters under random fault schedules (see `sim_tests::faults`): every role
//! is faulted, several services run, and each case is checked for:
//! - every client request gets a response or an explicit error by its deadline;
//! - every selection is of an instance within the hard limit at that moment, and no
//!   cache hit goes to an instance over it (or cut) for longer than the cache needs
//!   to notice;
//! - no allocator starts a service twice within 10 s (unless the first ended), and
//!   none runs two instances of one service;
//! - no panics (a panic in any host fails the simulation);
//! - requests sent 30 s after the last fault healed all succeed.
//!
//! `SIM_SEED=N` replays one case, `SIM_SEEDS=N` runs N; the default run holds one
//! case per fault kind. A failing case is shrunk and written out as a scenario file.
//! The soak: `cargo test --release -p sim-tests --test random_faults -- --ignored`
//! (1,000 seeds unless `SIM_SEEDS` says otherwise; it prints its progress).

use proptest::strategy::ValueTree;
use sim_tests::faults::{case_tree, shrink, Case, FaultKind};
use sim_tests::{run_one, seeds, ReplayGuard};
use std::collections::BTreeMap;
use std::time::Instant;

const TEST: &str = "random_fault_schedules_keep_the_invariants";

/// The kind a seed's case is sure to hold: consecutive seeds go through every kind.
fn forced(seed: u64) -> FaultKind {
    FaultKind::ALL[(seed % FaultKind::ALL.len() as u64) as usize]
}

fn case(seed: u64) -> Case {
    case_tree(seed, forced(seed)).current()
}

/// Run the cases of `seeds`, printing progress and the coverage of fault kinds;
/// failures are shrunk and listed together at the end.
fn run_cases(seeds: &[u64], test: &str) {
    let started = Instant::now();
    let mut coverage: BTreeMap<FaultKind, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, &seed) in seeds.iter().enumerate() {
        let c = case(seed);
        let (scenario, kinds) = c.build();
        for k in &kinds {
            *coverage.entry(*k).or_default() += 1;
        }
        let report = run_one(test, &scenario, seed);
        let _guard = ReplayGuard { test: test.into(), seed };
        let mut problems = report.violations.clone();
        if report.figures.sent == 0 || report.figures.ok == 0 {
            problems.push(format!("nothing got through: {}", report.figures_text()));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / (i + 1) as f64 * (seeds.len() - i - 1) as f64;
        eprintln!(
            "[{}/{}] seed {seed}: {} nodes, faults {:?}: {} of {} ok, {} ({elapsed:.0} s, about {eta:.0} s to go)",
            i + 1,
            seeds.len(),
            scenario.nodes.len(),
            kinds,
            report.figures.ok,
            report.figures.sent,
            if problems.is_empty() { "ok" } else { "FAILED" },
        );
        if problems.is_empty() {
            continue;
        }
        eprintln!("{}{}", report.summary(), report.timeline());
        let max_runs = std::env::var("SIM_SHRINK_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
        let (small, runs) = shrink(&mut case_tree(seed, forced(seed)), max_runs, |c| !passes(c, seed));
        let (small, small_kinds) = small.build();
        let path = std::env::temp_dir().join(format!("physarum-random-faults-{seed}.json"));
        let _ = std::fs::write(&path, small.to_json());
        eprintln!(
            "seed {seed}: shrunk in {runs} runs to {} nodes and faults {small_kinds:?}: written to {}\n  \
             physarum-sim run {} --seed {seed}\n  replay: SIM_SEED={seed} cargo test -p sim-tests {test} -- --exact\n",
            small.nodes.len(),
            path.display(),
            path.display()
        );
        failures.push((seed, problems));
    }
    eprintln!(
        "{} cases in {:.1} s; faults per kind in the cases that ran: {coverage:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} cases failed: {}",
        failures.len(),
        failures
            .iter()
            .map(|(seed, p)| format!(
                "\n  SIM_SEED={seed} cargo test -p sim-tests {test} -- --exact\n    {}",
                p.join("\n    ")
            ))
            .collect::<String>()
    );
    if std::env::var_os("SIM_SEED").is_none() {
        let missing: Vec<_> = FaultKind::ALL.iter().filter(|k| !coverage.contains_key(k)).collect();
        assert!(missing.is_empty(), "the cases that ran never had {missing:?}: {coverage:?}");
    }
}

/// Whether `case` passes with `seed` (for shrinking: quietly).
fn passes(case: &Case, seed: u64) -> bool {
    let (scenario, _) = case.build();
    physarum_net_sim::run(&scenario, seed).map(|r| r.violations.is_empty() && r.figures.ok > 0).unwrap_or(false)
}

#[test]
fn random_fault_schedules_keep_the_invariants() {
    run_cases(&seeds(FaultKind::ALL.len() as u64), TEST);
}

#[test]
#[ignore = "the soak: 1,000 seeds (SIM_SEEDS=N for another count); run in release"]
fn random_fault_soak() {
    run_cases(&seeds(1000), "random_fault_soak");
}

#[test]
fn the_cases_that_run_cover_every_fault_kind_and_role() {
    // The seeds the test above runs by default, not others.
    let seeds = seeds(FaultKind::ALL.len() as u64);
    let mut kinds = std::collections::BTreeSet::new();
    let (mut services, mut registries, mut min_nodes, mut max_nodes) = (0, 0, usize::MAX, 0);
    for &seed in &seeds {
        let (s, k) = case(seed).build();
        kinds.extend(k);
        services = services.max(s.services.len());
        registries = registries.max(s.nodes.iter().filter(|n| n.role == physarum_net_sim::Role::Registry).count());
        min_nodes = min_nodes.min(s.nodes.len());
        max_nodes = max_nodes.max(s.nodes.len());
        assert_eq!(case(seed).build().0, s, "generation is deterministic");
    }
    if std::env::var_os("SIM_SEED").is_none() {
        let missing: Vec<_> = FaultKind::ALL.iter().filter(|k| !kinds.contains(k)).collect();
        assert!(missing.is_empty(), "never generated: {missing:?}");
        assert!(services >= 2 && registries >= 2, "services {services}, registries {registries}");
        assert!(max_nodes > min_nodes, "sizes {min_nodes}..{max_nodes}");
    }
    eprintln!(
        "{} cases: {} to {} nodes, up to {services} services and {registries} registries",
        seeds.len(),
        min_nodes,
        max_nodes
    );
}

#[test]
fn a_failing_case_shrinks_to_the_fault_that_fails_it() {
    // A stand-in for a failing simulation (cheap to evaluate): the case "fails" while
    // it crashes a registry. Shrinking keeps that fault and drops the rest.
    let crashes_registry = |c: &Case| {
        let (s, _) = c.build();
        s.schedule
            .iter()
            .any(|x| matches!(&x.fault, physarum_net_sim::Fault::Crash { node } if node.starts_with("registry")))
    };
    let seed = (0..200u64)
        .map(|i| sim_tests::BASE_SEED + i)
        .find(|&s| forced(s) == FaultKind::CrashRegistry && case(s).faults.len() >= 3)
        .expect("a case with a registry crash and other faults");
    let before = case(seed);
    assert!(crashes_registry(&before));
    let (small, runs) = shrink(&mut case_tree(seed, forced(seed)), 500, crashes_registry);
    let (scenario, kinds) = small.build();
    assert!(crashes_registry(&small), "the shrunk case still fails");
    assert_eq!(kinds, vec![FaultKind::CrashRegistry], "only the failing fault is left ({runs} runs)");
    assert_eq!(scenario.schedule.len(), 2, "the crash and its restart: {:?}", scenario.schedule);
    assert!(small.faults[0].start_ms <= before.faults[0].start_ms);
    let nodes = |c: &Case| c.build().0.nodes.len();
    assert!(nodes(&small) <= nodes(&before), "{} > {}", nodes(&small), nodes(&before));
    assert_eq!(small.shape.allocators, 1, "{:?}", small.shape);
    assert_eq!(small.shape.clients, 1, "{:?}", small.shape);
}
