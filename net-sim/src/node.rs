//! What runs on each simulated host: the core's `Node` through the shared runtime's
//! node loop (`physarum_runtime::NodeRuntime`) over [`SimTransport`], per role; the
//! simulated instance driver; the client application's workload.

use crate::app::{self, ClientResult};
use crate::dht::{self, AbortOnDrop, ServerConfig};
use crate::scenario::{AllocatorSpec, Defect, Role, Scenario};
use crate::trace::{sim_now, Kind, Trace};
use crate::transport::{Endpoint, EndpointConfig, LossModel, SimConnector, SimListener, SimTransport};
use physarum_core::config::{AllocatorConfig, Defects, NodeConfig};
use physarum_core::io::Output;
use physarum_core::perf::Requirements;
use physarum_core::time::Instant;
use physarum_core::trust::{Grant, Issuer, Operators, SecretKey, SignedEntry, TrustConfig};
use physarum_core::types::{ContentHash, InstanceId, PeerAddr, PeerId, RunSpec, ServiceInfo};
use physarum_runtime::transport::{inbound_channel, ExitSink, InstanceDriver, Observer};
use physarum_runtime::{NodeRuntime, Running, RuntimeConfig};
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

/// UDP (wire frames) and TCP (tunnels) port of every top-level node.
pub const NODE_PORT: u16 = 7000;
/// HTTP front end of client proxies.
pub const HTTP_PORT: u16 = 8080;
/// The application of a statically deployed service node.
pub const APP_PORT: u16 = 9000;
/// Instance `i` of an allocator listens on `INSTANCE_PORT_BASE + i`, its application
/// on `INSTANCE_APP_PORT_BASE + i` (host networking, as in the original).
pub const INSTANCE_PORT_BASE: u16 = 10_000;
pub const INSTANCE_APP_PORT_BASE: u16 = 30_000;
/// Instance ids above this are refused (the ports would run out).
pub const MAX_INSTANCE_ID: u64 = 20_000;
/// The simulated wall clock at the start of a run, in unix seconds (certificates
/// expire in wall time).
pub const SIM_UNIX_AT_ZERO: u64 = 1_800_000_000;

/// The content hash a scenario service's instances advertise under.
pub fn service_hash(name: &str) -> ContentHash {
    ContentHash(format!("sim-{name}-v1"))
}

/// One client request's fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Not sent (yet), or its client host crashed before an answer.
    Pending,
    /// An HTTP answer with this status.
    Answered { status: u16, served_by: Option<String>, latency: Duration },
    /// No HTTP answer: the connection failed.
    Error(String),
    /// No answer by the deadline.
    TimedOut,
}

/// A request of a workload.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub seq: u64,
    pub client: String,
    pub service: String,
    /// When it is (or was) sent.
    pub at: Duration,
    pub deadline: Duration,
    pub fate: Fate,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        matches!(self.fate, Fate::Answered { status, .. } if (200..300).contains(&status))
    }
}

/// An application started by the simulation: its host, and whether it is hung.
struct RunningApp {
    host: String,
    hung: Rc<Cell<bool>>,
}

/// Everything the hosts of one run share (all on turmoil's one thread).
pub struct Ctx {
    pub scenario: Scenario,
    pub seed: u64,
    pub trace: Trace,
    pub requests: RefCell<Vec<RequestRecord>>,
    /// Starts of each host's software so far.
    incarnations: RefCell<BTreeMap<String, u32>>,
    /// Current boot delay of each allocator (changed by `SlowStart` faults).
    pub boot_delays: RefCell<BTreeMap<String, Duration>>,
    /// Every instance ever started: peer id → host.
    pub instance_hosts: RefCell<BTreeMap<String, String>>,
    /// The applications running now: instance (or service node) → where and whether hung.
    apps: RefCell<BTreeMap<String, RunningApp>>,
    pub runtime: RuntimeConfig,
    /// Message loss on the links (`Fault::Loss`), applied by every node's transport.
    pub loss: LossModel,
}

impl Ctx {
    pub fn new(scenario: Scenario, seed: u64, trace: Trace) -> Rc<Ctx> {
        let mut requests = Vec::new();
        for (seq, (at_ms, w)) in scenario.request_times().into_iter().enumerate() {
            let w = &scenario.workloads[w];
            requests.push(RequestRecord {
                seq: seq as u64,
                client: w.client.clone(),
                service: w.service.clone(),
                at: Duration::from_millis(at_ms),
                deadline: Duration::from_millis(w.deadline_ms),
                fate: Fate::Pending,
            });
        }
        let mut boot_delays = BTreeMap::new();
        for n in &scenario.nodes {
            if let Role::Allocator(a) = &n.role {
                boot_delays.insert(n.name.clone(), Duration::from_millis(a.boot_delay_ms));
            }
        }
        Rc::new(Ctx {
            loss: LossModel::new(seed ^ 0x1055),
            seed,
            trace,
            requests: RefCell::new(requests),
            incarnations: RefCell::new(BTreeMap::new()),
            boot_delays: RefCell::new(boot_delays),
            instance_hosts: RefCell::new(BTreeMap::new()),
            apps: RefCell::new(BTreeMap::new()),
            runtime: RuntimeConfig {
                request_deadline: Duration::from_millis(scenario.tuning.request_deadline_ms),
                ..RuntimeConfig::default()
            },
            scenario,
        })
    }

    /// `HangApps` / `ResumeApps`: every application now running on `host` stops
    /// (or resumes) answering.
    pub fn set_apps_hung(&self, host: &str, hung: bool) {
        for (instance, app) in self.apps.borrow().iter() {
            if app.host == host && app.hung.get() != hung {
                app.hung.set(hung);
                let what = if hung { "hang" } else { "resume" };
                self.trace.here(host, Kind::Driver(format!("{what} {instance}")));
            }
        }
    }

    /// Register an application that starts now; it answers until `hang_apps`.
    fn app_started(&self, instance: &str, host: &str) -> Rc<Cell<bool>> {
        let hung = Rc::new(Cell::new(false));
        self.apps.borrow_mut().insert(instance.to_string(), RunningApp { host: host.to_string(), hung: hung.clone() });
        hung
    }

    pub(crate) fn next_incarnation(&self, host: &str) -> u32 {
        let mut m = self.incarnations.borrow_mut();
        let n = m.entry(host.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// A node's RNG seed: derived from the run's seed and its peer id.
    pub fn node_seed(&self, peer: &str) -> u64 {
        let mut h = Sha256::new();
        h.update(self.seed.to_be_bytes());
        h.update(peer.as_bytes());
        let d = h.finalize();
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// The registry entry of a scenario service.
    pub fn service_info(&self, name: &str) -> Option<ServiceInfo> {
        let spec = self.scenario.service(name)?;
        let l = self.scenario.limits_of(name);
        Some(ServiceInfo {
            name: name.to_string(),
            hash: service_hash(name),
            run: RunSpec::Image { image: format!("sim/{name}:latest") },
            requirements: Requirements::rtt(Duration::from_millis(l.soft_ms), Duration::from_millis(l.hard_ms)),
            cpu_millis: spec.cpu_millis,
            memory_mb: spec.memory_mb,
            stateful: false,
            client_mode: false,
        })
    }

    /// A key derived from the run's seed: the run's one operator (`"operator"`), an
    /// allocator's identity (its name), or a rogue's (`"rogue"`).
    pub fn key(&self, what: &str) -> SecretKey {
        let mut h = Sha256::new();
        h.update(self.seed.to_be_bytes());
        h.update(b"key:");
        h.update(what.as_bytes());
        SecretKey::from_bytes(h.finalize().into())
    }

    /// Every scenario service's entry, as `signer` signed it.
    pub(crate) fn signed_entries(&self, signer: &SecretKey, forge: bool) -> Vec<SignedEntry> {
        let infos = self.scenario.services.iter().filter_map(|s| self.service_info(&s.name));
        infos
            .map(|mut info| {
                if forge {
                    info.run = RunSpec::Image { image: format!("evil/{}", info.name) };
                }
                SignedEntry::sign(info.name.clone(), 1, Some(info), signer)
            })
            .collect()
    }

    pub(crate) fn node_config(&self, peer: &PeerId) -> NodeConfig {
        let d = self.scenario.defaults;
        let mut c = NodeConfig::new(
            peer.clone(),
            Requirements::rtt(Duration::from_millis(d.soft_ms), Duration::from_millis(d.hard_ms)),
        );
        c.trust = TrustConfig::new(Operators::new(vec![self.key("operator").public()]), SIM_UNIX_AT_ZERO);
        c.manager.advertise_interval = Duration::from_millis(self.scenario.tuning.advertise_interval_ms);
        c.manager.soft_grace = Duration::from_millis(self.scenario.tuning.soft_grace_ms);
        c.manager.defects = self.defects();
        if let Some(p) = &self.scenario.placement {
            c.manager.placement = crate::policies::by_name(&p.policy, &p.params).unwrap_or_default();
        }
        c
    }

    /// An allocator's configuration from its scenario entry.
    pub(crate) fn allocator_config(&self, spec: &AllocatorSpec) -> AllocatorConfig {
        AllocatorConfig {
            max_instances: spec.max_instances,
            cpu_millis: spec.cpu_millis,
            memory_mb: spec.memory_mb,
            cull_interval: Duration::from_millis(spec.cull_interval_ms),
            idle_limit: Duration::from_millis(spec.idle_limit_ms),
            defects: self.defects(),
            ..AllocatorConfig::default()
        }
    }

    /// The deliberate defects the scenario switches on.
    fn defects(&self) -> Defects {
        let mut d = Defects::default();
        for defect in &self.scenario.tuning.defects {
            match defect {
                Defect::DropJoiningRequests => d.drop_joining_requests = true,
                Defect::IgnoreHardLimit => d.ignore_hard_limit = true,
                Defect::StartPerRequest => d.start_per_request = true,
                Defect::EjectForever => d.eject_forever = true,
            }
        }
        d
    }

    fn endpoint(&self, peer: &PeerId, host: &str, port: u16) -> EndpointConfig {
        let mut ep = EndpointConfig::new(peer.clone(), host, port, self.scenario.bootstraps());
        ep.loss = self.loss.clone();
        ep
    }
}

/// Traces a node's routing decisions and core events.
struct TraceObserver {
    node: String,
    trace: Trace,
}

impl Observer for TraceObserver {
    fn output(&self, _now: Instant, output: &Output) {
        self.trace.output(&self.node, output);
    }
}

/// A node's runtime and transport; dropping it stops both.
struct NodeParts {
    running: Running<SimTransport>,
    endpoint: Endpoint,
}

/// Start the transport and the node loop of one node.
async fn start_node<D: InstanceDriver>(
    ctx: &Rc<Ctx>,
    config: NodeConfig,
    mut ep: EndpointConfig,
    driver: D,
    app_port: Option<u16>,
) -> std::io::Result<NodeParts> {
    // A sidecar's probe answer says whether its application answers (the core decides).
    ep.pings_to_node = app_port.is_some();
    let (senders, inbound) = inbound_channel();
    let peer = ep.peer.clone();
    let (transport, endpoint) = SimTransport::start(ep, senders, ctx.trace.clone()).await?;
    let observer = TraceObserver { node: peer.0.clone(), trace: ctx.trace.clone() };
    let rt = NodeRuntime::new(config, ctx.node_seed(&peer.0), transport, inbound, ctx.runtime.clone())
        .with_driver(driver)
        .with_observer(observer);
    let running = match app_port {
        Some(port) => rt.with_app(SimConnector { port }).spawn(),
        None => rt.spawn(),
    };
    Ok(NodeParts { running, endpoint })
}

/// The software of host `name` (called again on every restart).
pub async fn host_main(ctx: Rc<Ctx>, name: String) -> turmoil::Result {
    let incarnation = ctx.next_incarnation(&name);
    let role = ctx.scenario.node(&name).map(|n| n.role.clone()).ok_or("unknown host")?;
    if role == Role::Bootstrap {
        let peers = ctx.scenario.bootstraps().into_iter().filter(|b| *b != name).collect();
        let t = &ctx.scenario.tuning;
        let cfg = ServerConfig {
            name: name.clone(),
            peers,
            record_ttl: Duration::from_millis(t.record_ttl_ms),
            replicate_interval: Duration::from_millis(t.replicate_interval_ms),
            epoch: u64::from(incarnation),
        };
        dht::serve(cfg, ctx.trace.clone()).await?;
        return Ok(());
    }
    ctx.trace.here(&name, Kind::NodeStarted { incarnation });
    let peer = PeerId(name.clone());
    let mut config = ctx.node_config(&peer);
    let ep = ctx.endpoint(&peer, &name, NODE_PORT);
    let mut extra = AbortOnDrop::default();
    let mut parts = match &role {
        Role::Bootstrap => unreachable!("handled above"),
        Role::Registry => {
            config.registry = Some(ctx.signed_entries(&ctx.key("operator"), false));
            start_node(&ctx, config, ep, physarum_runtime::NoDriver, None).await?
        }
        Role::RogueRegistry => {
            // It stores (and so serves) only what the rogue key signed.
            let rogue = ctx.key("rogue");
            config.trust.operators = Operators::new(vec![rogue.public()]);
            config.registry = Some(ctx.signed_entries(&rogue, true));
            start_node(&ctx, config, ep, physarum_runtime::NoDriver, None).await?
        }
        Role::Allocator(spec) => {
            config.allocator = Some(ctx.allocator_config(spec));
            let key = ctx.key(&name);
            let grant = Grant::sign(peer.clone(), key.public(), &ctx.key("operator"));
            config.trust.issuer = Some(Issuer::allocator(key, grant).map_err(|e| e.to_string())?);
            let driver = SimDriver { ctx: ctx.clone(), host: name.clone(), incarnation, instances: Default::default() };
            start_node(&ctx, config, ep, driver, None).await?
        }
        Role::Service { service } | Role::RogueService { service } => {
            // A statically deployed instance is certified by the operator; an impostor
            // by a key of its own.
            let signer = if matches!(role, Role::Service { .. }) { "operator" } else { "rogue" };
            config.trust.issuer = Some(Issuer::operator(ctx.key(signer)));
            config.serve = Some(service.clone());
            let hung = ctx.app_started(&name, &name);
            extra.0.push(tokio::task::spawn_local(run_app(APP_PORT, name.clone(), hung)));
            start_node(&ctx, config, ep, physarum_runtime::NoDriver, Some(APP_PORT)).await?
        }
        Role::Client => {
            let mut parts = start_node(&ctx, config, ep, physarum_runtime::NoDriver, None).await?;
            parts.running.serve_http(SimListener::bind(HTTP_PORT).await?);
            extra.0.push(tokio::task::spawn_local(workload(ctx.clone(), name.clone())));
            parts
        }
    };
    let reason = (&mut parts.endpoint.fatal).await;
    drop(extra);
    drop(parts);
    if let Ok(reason) = reason {
        tracing::info!(node = %name, "exiting: {reason}");
    } else {
        std::future::pending::<()>().await;
    }
    Ok(())
}

async fn run_app(port: u16, instance: String, hung: Rc<Cell<bool>>) {
    if let Err(e) = app::serve_app(port, instance, hung).await {
        tracing::warn!("application stopped: {e}");
    }
}

/// The client application of `client`: sends its requests at their times (those
/// still to come when the host (re)starts) and records what comes back.
async fn workload(ctx: Rc<Ctx>, client: String) {
    let mine: Vec<(u64, Duration, Duration, String)> = ctx
        .requests
        .borrow()
        .iter()
        .filter(|r| r.client == client)
        .map(|r| (r.seq, r.at, r.deadline, r.service.clone()))
        .collect();
    let now = sim_now();
    for (seq, at, deadline, service) in mine {
        if at < now {
            continue;
        }
        let wait = at.saturating_sub(sim_now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let ctx = ctx.clone();
        let client = client.clone();
        tokio::task::spawn_local(async move {
            ctx.trace.here(&client, Kind::Request { seq, service: service.clone() });
            let sent = tokio::time::Instant::now();
            let path = format!("/{service}/hello?seq={seq}");
            let fate = match app::get(HTTP_PORT, &path, deadline).await {
                Some(ClientResult::Answer { status, served_by, .. }) => {
                    let latency = sent.elapsed();
                    ctx.trace.here(&client, Kind::Response { seq, status, served_by: served_by.clone(), latency });
                    Fate::Answered { status, served_by, latency }
                }
                Some(ClientResult::Error(e)) => {
                    ctx.trace.here(&client, Kind::RequestError { seq, reason: e.clone() });
                    Fate::Error(e)
                }
                None => {
                    ctx.trace.here(&client, Kind::TimedOut { seq });
                    Fate::TimedOut
                }
            };
            if let Some(r) = ctx.requests.borrow_mut().get_mut(seq as usize) {
                r.fate = fate;
            }
        });
    }
    std::future::pending::<()>().await;
}

/// A running service-mode node with its application (an instance or a static one).
struct ServiceNode {
    _parts: NodeParts,
    _app: AbortOnDrop,
}

enum Slot {
    Starting,
    /// Held for its `Drop`: removing the slot stops the instance.
    #[allow(dead_code)]
    Running(Box<ServiceNode>),
}

/// The allocator's instance driver: an instance is a service-mode node plus the
/// application, started inside the allocator's own host after the boot delay (host
/// networking: its own ports on the allocator's address). A crash of the host takes
/// them along.
struct SimDriver {
    ctx: Rc<Ctx>,
    host: String,
    incarnation: u32,
    instances: RefCell<BTreeMap<InstanceId, Slot>>,
}

impl SimDriver {
    fn peer_of(&self, instance: InstanceId) -> String {
        format!("{}~{}.i{}", self.host, self.incarnation, instance.0)
    }
}

impl InstanceDriver for SimDriver {
    async fn start(&self, instance: InstanceId, service: ServiceInfo, exits: ExitSink) -> Result<PeerAddr, String> {
        if instance.0 > MAX_INSTANCE_ID {
            return Err(format!("instance id {} out of the simulated port range", instance.0));
        }
        if self.instances.borrow().contains_key(&instance) {
            return Err(format!("instance {instance} already exists"));
        }
        self.instances.borrow_mut().insert(instance, Slot::Starting);
        let peer = self.peer_of(instance);
        let what = match &service.run {
            RunSpec::Image { image } => image.clone(),
            RunSpec::Exec { program, .. } => program.clone(),
        };
        self.ctx.trace.here(&self.host, Kind::Driver(format!("boot {peer} {} {what}", service.name)));
        let delay = self.ctx.boot_delays.borrow().get(&self.host).copied().unwrap_or_default();
        tokio::time::sleep(delay).await;
        if !matches!(self.instances.borrow().get(&instance), Some(Slot::Starting)) {
            return Err("stopped while starting".into());
        }
        let port = INSTANCE_PORT_BASE + instance.0 as u16;
        let app_port = INSTANCE_APP_PORT_BASE + instance.0 as u16;
        let peer_id = PeerId(peer.clone());
        let mut config = self.ctx.node_config(&peer_id);
        config.serve = Some(service.name.clone());
        let ep = self.ctx.endpoint(&peer_id, &self.host, port);
        let addr = ep.addr();
        let hung = self.ctx.app_started(&peer, &self.host);
        let app = AbortOnDrop(vec![tokio::task::spawn_local(run_app(app_port, peer.clone(), hung))]);
        let mut parts = match start_node(&self.ctx, config, ep, physarum_runtime::NoDriver, Some(app_port)).await {
            Ok(p) => p,
            Err(e) => {
                self.instances.borrow_mut().remove(&instance);
                return Err(format!("cannot start {peer}: {e}"));
            }
        };
        // An instance whose node exits on its own is reported to the allocator.
        let fatal = std::mem::replace(&mut parts.endpoint.fatal, tokio::sync::oneshot::channel().1);
        let watcher = tokio::task::spawn_local(async move {
            if fatal.await.is_ok() {
                exits.exited(instance);
            }
        });
        let mut app = app;
        app.0.push(watcher);
        self.ctx.instance_hosts.borrow_mut().insert(peer.clone(), self.host.clone());
        self.instances.borrow_mut().insert(instance, Slot::Running(Box::new(ServiceNode { _parts: parts, _app: app })));
        self.ctx.trace.here(&self.host, Kind::Driver(format!("up {peer}")));
        Ok(addr)
    }

    async fn stop(&self, instance: InstanceId) {
        let removed = self.instances.borrow_mut().remove(&instance);
        if removed.is_some() {
            self.ctx.trace.here(&self.host, Kind::Driver(format!("stop {}", self.peer_of(instance))));
            self.ctx.apps.borrow_mut().remove(&self.peer_of(instance));
        }
        drop(removed);
    }
}
