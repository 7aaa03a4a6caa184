//! Helpers of the cluster simulation tests (`cargo test -p sim-tests`).
//!
//! Seeds: every test runs its scenario with the seeds from [`seeds`]: `SIM_SEED=N`
//! replays exactly one, `SIM_SEEDS=N` runs N of them (soak runs), otherwise the
//! test's default count. A failing test prints the command that replays it.

use physarum_net_sim::{run, run_des, Report, Scenario};
use std::time::Duration;

pub mod faults;

/// First seed of the default sequence.
pub const BASE_SEED: u64 = 0x5EED_0001;

/// The seeds to run: `SIM_SEED` alone, else `SIM_SEEDS` (or `default_count`) seeds
/// from [`BASE_SEED`] on.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("SIM_SEED") {
        return vec![seed];
    }
    let n = env_u64("SIM_SEEDS").unwrap_or(default_count).max(1);
    (0..n).map(|i| BASE_SEED + i).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// Prints the replay command if the test panics while it is alive.
pub struct ReplayGuard {
    pub test: String,
    pub seed: u64,
}

impl Drop for ReplayGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n*** replay with: SIM_SEED={} cargo test -p sim-tests {} -- --exact\n", self.seed, self.test);
        }
    }
}

/// Run `scenario` with each seed of [`seeds`], check it with `check`. The scenario's
/// invariants must hold too. On failure the summary, the timeline and the replay
/// command are printed.
pub fn run_seeds(test: &str, scenario: &Scenario, default_count: u64, check: impl Fn(&Report)) {
    for seed in seeds(default_count) {
        let report = run_one(test, scenario, seed);
        let _guard = ReplayGuard { test: test.to_string(), seed };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(report.violations.is_empty(), "invariants violated: {:#?}", report.violations);
            check(&report);
        }));
        if let Err(e) = result {
            eprintln!("{}\n--- timeline ---\n{}", report.summary(), report.timeline());
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!("--- trace ---\n{}", report.trace.text());
            }
            std::panic::resume_unwind(e);
        }
    }
}

/// Run `scenario` once with `seed`; a simulation error fails the test with the replay line.
pub fn run_one(test: &str, scenario: &Scenario, seed: u64) -> Report {
    run_one_on(Engine::Turmoil, test, scenario, seed)
}

/// Which engine runs a scenario (as `physarum-sim run --engine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The full stack: real HTTP and the shared runtime over turmoil's network.
    Turmoil,
    /// The event-driven engine: the same core machines, microsecond time, the Kademlia model.
    Des,
}

impl Engine {
    pub fn run(self, scenario: &Scenario, seed: u64) -> Result<Report, String> {
        match self {
            Engine::Turmoil => run(scenario, seed),
            Engine::Des => run_des(scenario, seed),
        }
    }

    /// The name `physarum-sim run --engine` takes.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Turmoil => "turmoil",
            Engine::Des => "des",
        }
    }
}

/// [`run_one`] on `engine`.
pub fn run_one_on(engine: Engine, test: &str, scenario: &Scenario, seed: u64) -> Report {
    let _guard = ReplayGuard { test: test.to_string(), seed };
    match engine.run(scenario, seed) {
        Ok(r) => r,
        Err(e) => panic!("simulation of {} on {} failed: {e}", scenario.name, engine.name()),
    }
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// The host an instance peer id runs on (`alloc1~1.i3` → `alloc1`; `svc1` → `svc1`).
pub fn host_of(peer: &str) -> &str {
    peer.split('~').next().unwrap_or(peer)
}
