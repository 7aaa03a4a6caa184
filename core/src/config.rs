//! Configuration: the original's `conf/conf.json` format, and the knobs of each machine.

use crate::perf::{PerfLimits, Requirements, DEFAULT_SOFT_GRACE};
use crate::resilience::ResilienceConfig;
use crate::trust::{Operators, PublicKey, SignedEntry, TrustConfig};
use crate::types::PeerId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// `conf/conf.json` as the original defines it:
/// `{"Perf": {"SoftReq": {"RTT": ms}, "HardReq": {"RTT": ms}}, "Bootstraps": [multiaddr, ...]}`,
/// plus `"Operators": [public key, ...]`: who may decide what runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfFile {
    #[serde(rename = "Perf", default)]
    pub perf: PerfConf,
    #[serde(rename = "Bootstraps", default)]
    pub bootstraps: Vec<String>,
    /// Operators' Ed25519 public keys, 64 hex digits each.
    #[serde(rename = "Operators", default)]
    pub operators: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerfConf {
    #[serde(rename = "SoftReq")]
    pub soft: RttConf,
    #[serde(rename = "HardReq")]
    pub hard: RttConf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RttConf {
    /// Milliseconds.
    #[serde(rename = "RTT")]
    pub rtt_ms: u64,
}

impl Default for PerfConf {
    /// The original's shipped defaults: soft 100 ms, hard 1 s.
    fn default() -> Self {
        PerfConf { soft: RttConf { rtt_ms: 100 }, hard: RttConf { rtt_ms: 1000 } }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfError(pub String);

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfError {}

impl ConfFile {
    /// Parse and validate the text of a config file.
    pub fn parse(text: &str) -> Result<ConfFile, ConfError> {
        let conf: ConfFile = serde_json::from_str(text).map_err(|e| ConfError(format!("invalid config: {e}")))?;
        if conf.perf.soft.rtt_ms == 0 || conf.perf.hard.rtt_ms == 0 {
            return Err(ConfError("invalid config: Perf RTT limits must be positive milliseconds".into()));
        }
        if conf.perf.soft.rtt_ms > conf.perf.hard.rtt_ms {
            return Err(ConfError(format!(
                "invalid config: Perf.SoftReq.RTT ({} ms) is above Perf.HardReq.RTT ({} ms)",
                conf.perf.soft.rtt_ms, conf.perf.hard.rtt_ms
            )));
        }
        for key in &conf.operators {
            key.parse::<PublicKey>().map_err(|e| ConfError(format!("invalid config: Operators entry {key:?}: {e}")))?;
        }
        Ok(conf)
    }

    /// The operator keys this file lists (validated by [`ConfFile::parse`]).
    pub fn operator_keys(&self) -> Vec<PublicKey> {
        self.operators.iter().filter_map(|k| k.parse().ok()).collect()
    }

    /// The default requirements this file sets for services that set none.
    pub fn requirements(&self) -> Requirements {
        Requirements {
            soft: PerfLimits::rtt(Duration::from_millis(self.perf.soft.rtt_ms)),
            hard: PerfLimits::rtt(Duration::from_millis(self.perf.hard.rtt_ms)),
        }
    }
}

/// Everything a [`crate::node::Node`] needs to know about itself.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's own peer id (never picked as an instance or allocator for itself).
    pub local: PeerId,
    /// Requirements for services whose registry entry sets none.
    pub defaults: Requirements,
    pub manager: ManagerConfig,
    pub peer_cache: PeerCacheConfig,
    pub registry_cache: RegistryCacheConfig,
    /// Service mode: the name of the service this node's proxy serves.
    pub serve: Option<String>,
    /// Allocator role.
    pub allocator: Option<AllocatorConfig>,
    /// Registry role, with the entries loaded from the store at start.
    pub registry: Option<Vec<SignedEntry>>,
    /// Operator keys, wall-clock alignment and (allocators, operator-run sidecars)
    /// the certificate issuer.
    pub trust: TrustConfig,
}

impl NodeConfig {
    /// A node with the original's defaults and no roles but the client one.
    pub fn new(local: PeerId, defaults: Requirements) -> Self {
        NodeConfig {
            local,
            defaults,
            manager: ManagerConfig::default(),
            peer_cache: PeerCacheConfig::default(),
            registry_cache: RegistryCacheConfig::default(),
            serve: None,
            allocator: None,
            registry: None,
            trust: TrustConfig::new(Operators::default(), 0),
        }
    }
}

/// The find-or-allocate flow (DESIGN.md §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Find-or-allocate rounds before giving up with 503.
    pub attempts: u32,
    /// One shared budget for probing all candidates of a round.
    pub probe_budget: Duration,
    /// How long a DHT provider lookup may take.
    pub find_timeout: Duration,
    /// How long one allocator may take to answer a start request.
    pub allocate_timeout: Duration,
    /// A start request or discovery probe with no answer yet is sent again after this
    /// long, then after twice as long, and so on, within its deadline: a datagram lost
    /// on the way costs this much, not the whole deadline. Both are idempotent (an
    /// allocator joins a repeated request to the start already under way).
    pub control_retry: Duration,
    /// A candidate measured longer ago than this is probed again before it is chosen,
    /// so that no choice rests on a link as it was seconds before.
    pub fresh_measurement: Duration,
    /// How long a registry query may take.
    pub registry_timeout: Duration,
    /// After an allocation whose instance cannot be reached directly: re-find
    /// providers after this delay, doubling up to `refind_max`, `refind_tries` times.
    pub refind_initial: Duration,
    pub refind_max: Duration,
    pub refind_tries: u32,
    /// Re-advertise what this node advertises this often (DHT records expire).
    pub advertise_interval: Duration,
    /// Persistent soft violations ask for a better instance after this long.
    pub soft_grace: Duration,
    /// Retries, per-try timeouts and ejection of failing instances.
    pub resilience: ResilienceConfig,
    /// Service mode: the application counts as down after this many failed checks in a row.
    pub app_down_after: u32,
    /// Deliberate defects, for tests only (none by default).
    pub defects: Defects,
    /// Which found instance is used and which allocator is asked first (lowest RTT
    /// by default).
    pub placement: crate::placement::Placement,
}

/// Deliberate defects a test can switch on to show that a simulation invariant
/// catches the broken rule it guards. All off by default; nothing outside tests sets
/// them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defects {
    /// A request that joins a discovery already under way is dropped unanswered
    /// (breaks: every request is answered by its deadline).
    pub drop_joining_requests: bool,
    /// Candidates are used whatever their RTT: instances and allocators over the hard
    /// limit, and measurements of any age (breaks: no selection over the hard limit).
    pub ignore_hard_limit: bool,
    /// Allocator: every start request starts an instance of its own (breaks: starts
    /// per allocator per service per window; one live instance per allocator).
    pub start_per_request: bool,
    /// A peer that failed a request is never picked again (breaks: recovery after
    /// the faults heal).
    pub eject_forever: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            attempts: 3,
            probe_budget: Duration::from_secs(1),
            find_timeout: Duration::from_secs(2),
            allocate_timeout: Duration::from_secs(10),
            control_retry: Duration::from_millis(300),
            fresh_measurement: Duration::from_millis(100),
            registry_timeout: Duration::from_secs(2),
            refind_initial: Duration::from_millis(200),
            refind_max: Duration::from_secs(1),
            refind_tries: 5,
            advertise_interval: Duration::from_secs(30),
            soft_grace: DEFAULT_SOFT_GRACE,
            resilience: ResilienceConfig::default(),
            app_down_after: 2,
            defects: Defects::default(),
            placement: crate::placement::Placement::default(),
        }
    }
}

/// The three-level peer cache. The defaults are the original's constants except in
/// two rules (see [`PeerCacheConfig::original`] for the original's own):
/// - one lost probe does not evict a peer: on a lossy link (1 % of datagrams lost) the
///   original's rule throws away a good instance every 100 s or so and makes every
///   client rediscover it, while a peer that is really gone is still evicted one
///   probe interval later;
/// - an answer over the soft limit costs no reliability: soft violations are judged by
///   the grace alone ([`ManagerConfig::soft_grace`]). With the original's −10 per soft
///   answer the entry is flushed as unreliable after about 5 s, before a 10 s grace can
///   act. Reliability tracks liveness and loss instead: each lost probe costs
///   `loss_penalty`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCacheConfig {
    pub probe_interval: Duration,
    pub initial_reliability: u8,
    /// Added for every probe answered within the hard limit (and not over soft, if
    /// `soft_penalty` is set).
    pub reward: u8,
    /// Taken for every probe answered over the soft limit (0: such an answer counts
    /// as alive, like any other).
    pub soft_penalty: u8,
    /// Taken for every lost probe that does not evict the entry.
    pub loss_penalty: u8,
    /// Probes lost in a row that evict an entry (at least 1).
    pub lost_probes_to_evict: u32,
    /// Level 1 → 0 when r rises above this.
    pub promote_above: u8,
    /// Level 0 → 1 (with r reset) when r falls below this.
    pub demote_below: u8,
    /// Level 1 → 2 (with r reset) when r falls below this.
    pub drop_below: u8,
}

impl Default for PeerCacheConfig {
    fn default() -> Self {
        PeerCacheConfig {
            probe_interval: Duration::from_secs(1),
            initial_reliability: 50,
            reward: 1,
            soft_penalty: 0,
            loss_penalty: 10,
            lost_probes_to_evict: 2,
            promote_above: 90,
            demote_below: 90,
            drop_below: 10,
        }
    }
}

impl PeerCacheConfig {
    /// The original's rules: −10 per answer over the soft limit, and a single lost
    /// probe evicts.
    pub fn original() -> Self {
        PeerCacheConfig { soft_penalty: 10, loss_penalty: 0, lost_probes_to_evict: 1, ..PeerCacheConfig::default() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryCacheConfig {
    /// How long a resolved name is served without a registry confirming it
    /// (`--rcache-ttl`): while every registry is down, cached names keep resolving
    /// for this long.
    pub ttl: Duration,
    /// How long "no such service" is remembered.
    pub negative_ttl: Duration,
    /// A name in use is asked about again this often (in the background, its cached
    /// answer still served), so a changed or removed entry is seen within about this.
    pub refresh: Duration,
    /// A name counts as in use for this long after its last lookup. A name not in use
    /// is not refreshed; its next lookup asks the registry first (and falls back to
    /// the cached answer if no registry answers).
    pub in_use: Duration,
}

impl Default for RegistryCacheConfig {
    fn default() -> Self {
        RegistryCacheConfig {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(1),
            refresh: Duration::from_secs(1),
            in_use: Duration::from_secs(60),
        }
    }
}

/// What an allocator's machine offers, and how it culls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorConfig {
    pub max_instances: usize,
    /// CPU available to instances, in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory available to instances, in MiB.
    pub memory_mb: u64,
    /// How often instances are asked how long they have been idle.
    pub cull_interval: Duration,
    /// Instances idle longer than this are stopped.
    pub idle_limit: Duration,
    /// An instance that has not reported itself started by then is given up on.
    pub start_timeout: Duration,
    /// After a start of a service fails, requests for it within this time get that
    /// failure at once instead of another start: the copies of one request, and many
    /// clients asking for a broken service, cost one start (zero turns this off).
    pub failed_start_holdoff: Duration,
    /// How long an idle query may take before it counts as failed.
    pub idle_query_timeout: Duration,
    /// Directories whose programs `Exec` services may run (none: no programs run).
    pub exec_roots: Vec<String>,
    /// Deliberate defects, for tests only (none by default).
    pub defects: Defects,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            max_instances: 16,
            cpu_millis: 4000,
            memory_mb: 4096,
            cull_interval: Duration::from_secs(60),
            idle_limit: Duration::from_secs(60),
            start_timeout: Duration::from_secs(30),
            failed_start_holdoff: Duration::from_secs(1),
            idle_query_timeout: Duration::from_secs(5),
            exec_roots: Vec::new(),
            defects: Defects::default(),
        }
    }
}
