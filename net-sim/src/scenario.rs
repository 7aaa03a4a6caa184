//! Scenarios as data: the cluster (nodes and roles), the services, the network
//! (per-link round-trip times), the faults at given times, the client workloads and
//! the invariants to check. Written as JSON files (`scenarios/*.json`) or built in
//! Rust with [`ScenarioBuilder`]; both give the same [`Scenario`] value.
//!
//! Times in a scenario are simulated milliseconds from the start of the run. Link
//! latencies are given as round-trip times: the simulation sets each direction of
//! the link to half of it (turmoil delivers on whole milliseconds whatever the tick,
//! so there each half is rounded up to a millisecond; the event-driven engine keeps
//! microseconds).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One simulation run's description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Simulated run length.
    pub duration_ms: u64,
    /// turmoil's tick (1 ms unless set).
    #[serde(default = "default_tick_us")]
    pub tick_us: u64,
    /// Round-trip time of every link not listed in `links`.
    #[serde(default = "default_rtt_ms")]
    pub default_rtt_ms: f64,
    /// Random extra one-way delay (0 to this many ms, turmoil's exponential
    /// distribution) on links not listed in `links` and never given a latency.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Requirements of services that set none (conf.json's `Perf`).
    #[serde(default)]
    pub defaults: Limits,
    pub services: Vec<ServiceSpec>,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub links: Vec<LinkSpec>,
    /// Faults and network changes, at given times (any order; applied in time order).
    #[serde(default)]
    pub schedule: Vec<Scheduled>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub invariants: Invariants,
    /// Knobs of the simulated network and nodes.
    #[serde(default)]
    pub tuning: Tuning,
    /// The placement policy every client uses (lowest RTT unless set; see
    /// [`crate::policies`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
}

/// A placement policy by name, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    pub policy: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, f64>,
}

fn default_tick_us() -> u64 {
    1000
}

fn default_rtt_ms() -> f64 {
    2.0
}

/// Soft and hard RTT limits in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub soft_ms: u64,
    pub hard_ms: u64,
}

impl Default for Limits {
    /// The original's shipped defaults (conf.json): soft 100 ms, hard 1 s.
    fn default() -> Self {
        Limits { soft_ms: 100, hard_ms: 1000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Soft/hard RTT in ms; `None`: the scenario's defaults.
    #[serde(default)]
    pub soft_ms: Option<u64>,
    #[serde(default)]
    pub hard_ms: Option<u64>,
    #[serde(default = "default_cpu")]
    pub cpu_millis: u32,
    #[serde(default = "default_mem")]
    pub memory_mb: u32,
}

fn default_cpu() -> u32 {
    100
}

fn default_mem() -> u32 {
    64
}

/// A host and what runs on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Host name; also the peer id of the node on it.
    pub name: String,
    pub role: Role,
    /// A place on the plane, in ms: links between placed nodes that are not listed
    /// have the default RTT plus the distance (see [`crate::topology`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<[f64; 2]>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Role {
    /// A DHT server holding provider records (well-known, everybody joins through it).
    Bootstrap,
    /// The registry: name → service info, for every service of the scenario.
    Registry,
    /// An allocator; its instances run inside its host.
    Allocator(AllocatorSpec),
    /// A statically deployed instance: a proxy in service mode plus the application.
    Service { service: String },
    /// An anonymous proxy with a client application (the workloads naming it).
    Client,
    /// An impostor: a sidecar and application that advertise `service`'s hash and
    /// serve it, certified by a key that is not an operator's.
    RogueService { service: String },
    /// A node that advertises the registry key and answers with entries for every
    /// scenario service that run something else, signed by a key that is not an
    /// operator's.
    RogueRegistry,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocatorSpec {
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Time from a start request to the instance being up.
    #[serde(default = "default_boot_ms")]
    pub boot_delay_ms: u64,
    /// Idle culling: instances idle longer than this are stopped (the original: 60 s).
    #[serde(default = "default_idle_ms")]
    pub idle_limit_ms: u64,
    /// How often instances are asked how long they have been idle (the original: 60 s).
    #[serde(default = "default_idle_ms")]
    pub cull_interval_ms: u64,
    /// CPU (thousandths of a core) and memory (MiB) this allocator's instances may
    /// take together; each instance takes its service's `cpu_millis` / `memory_mb`.
    #[serde(default = "default_alloc_cpu")]
    pub cpu_millis: u64,
    #[serde(default = "default_alloc_mem")]
    pub memory_mb: u64,
}

fn default_alloc_cpu() -> u64 {
    physarum_core::config::AllocatorConfig::default().cpu_millis
}

fn default_alloc_mem() -> u64 {
    physarum_core::config::AllocatorConfig::default().memory_mb
}

impl Default for AllocatorSpec {
    fn default() -> Self {
        AllocatorSpec {
            max_instances: default_max_instances(),
            boot_delay_ms: default_boot_ms(),
            idle_limit_ms: default_idle_ms(),
            cull_interval_ms: default_idle_ms(),
            cpu_millis: default_alloc_cpu(),
            memory_mb: default_alloc_mem(),
        }
    }
}

fn default_max_instances() -> usize {
    16
}

fn default_boot_ms() -> u64 {
    500
}

fn default_idle_ms() -> u64 {
    60_000
}

/// A link's round-trip time from the start, and its other properties for the whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub a: String,
    pub b: String,
    pub rtt_ms: f64,
    /// Random extra one-way delay on this link, 0 to this many ms.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub jitter_ms: f64,
    /// Messages lost at random on this link, both ways (as a `loss` fault at 0 ms).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loss: f64,
    /// The link is cut while its RTT is set above this (by latency faults, sweeps
    /// and waves), and healed when it comes back to it or below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_above_ms: Option<f64>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The shape of a periodic latency change ([`Fault::LatencyWave`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveShape {
    /// From low up to high and back down, linearly, once per period.
    Triangle,
    /// Low for the first half of each period, high for the second.
    Square,
    /// A cosine from low (at the start of each period) to high (half way) and back.
    Sine,
}

impl WaveShape {
    /// The wave's height at `phase` (0 to 1 within a period), from 0 (low) to 1 (high).
    pub fn height(self, phase: f64) -> f64 {
        match self {
            WaveShape::Triangle => 1.0 - (2.0 * phase - 1.0).abs(),
            WaveShape::Square => {
                if phase < 0.5 {
                    0.0
                } else {
                    1.0
                }
            }
            WaveShape::Sine => (1.0 - (2.0 * std::f64::consts::PI * phase).cos()) / 2.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduled {
    pub at_ms: u64,
    pub fault: Fault,
}

/// What can happen to the cluster during a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Cut every link between a host of `a` and a host of `b` (both directions).
    Partition { a: Vec<String>, b: Vec<String> },
    /// Heal those links.
    Repair { a: Vec<String>, b: Vec<String> },
    /// Crash a host: everything on it stops (instances of an allocator included).
    Crash { node: String },
    /// Start a crashed host's software again (fresh state).
    Restart { node: String },
    /// A bootstrap host goes down (crash: its provider records are lost).
    BootstrapDown { node: String },
    /// It comes back (empty, refilled by replication and re-advertising).
    BootstrapUp { node: String },
    /// Set the round-trip time of the links between `a` and `b`.
    Latency { a: String, b: String, rtt_ms: f64 },
    /// Change a link's RTT from `from_ms` to `to_ms` in equal steps every `every_ms`
    /// (the first step at `at_ms`, reaching `to_ms` after `steps` steps).
    LatencySweep { a: String, b: String, from_ms: f64, to_ms: f64, steps: u32, every_ms: u64 },
    /// Move a link's RTT periodically between `low_ms` and `high_ms` in the given
    /// shape, one change every `step_ms`, from `at_ms` until `until_ms`.
    LatencyWave {
        a: String,
        b: String,
        shape: WaveShape,
        low_ms: f64,
        high_ms: f64,
        period_ms: u64,
        step_ms: u64,
        until_ms: u64,
    },
    /// Lose messages between `a` and `b` at random with this probability per
    /// message, both ways (0 repairs): a datagram is gone, a stream segment is sent
    /// again after TCP's retransmission timeout.
    Loss { a: String, b: String, rate: f64 },
    /// From now on, this allocator's instances take this long to start.
    SlowStart { node: String, boot_delay_ms: u64 },
    /// The applications running on this host now (a service node's, or an
    /// allocator's instances') stop answering while their sidecars live on (a
    /// SIGSTOPped process: connections are accepted, no request is answered).
    HangApps { node: String },
    /// They answer again (SIGCONT): requests held meanwhile are answered too.
    ResumeApps { node: String },
}

impl Fault {
    /// A short human-readable label for timelines and traces.
    pub fn describe(&self) -> String {
        match self {
            Fault::Partition { a, b } => format!("partition {} | {}", a.join(","), b.join(",")),
            Fault::Repair { a, b } => format!("repair {} | {}", a.join(","), b.join(",")),
            Fault::Crash { node } => format!("crash {node}"),
            Fault::Restart { node } => format!("restart {node}"),
            Fault::BootstrapDown { node } => format!("bootstrap-down {node}"),
            Fault::BootstrapUp { node } => format!("bootstrap-up {node}"),
            Fault::Latency { a, b, rtt_ms } => format!("latency {a}<->{b} rtt={rtt_ms}ms"),
            Fault::LatencySweep { a, b, from_ms, to_ms, steps, every_ms } => {
                format!("latency-sweep {a}<->{b} {from_ms}ms->{to_ms}ms in {steps} steps every {every_ms}ms")
            }
            Fault::LatencyWave { a, b, shape, low_ms, high_ms, period_ms, .. } => {
                format!("latency-wave {a}<->{b} {shape:?} {low_ms}-{high_ms}ms period {period_ms}ms")
            }
            Fault::Loss { a, b, rate } => format!("loss {a}<->{b} rate={rate}"),
            Fault::SlowStart { node, boot_delay_ms } => format!("slow-start {node} boot={boot_delay_ms}ms"),
            Fault::HangApps { node } => format!("hang-apps {node}"),
            Fault::ResumeApps { node } => format!("resume-apps {node}"),
        }
    }

    /// Whether this fault disturbs the cluster (as opposed to healing it).
    pub fn is_disruptive(&self) -> bool {
        matches!(
            self,
            Fault::Partition { .. }
                | Fault::Crash { .. }
                | Fault::BootstrapDown { .. }
                | Fault::Loss { .. }
                | Fault::Latency { .. }
                | Fault::LatencySweep { .. }
                | Fault::LatencyWave { .. }
                | Fault::SlowStart { .. }
                | Fault::HangApps { .. }
        )
    }
}

/// A client application sending requests through its proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// The client node whose proxy the requests go through.
    pub client: String,
    pub service: String,
    pub start_ms: u64,
    /// Requests are sent during this long.
    pub duration_ms: u64,
    /// Requests per second (evenly spaced); 0 with `burst` sends only the burst.
    pub rate_per_s: f64,
    /// Send this many requests at once at `start_ms` (an allocation storm).
    #[serde(default)]
    pub burst: u32,
    /// The client gives up on a request after this long ("timed out").
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
}

/// The client's patience: over the proxies' 30 s request deadline, so an explicit
/// error (504) arrives first.
fn default_deadline() -> u64 {
    35_000
}

/// What a run must satisfy; checked after the run, violations are listed in the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invariants {
    /// Every request gets a response (success or an explicit error) by its deadline.
    #[serde(default)]
    pub answered_by_deadline: bool,
    /// At least this many requests succeed.
    #[serde(default)]
    pub min_ok: Option<u64>,
    /// At most this many requests fail or time out.
    #[serde(default)]
    pub max_not_ok: Option<u64>,
    /// At most this many instances are started per service over the whole run.
    #[serde(default)]
    pub max_starts_per_service: Option<u64>,
    /// No allocator starts more than `tuning.max_starts_per_window` instances of one
    /// service within any `tuning.start_window_ms` (counted per run of the allocator:
    /// a restarted one starts from nothing).
    #[serde(default)]
    pub bounded_allocations: bool,
    /// Every selection a client makes (`Event::Selected`) is of an instance whose link
    /// is up and within the service's hard RTT limit at that moment (or was at some
    /// moment of the `tuning.measurement_age_ms` before: the probe it rests on); and
    /// no request is routed, from the peer cache, to an instance whose link was over
    /// the hard limit (or cut) during the whole `selection_window_ms` before (the time
    /// the cache needs to notice: two lost probes and their timeouts).
    #[serde(default)]
    pub no_hard_violating_selection: bool,
    /// Requests sent this long after the last disturbance all succeed. A disturbance
    /// is a fault or its healing (partition, repair, crash, restart, loss, ...) or a
    /// latency change that takes a link over the strictest hard limit or back under
    /// it; latency steps within the limits (a sweep's, a wave's) are none.
    #[serde(default)]
    pub recover_within_ms: Option<u64>,
    /// At least this share of the requests sent succeed (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_rate: Option<f64>,
    /// No request is served by an instance whose link has been over the service's
    /// soft limit (or cut) for longer than this while the client used it: clients
    /// switch within this long of the instance they use crossing the soft limit (or of
    /// falling back to one already over it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_switch_delay_ms: Option<u64>,
    /// Whether a client may select an instance over the soft limit (a fallback,
    /// while nothing better can be had); `false`: never. Allowed unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_allowed: Option<bool>,
}

/// Knobs of the simulated network and nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Provider records expire this long after their last advertisement.
    #[serde(default = "default_record_ttl")]
    pub record_ttl_ms: u64,
    /// Nodes re-advertise this often (the core's `advertise_interval`).
    #[serde(default = "default_advertise")]
    pub advertise_interval_ms: u64,
    /// Bootstraps push their records to each other this often.
    #[serde(default = "default_replicate")]
    pub replicate_interval_ms: u64,
    /// Soft violations are tolerated this long before a better instance is sought.
    #[serde(default = "default_grace")]
    pub soft_grace_ms: u64,
    /// The window `no_hard_violating_selection` looks back over.
    #[serde(default = "default_selection_window")]
    pub selection_window_ms: u64,
    /// How long a proxy has to answer a client request (the runtime's
    /// `request_deadline`); keep it under the workloads' `deadline_ms`.
    #[serde(default = "default_request_deadline")]
    pub request_deadline_ms: u64,
    /// How old the measurement behind a selection may be (the core's
    /// `fresh_measurement`).
    #[serde(default = "default_measurement_age")]
    pub measurement_age_ms: u64,
    /// `bounded_allocations`: at most this many starts ...
    #[serde(default = "default_max_starts")]
    pub max_starts_per_window: u64,
    /// ... of one service on one allocator within any window this long.
    #[serde(default = "default_start_window")]
    pub start_window_ms: u64,
    /// Deliberate defects switched on in every node's core (tests of the invariants).
    #[serde(default)]
    pub defects: Vec<Defect>,
}

/// A deliberate defect of the core (see `physarum_core::config::Defects`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Defect {
    DropJoiningRequests,
    IgnoreHardLimit,
    StartPerRequest,
    EjectForever,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            record_ttl_ms: default_record_ttl(),
            advertise_interval_ms: default_advertise(),
            replicate_interval_ms: default_replicate(),
            soft_grace_ms: default_grace(),
            selection_window_ms: default_selection_window(),
            request_deadline_ms: default_request_deadline(),
            measurement_age_ms: default_measurement_age(),
            max_starts_per_window: default_max_starts(),
            start_window_ms: default_start_window(),
            defects: Vec::new(),
        }
    }
}

/// Production's provider-record TTL.
fn default_record_ttl() -> u64 {
    physarum_core::dht_policy::PROVIDER_RECORD_TTL.as_millis() as u64
}

fn default_advertise() -> u64 {
    30_000
}

fn default_replicate() -> u64 {
    10_000
}

fn default_grace() -> u64 {
    10_000
}

fn default_selection_window() -> u64 {
    3_000
}

fn default_measurement_age() -> u64 {
    100
}

fn default_max_starts() -> u64 {
    1
}

fn default_start_window() -> u64 {
    10_000
}

fn default_request_deadline() -> u64 {
    30_000
}

/// A scenario that does not hold together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid scenario: {}", self.0)
    }
}

impl std::error::Error for ScenarioError {}

/// Bounds that keep a scenario file from asking for unbounded memory or time
/// before the run even starts (every step and request is listed up front).
pub const MAX_SWEEP_STEPS: u32 = 10_000;
pub const MAX_REQUESTS: u64 = 1_000_000;

impl Scenario {
    /// Parse a scenario file's JSON text and validate it.
    pub fn from_json(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = serde_json::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a scenario always serialises")
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Names of the bootstrap nodes, in declaration order.
    pub fn bootstraps(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.role == Role::Bootstrap).map(|n| n.name.clone()).collect()
    }

    pub fn allocators(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| matches!(n.role, Role::Allocator(_))).map(|n| n.name.clone()).collect()
    }

    /// The effective soft and hard RTT limits of `service` in ms.
    pub fn limits_of(&self, service: &str) -> Limits {
        let spec = self.service(service);
        Limits {
            soft_ms: spec.and_then(|s| s.soft_ms).unwrap_or(self.defaults.soft_ms),
            hard_ms: spec.and_then(|s| s.hard_ms).unwrap_or(self.defaults.hard_ms),
        }
    }

    /// Check names, references and numbers.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let err = |m: String| Err(ScenarioError(m));
        if self.duration_ms == 0 {
            return err("duration_ms must be positive".into());
        }
        if self.tick_us == 0 || self.tick_us > 100_000 {
            return err("tick_us must be between 1 and 100000".into());
        }
        let mut names = BTreeSet::new();
        for n in &self.nodes {
            if n.name.is_empty() || !n.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return err(format!("node name {:?}: use letters, digits, '-' and '_'", n.name));
            }
            if !names.insert(n.name.as_str()) {
                return err(format!("node {:?} is declared twice", n.name));
            }
            if n.at.is_some_and(|p| p.iter().any(|c| !c.is_finite() || c.abs() > 30_000.0)) {
                return err(format!("node {:?}: `at` coordinates must be finite, within ±30000 ms", n.name));
            }
            if let Role::Service { service } | Role::RogueService { service } = &n.role {
                if self.service(service).is_none() {
                    return err(format!("node {:?} serves unknown service {service:?}", n.name));
                }
            }
        }
        let mut services = BTreeSet::new();
        for s in &self.services {
            if s.name.is_empty() || s.name.contains('/') {
                return err(format!("service name {:?} must be non-empty without '/'", s.name));
            }
            if !services.insert(s.name.as_str()) {
                return err(format!("service {:?} is declared twice", s.name));
            }
            let l = self.limits_of(&s.name);
            if l.soft_ms == 0 || l.soft_ms > l.hard_ms {
                return err(format!("service {:?}: need 0 < soft_ms <= hard_ms", s.name));
            }
        }
        if self.bootstraps().is_empty() {
            return err("at least one bootstrap node is needed".into());
        }
        let known = |n: &str| names.contains(n);
        let rtt_ok = |r: f64| (0.0..=60_000.0).contains(&r);
        for l in &self.links {
            if !known(&l.a) || !known(&l.b) {
                return err(format!("link {}<->{} names an unknown node", l.a, l.b));
            }
            if !rtt_ok(l.rtt_ms) {
                return err(format!("link {}<->{}: rtt_ms out of range", l.a, l.b));
            }
            if !(0.0..=10_000.0).contains(&l.jitter_ms) {
                return err(format!("link {}<->{}: jitter_ms must be within 0..=10000", l.a, l.b));
            }
            if !(0.0..=1.0).contains(&l.loss) {
                return err(format!("link {}<->{}: loss must be within 0..=1", l.a, l.b));
            }
            if l.cut_above_ms.is_some_and(|c| !rtt_ok(c)) {
                return err(format!("link {}<->{}: cut_above_ms out of range", l.a, l.b));
            }
        }
        if !rtt_ok(self.default_rtt_ms) {
            return err("default_rtt_ms out of range".into());
        }
        if let Some(p) = &self.placement {
            crate::policies::by_name(&p.policy, &p.params).map_err(ScenarioError)?;
        }
        if self.tuning.request_deadline_ms == 0 {
            return err("tuning.request_deadline_ms must be positive".into());
        }
        if self.jitter_ms > 10_000 {
            return err("jitter_ms out of range".into());
        }
        for s in &self.schedule {
            let check = |n: &String| if known(n) { Ok(()) } else { err(format!("fault names unknown node {n:?}")) };
            match &s.fault {
                Fault::Partition { a, b } | Fault::Repair { a, b } => {
                    a.iter().chain(b.iter()).try_for_each(check)?;
                }
                Fault::Crash { node } | Fault::Restart { node } => check(node)?,
                Fault::BootstrapDown { node } | Fault::BootstrapUp { node } => {
                    check(node)?;
                    if self.node(node).map(|n| &n.role) != Some(&Role::Bootstrap) {
                        return err(format!("{node:?} is not a bootstrap"));
                    }
                }
                Fault::Latency { a, b, rtt_ms } => {
                    check(a)?;
                    check(b)?;
                    if !rtt_ok(*rtt_ms) {
                        return err("latency fault: rtt_ms out of range".into());
                    }
                }
                Fault::LatencySweep { a, b, from_ms, to_ms, steps, every_ms } => {
                    check(a)?;
                    check(b)?;
                    if !rtt_ok(*from_ms) || !rtt_ok(*to_ms) || *steps == 0 {
                        return err("latency sweep: rtt out of range or zero steps".into());
                    }
                    if *steps > MAX_SWEEP_STEPS {
                        return err(format!("latency sweep: more than {MAX_SWEEP_STEPS} steps"));
                    }
                    if every_ms.checked_mul(u64::from(*steps)).and_then(|d| d.checked_add(s.at_ms)).is_none() {
                        return err("latency sweep: its last step is beyond any time".into());
                    }
                }
                Fault::LatencyWave { a, b, low_ms, high_ms, period_ms, step_ms, until_ms, .. } => {
                    check(a)?;
                    check(b)?;
                    if !rtt_ok(*low_ms) || !rtt_ok(*high_ms) || low_ms > high_ms {
                        return err("latency wave: need 0 <= low_ms <= high_ms <= 60000".into());
                    }
                    if *period_ms == 0 || *step_ms == 0 || *until_ms < s.at_ms {
                        return err(
                            "latency wave: period_ms and step_ms must be positive, until_ms not before at_ms".into()
                        );
                    }
                    if (until_ms - s.at_ms) / step_ms >= u64::from(MAX_SWEEP_STEPS) {
                        return err(format!("latency wave: more than {MAX_SWEEP_STEPS} steps"));
                    }
                }
                Fault::Loss { a, b, rate } => {
                    check(a)?;
                    check(b)?;
                    if !(0.0..=1.0).contains(rate) {
                        return err("loss rate must be within 0..=1".into());
                    }
                }
                Fault::HangApps { node } | Fault::ResumeApps { node } => check(node)?,
                Fault::SlowStart { node, .. } => {
                    check(node)?;
                    if !matches!(self.node(node).map(|n| &n.role), Some(Role::Allocator(_))) {
                        return err(format!("slow_start: {node:?} is not an allocator"));
                    }
                }
            }
        }
        for w in &self.workloads {
            if self.node(&w.client).map(|n| &n.role) != Some(&Role::Client) {
                return err(format!("workload client {:?} is not a client node", w.client));
            }
            if !w.rate_per_s.is_finite() || w.rate_per_s < 0.0 || w.rate_per_s > 10_000.0 {
                return err(format!("workload of {:?}: rate_per_s out of range", w.client));
            }
            if w.deadline_ms == 0 {
                return err(format!("workload of {:?}: deadline_ms must be positive", w.client));
            }
            if w.start_ms.checked_add(w.duration_ms).is_none() {
                return err(format!("workload of {:?}: it ends beyond any time", w.client));
            }
        }
        if self.invariants.min_success_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            return err("invariants.min_success_rate must be within 0..=1".into());
        }
        let requests: f64 =
            self.workloads.iter().map(|w| f64::from(w.burst) + w.rate_per_s * w.duration_ms as f64 / 1000.0).sum();
        if requests > MAX_REQUESTS as f64 {
            return err(format!("the workloads send more than {MAX_REQUESTS} requests"));
        }
        Ok(())
    }

    /// The schedule as the engines apply it, in time order (stable: faults at the same
    /// time keep their declaration order): links' loss as `loss` faults at 0 ms, sweeps
    /// and waves expanded into single latency changes, and a link with `cut_above_ms`
    /// partitioned while a latency change sets it above that (repaired when one sets
    /// it back).
    pub fn expanded_schedule(&self) -> Vec<Scheduled> {
        let mut out = Vec::new();
        for l in self.links.iter().filter(|l| l.loss > 0.0) {
            out.push(Scheduled { at_ms: 0, fault: Fault::Loss { a: l.a.clone(), b: l.b.clone(), rate: l.loss } });
        }
        for s in &self.schedule {
            match &s.fault {
                Fault::LatencySweep { a, b, from_ms, to_ms, steps, every_ms } => {
                    for i in 0..=*steps {
                        let rtt = from_ms + (to_ms - from_ms) * f64::from(i) / f64::from(*steps);
                        let rtt = (rtt * 1000.0).round() / 1000.0;
                        out.push(Scheduled {
                            at_ms: s.at_ms + u64::from(i) * every_ms,
                            fault: Fault::Latency { a: a.clone(), b: b.clone(), rtt_ms: rtt },
                        });
                    }
                }
                Fault::LatencyWave { a, b, shape, low_ms, high_ms, period_ms, step_ms, until_ms } => {
                    let mut at = s.at_ms;
                    while at <= *until_ms {
                        let phase = ((at - s.at_ms) % period_ms) as f64 / *period_ms as f64;
                        let rtt = low_ms + (high_ms - low_ms) * shape.height(phase);
                        let rtt = (rtt * 1000.0).round() / 1000.0;
                        out.push(Scheduled {
                            at_ms: at,
                            fault: Fault::Latency { a: a.clone(), b: b.clone(), rtt_ms: rtt },
                        });
                        let Some(next) = at.checked_add(*step_ms) else { break };
                        at = next;
                    }
                }
                _ => out.push(s.clone()),
            }
        }
        out.sort_by_key(|s| s.at_ms);
        self.cut_while_above(out)
    }

    /// Partition / repair links with `cut_above_ms` where the latency changes of
    /// `schedule` cross it.
    fn cut_while_above(&self, schedule: Vec<Scheduled>) -> Vec<Scheduled> {
        let thresholds: BTreeMap<(String, String), f64> =
            self.links.iter().filter_map(|l| l.cut_above_ms.map(|c| (crate::topology::pair(&l.a, &l.b), c))).collect();
        if thresholds.is_empty() {
            return schedule;
        }
        let topology = crate::topology::Topology::of(self);
        let mut cut: BTreeSet<(String, String)> = BTreeSet::new();
        let mut out = Vec::with_capacity(schedule.len());
        // A link set up over its threshold is cut from the start.
        for (p, limit) in &thresholds {
            if topology.rtt_ms(&p.0, &p.1) > *limit {
                cut.insert(p.clone());
                out.push(Scheduled {
                    at_ms: 0,
                    fault: Fault::Partition { a: vec![p.0.clone()], b: vec![p.1.clone()] },
                });
            }
        }
        for s in schedule {
            let crossing = match &s.fault {
                Fault::Latency { a, b, rtt_ms } => {
                    let p = crate::topology::pair(a, b);
                    thresholds.get(&p).and_then(|limit| {
                        let above = *rtt_ms > *limit;
                        (above != cut.contains(&p)).then_some((p, above))
                    })
                }
                _ => None,
            };
            let at_ms = s.at_ms;
            out.push(s);
            if let Some((p, above)) = crossing {
                let (a, b) = (vec![p.0.clone()], vec![p.1.clone()]);
                let fault = if above {
                    cut.insert(p);
                    Fault::Partition { a, b }
                } else {
                    cut.remove(&p);
                    Fault::Repair { a, b }
                };
                out.push(Scheduled { at_ms, fault });
            }
        }
        out
    }

    /// When the last disturbance happens (see [`Invariants::recover_within_ms`]), in
    /// ms from the start; 0 if none.
    pub fn last_disturbance_ms(&self) -> u64 {
        let hard = self.services.iter().map(|s| self.limits_of(&s.name).hard_ms).min().unwrap_or(self.defaults.hard_ms);
        let topology = crate::topology::Topology::of(self);
        let mut rtt: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut last = 0;
        for s in self.expanded_schedule() {
            match &s.fault {
                Fault::Latency { a, b, rtt_ms } => {
                    let before = rtt.insert(crate::topology::pair(a, b), *rtt_ms).unwrap_or(topology.rtt_ms(a, b));
                    if (before > hard as f64) != (*rtt_ms > hard as f64) {
                        last = s.at_ms;
                    }
                }
                _ => last = s.at_ms,
            }
        }
        last
    }

    /// Requests the workloads send, in time order: (at_ms, workload index).
    pub fn request_times(&self) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            for _ in 0..w.burst {
                out.push((w.start_ms, i));
            }
            if w.rate_per_s > 0.0 {
                let gap = 1000.0 / w.rate_per_s;
                let mut k = 0u64;
                loop {
                    let at = w.start_ms.saturating_add((k as f64 * gap).round() as u64);
                    if at >= w.start_ms + w.duration_ms {
                        break;
                    }
                    out.push((at, i));
                    k += 1;
                }
            }
        }
        out.sort();
        out
    }
}

/// Builds a [`Scenario`] in Rust: `ScenarioBuilder::new("name", secs)` then roles,
/// links, faults and workloads. Names are checked when [`ScenarioBuilder::build`] validates.
#[derive(Clone, Debug)]
pub struct ScenarioBuilder {
    s: Scenario,
}

impl ScenarioBuilder {
    pub fn new(name: &str, duration_ms: u64) -> Self {
        ScenarioBuilder {
            s: Scenario {
                name: name.into(),
                duration_ms,
                tick_us: default_tick_us(),
                default_rtt_ms: default_rtt_ms(),
                jitter_ms: 0,
                defaults: Limits::default(),
                services: Vec::new(),
                nodes: Vec::new(),
                links: Vec::new(),
                schedule: Vec::new(),
                workloads: Vec::new(),
                invariants: Invariants::default(),
                tuning: Tuning::default(),
                placement: None,
            },
        }
    }

    pub fn tick_us(mut self, tick: u64) -> Self {
        self.s.tick_us = tick;
        self
    }

    pub fn default_rtt_ms(mut self, rtt: f64) -> Self {
        self.s.default_rtt_ms = rtt;
        self
    }

    pub fn jitter_ms(mut self, jitter: u64) -> Self {
        self.s.jitter_ms = jitter;
        self
    }

    pub fn defaults(mut self, soft_ms: u64, hard_ms: u64) -> Self {
        self.s.defaults = Limits { soft_ms, hard_ms };
        self
    }

    /// A service with its own soft/hard RTT limits.
    pub fn service(mut self, name: &str, soft_ms: u64, hard_ms: u64) -> Self {
        self.s.services.push(ServiceSpec {
            name: name.into(),
            soft_ms: Some(soft_ms),
            hard_ms: Some(hard_ms),
            cpu_millis: default_cpu(),
            memory_mb: default_mem(),
        });
        self
    }

    pub fn node(mut self, name: &str, role: Role) -> Self {
        self.s.nodes.push(NodeSpec { name: name.into(), role, at: None });
        self
    }

    pub fn bootstrap(self, name: &str) -> Self {
        self.node(name, Role::Bootstrap)
    }

    pub fn registry(self, name: &str) -> Self {
        self.node(name, Role::Registry)
    }

    pub fn allocator(self, name: &str) -> Self {
        self.node(name, Role::Allocator(AllocatorSpec::default()))
    }

    pub fn allocator_with(self, name: &str, spec: AllocatorSpec) -> Self {
        self.node(name, Role::Allocator(spec))
    }

    pub fn service_node(self, name: &str, service: &str) -> Self {
        self.node(name, Role::Service { service: service.into() })
    }

    pub fn client(self, name: &str) -> Self {
        self.node(name, Role::Client)
    }

    pub fn rogue_service(self, name: &str, service: &str) -> Self {
        self.node(name, Role::RogueService { service: service.into() })
    }

    pub fn rogue_registry(self, name: &str) -> Self {
        self.node(name, Role::RogueRegistry)
    }

    pub fn link(mut self, a: &str, b: &str, rtt_ms: f64) -> Self {
        self.s.links.push(LinkSpec { a: a.into(), b: b.into(), rtt_ms, jitter_ms: 0.0, loss: 0.0, cut_above_ms: None });
        self
    }

    /// A link with all its properties.
    pub fn link_with(mut self, link: LinkSpec) -> Self {
        self.s.links.push(link);
        self
    }

    pub fn at(mut self, at_ms: u64, fault: Fault) -> Self {
        self.s.schedule.push(Scheduled { at_ms, fault });
        self
    }

    pub fn workload(mut self, w: Workload) -> Self {
        self.s.workloads.push(w);
        self
    }

    /// `rate_per_s` requests per second from `client` for `service` during
    /// `[start_ms, start_ms + duration_ms)`, each with a 35 s deadline.
    pub fn requests(self, client: &str, service: &str, start_ms: u64, duration_ms: u64, rate_per_s: f64) -> Self {
        self.workload(Workload {
            client: client.into(),
            service: service.into(),
            start_ms,
            duration_ms,
            rate_per_s,
            burst: 0,
            deadline_ms: default_deadline(),
        })
    }

    /// `n` requests at once at `at_ms`.
    pub fn burst(self, client: &str, service: &str, at_ms: u64, n: u32) -> Self {
        self.workload(Workload {
            client: client.into(),
            service: service.into(),
            start_ms: at_ms,
            duration_ms: 0,
            rate_per_s: 0.0,
            burst: n,
            deadline_ms: default_deadline(),
        })
    }

    pub fn invariants(mut self, inv: Invariants) -> Self {
        self.s.invariants = inv;
        self
    }

    /// Every client places with the policy called `name` (see [`crate::policies`]).
    pub fn placement(mut self, name: &str, params: &[(&str, f64)]) -> Self {
        let params = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        self.s.placement = Some(PlacementSpec { policy: name.into(), params });
        self
    }

    pub fn tuning(mut self, t: Tuning) -> Self {
        self.s.tuning = t;
        self
    }

    /// The scenario so far, unchecked (to modify it further).
    pub fn scenario_mut(&mut self) -> &mut Scenario {
        &mut self.s
    }

    pub fn build(self) -> Result<Scenario, ScenarioError> {
        self.s.validate()?;
        Ok(self.s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Scenario {
        ScenarioBuilder::new("t", 10_000)
            .service("hello", 50, 200)
            .bootstrap("boot")
            .registry("reg")
            .allocator("alloc")
            .client("c")
            .link("c", "alloc", 4.0)
            .at(
                5000,
                Fault::LatencySweep {
                    a: "c".into(),
                    b: "alloc".into(),
                    from_ms: 10.0,
                    to_ms: 2.0,
                    steps: 4,
                    every_ms: 100,
                },
            )
            .at(1000, Fault::Crash { node: "alloc".into() })
            .requests("c", "hello", 0, 1000, 4.0)
            .burst("c", "hello", 2000, 3)
            .build()
            .unwrap()
    }

    #[test]
    fn json_roundtrip() {
        let s = small();
        assert_eq!(Scenario::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn sweeps_expand_in_time_order() {
        let sched = small().expanded_schedule();
        let times: Vec<u64> = sched.iter().map(|s| s.at_ms).collect();
        assert_eq!(times, vec![1000, 5000, 5100, 5200, 5300, 5400]);
        assert_eq!(sched[1].fault, Fault::Latency { a: "c".into(), b: "alloc".into(), rtt_ms: 10.0 });
        assert_eq!(sched[5].fault, Fault::Latency { a: "c".into(), b: "alloc".into(), rtt_ms: 2.0 });
    }

    /// A wave ending at the end of time stops there.
    #[test]
    fn a_wave_at_the_end_of_time_stops() {
        let mut s = small();
        s.schedule = vec![Scheduled {
            at_ms: u64::MAX - 1,
            fault: Fault::LatencyWave {
                a: "c".into(),
                b: "alloc".into(),
                shape: WaveShape::Square,
                low_ms: 1.0,
                high_ms: 2.0,
                period_ms: 4,
                step_ms: 5,
                until_ms: u64::MAX,
            },
        }];
        let s = Scenario::from_json(&s.to_json()).unwrap();
        assert_eq!(s.expanded_schedule().len(), 1);
    }

    #[test]
    fn waves_expand_into_periodic_steps() {
        let wave = |shape| {
            let mut s = small();
            s.schedule = vec![Scheduled {
                at_ms: 1000,
                fault: Fault::LatencyWave {
                    a: "c".into(),
                    b: "alloc".into(),
                    shape,
                    low_ms: 2.0,
                    high_ms: 10.0,
                    period_ms: 4000,
                    step_ms: 1000,
                    until_ms: 9000,
                },
            }];
            s.validate().unwrap();
            let rtts: Vec<(u64, f64)> = s
                .expanded_schedule()
                .into_iter()
                .map(|x| match x.fault {
                    Fault::Latency { rtt_ms, .. } => (x.at_ms, rtt_ms),
                    other => panic!("{other:?}"),
                })
                .collect();
            rtts
        };
        let tri: Vec<f64> = wave(WaveShape::Triangle).into_iter().map(|x| x.1).collect();
        assert_eq!(tri, [2.0, 6.0, 10.0, 6.0, 2.0, 6.0, 10.0, 6.0, 2.0]);
        let sq: Vec<f64> = wave(WaveShape::Square).into_iter().map(|x| x.1).collect();
        assert_eq!(sq, [2.0, 2.0, 10.0, 10.0, 2.0, 2.0, 10.0, 10.0, 2.0]);
        let sine = wave(WaveShape::Sine);
        assert_eq!((sine[0], sine[2], sine[8]), ((1000, 2.0), (3000, 10.0), (9000, 2.0)));
        assert_eq!(sine[1].1, 6.0);
    }

    #[test]
    fn a_link_is_cut_while_its_rtt_is_above_its_threshold() {
        let mut s = small();
        s.schedule.clear();
        s.links[0].cut_above_ms = Some(5.0);
        s.links[0].loss = 0.25;
        s.schedule.push(Scheduled {
            at_ms: 100,
            fault: Fault::LatencySweep {
                a: "c".into(),
                b: "alloc".into(),
                from_ms: 4.0,
                to_ms: 7.0,
                steps: 3,
                every_ms: 100,
            },
        });
        s.schedule
            .push(Scheduled { at_ms: 1000, fault: Fault::Latency { a: "alloc".into(), b: "c".into(), rtt_ms: 1.0 } });
        let text: Vec<String> =
            s.expanded_schedule().iter().map(|x| format!("{} {}", x.at_ms, x.fault.describe())).collect();
        assert_eq!(
            text,
            [
                "0 loss c<->alloc rate=0.25",
                "100 latency c<->alloc rtt=4ms",
                "200 latency c<->alloc rtt=5ms",
                "300 latency c<->alloc rtt=6ms",
                "300 partition alloc | c",
                "400 latency c<->alloc rtt=7ms",
                "1000 latency alloc<->c rtt=1ms",
                "1000 repair alloc | c",
            ]
        );
        // Over the threshold from the start: cut from the start.
        s.links[0].rtt_ms = 9.0;
        assert_eq!(s.expanded_schedule()[0].fault, Fault::Partition { a: vec!["alloc".into()], b: vec!["c".into()] });
    }

    #[test]
    fn only_real_disturbances_restart_the_recovery_clock() {
        let mut s = small(); // hello: hard 200 ms; a crash at 1 s, a 10 → 2 ms sweep at 5 s
        assert_eq!(s.last_disturbance_ms(), 1000);
        s.schedule
            .push(Scheduled { at_ms: 7000, fault: Fault::Latency { a: "c".into(), b: "alloc".into(), rtt_ms: 300.0 } });
        assert_eq!(s.last_disturbance_ms(), 7000);
        s.schedule
            .push(Scheduled { at_ms: 8000, fault: Fault::Latency { a: "c".into(), b: "alloc".into(), rtt_ms: 250.0 } });
        assert_eq!(s.last_disturbance_ms(), 7000);
        s.schedule
            .push(Scheduled { at_ms: 9000, fault: Fault::Latency { a: "c".into(), b: "alloc".into(), rtt_ms: 20.0 } });
        assert_eq!(s.last_disturbance_ms(), 9000);
    }

    #[test]
    fn request_times_cover_rate_and_burst() {
        let t = small().request_times();
        assert_eq!(t.iter().filter(|(at, _)| *at < 1000).count(), 4);
        assert_eq!(t.iter().filter(|(at, _)| *at == 2000).count(), 3);
    }

    #[test]
    fn unknown_names_are_refused() {
        let e = ScenarioBuilder::new("t", 1000).bootstrap("b").link("b", "nope", 1.0).build().unwrap_err();
        assert!(e.0.contains("unknown node"), "{e}");
        let e = ScenarioBuilder::new("t", 1000).client("c").build().unwrap_err();
        assert!(e.0.contains("bootstrap"), "{e}");
        assert!(Scenario::from_json("{\"name\": 1}").is_err());
    }

    /// Found by the `scenario` fuzz target: each of these files made reading a
    /// scenario panic on an overflow or run out of memory listing its steps and
    /// requests; now each is a clear error.
    #[test]
    fn scenarios_asking_for_unbounded_work_are_refused() {
        fn sweep(at_ms: u64, steps: u32, every_ms: u64) -> Scheduled {
            let (a, b) = ("c".into(), "alloc".into());
            Scheduled { at_ms, fault: Fault::LatencySweep { a, b, from_ms: 1.0, to_ms: 2.0, steps, every_ms } }
        }
        type Change = fn(&mut Scenario);
        let cases: [(&str, Change); 6] = [
            ("more than 10000 steps", |s| s.schedule.push(sweep(0, u32::MAX, 1))),
            ("beyond any time", |s| s.schedule.push(sweep(u64::MAX, 2, u64::MAX))),
            ("more than 10000 steps", |s| {
                let (a, b, shape) = ("c".into(), "alloc".into(), WaveShape::Sine);
                let wave = Fault::LatencyWave {
                    a,
                    b,
                    shape,
                    low_ms: 1.0,
                    high_ms: 2.0,
                    period_ms: 10,
                    step_ms: 1,
                    until_ms: u64::MAX,
                };
                s.schedule.push(Scheduled { at_ms: 5, fault: wave });
            }),
            ("more than 1000000 requests", |s| s.workloads[1].burst = u32::MAX),
            ("beyond any time", |s| s.workloads[0].start_ms = u64::MAX),
            ("more than 1000000 requests", |s| {
                s.workloads[0].rate_per_s = 10_000.0;
                s.workloads[0].duration_ms = u64::MAX / 2;
            }),
        ];
        for (want, change) in cases {
            let mut s = small();
            change(&mut s);
            let e = Scenario::from_json(&s.to_json()).unwrap_err();
            assert!(e.0.contains(want), "{want:?}: {e}");
        }
    }

    /// A rate so low that the second request would come after the end of time.
    #[test]
    fn a_vanishing_rate_sends_one_request() {
        let mut s = small();
        s.workloads[0].start_ms = u64::MAX - 10;
        s.workloads[0].duration_ms = 10;
        s.workloads[0].rate_per_s = 1e-300;
        let s = Scenario::from_json(&s.to_json()).unwrap();
        assert_eq!(s.request_times().iter().filter(|(_, w)| *w == 0).count(), 1);
    }
}
