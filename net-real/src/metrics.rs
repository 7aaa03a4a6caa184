//! Prometheus metrics: one registry per daemon, fed from the core's outputs and
//! events and from the runtime's front end, served as text on `/metrics`.
//!
//! Everything a daemon counts lives in [`Metrics`]; it is shared as an
//! `Arc<Metrics>` between the node loop (which calls [`Metrics::observe_output`] for
//! every output of the core), the HTTP front end ([`Metrics::request_completed`]),
//! the transport ([`Metrics::set_connected_peers`]) and the HTTP endpoint
//! ([`serve`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use physarum_core::io::{Event, Input, Outcome, Output};
use physarum_core::time::Instant as CoreInstant;
use physarum_core::types::InstanceId;
use physarum_runtime::transport::Observer;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP status the client got.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `route` or `fail`, with the status for failures.
    pub decision: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DiscoveryResult {
    Found,
    Allocated,
    Failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryLabels {
    pub result: DiscoveryResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ProbeResult {
    Answered,
    Lost,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub result: ProbeResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TunnelPath {
    /// A connection of its own to the peer's data plane.
    Direct,
    /// A stream inside the P2P connection (the peer has no reachable data plane).
    Swarm,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelPathLabels {
    pub path: TunnelPath,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn rtt_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// Every metric a physarum daemon exports.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// Client requests answered by the front end, by outcome and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from a client request's arrival to its response head.
    pub request_latency: HistogramFamily<RequestLabels>,
    /// The core's decisions on client requests.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Find-or-allocate rounds, by result, and how long they took.
    pub discovery: HistogramFamily<DiscoveryLabels>,
    /// Requests routed from the peer cache without discovery.
    pub cache_hits: Family<ServiceLabels, Counter>,
    /// Instances allocators started for this node.
    pub allocations: Family<ServiceLabels, Counter>,
    pub allocations_refused: Family<ServiceLabels, Counter>,
    pub evictions: Counter,
    pub retries: Family<ServiceLabels, Counter>,
    pub retries_refused: Family<ServiceLabels, Counter>,
    pub untrusted: Counter,
    pub switches: Counter,
    /// RTT probes by result, and the RTTs measured.
    pub probes: Family<ProbeLabels, Counter>,
    pub probe_rtt: Histogram,
    /// Peers with an open connection.
    pub connected_peers: Gauge,
    /// Tunnel streams this node opened, by the path they took.
    pub tunnels_opened: Family<TunnelPathLabels, Counter>,
    /// Allocator: instances started, up, culled and gone; running now; start latency.
    pub instances_starting: Family<ServiceLabels, Counter>,
    pub instances_up: Family<ServiceLabels, Counter>,
    pub culls: Family<ServiceLabels, Counter>,
    pub instances_gone: Family<ServiceLabels, Counter>,
    pub instances_running: Gauge,
    pub instance_start_latency: Histogram,
    /// Service mode: tunnelled requests served, and whole seconds since the last one.
    pub tunnel_served: Counter,
    pub idle_seconds: Gauge,
    last_served: Mutex<Instant>,
    /// Registry: services held; 1 while cut off from its store's quorum (reads may
    /// be stale, writes are refused); reads answered while stale.
    pub registry_entries: Gauge,
    pub registry_stale: Gauge,
    pub registry_stale_reads: Counter,
    /// Bootstrap: the last RTT measured to each connected peer (seconds).
    pub peer_rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    starting: Mutex<HashMap<InstanceId, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("physarum");
        let m = Metrics {
            registry: Registry::default(),
            started: Instant::now(),
            requests: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram),
            decisions: Family::default(),
            discovery: Family::new_with_constructor(latency_histogram),
            cache_hits: Family::default(),
            allocations: Family::default(),
            allocations_refused: Family::default(),
            evictions: Counter::default(),
            retries: Family::default(),
            retries_refused: Family::default(),
            untrusted: Counter::default(),
            switches: Counter::default(),
            probes: Family::default(),
            probe_rtt: rtt_histogram(),
            connected_peers: Gauge::default(),
            tunnels_opened: Family::default(),
            instances_starting: Family::default(),
            instances_up: Family::default(),
            culls: Family::default(),
            instances_gone: Family::default(),
            instances_running: Gauge::default(),
            instance_start_latency: latency_histogram(),
            tunnel_served: Counter::default(),
            idle_seconds: Gauge::default(),
            last_served: Mutex::new(Instant::now()),
            registry_entries: Gauge::default(),
            registry_stale: Gauge::default(),
            registry_stale_reads: Counter::default(),
            peer_rtt: Family::default(),
            starting: Mutex::new(HashMap::new()),
        };
        let r = &mut registry;
        r.register("requests", "Client requests answered, by HTTP status", m.requests.clone());
        r.register_with_unit(
            "request_latency",
            "Time from a client request to its response head",
            Unit::Seconds,
            m.request_latency.clone(),
        );
        r.register(
            "decisions",
            "The core's decisions on client requests (route, or fail with a status)",
            m.decisions.clone(),
        );
        r.register_with_unit(
            "discovery",
            "Find-or-allocate rounds by result (found, allocated, failed) and their duration",
            Unit::Seconds,
            m.discovery.clone(),
        );
        r.register("cache_hits", "Requests routed from the peer cache", m.cache_hits.clone());
        r.register("allocations", "Instances allocators started for this node", m.allocations.clone());
        r.register("allocations_refused", "Start requests allocators refused", m.allocations_refused.clone());
        r.register("evictions", "Peers dropped from the peer cache", m.evictions.clone());
        r.register("retries", "Requests routed again after a failed try", m.retries.clone());
        r.register("retries_refused", "Retries the retry budget refused", m.retries_refused.clone());
        r.register(
            "untrusted_instances",
            "Instances refused because they showed no valid credentials",
            m.untrusted.clone(),
        );
        r.register("switches", "Soft-violating instances replaced by better ones", m.switches.clone());
        r.register("probes", "RTT probes by result", m.probes.clone());
        r.register_with_unit("probe_rtt", "RTTs measured by probes", Unit::Seconds, m.probe_rtt.clone());
        r.register("connected_peers", "Peers with an open connection", m.connected_peers.clone());
        r.register("tunnels_opened", "Tunnel streams this node opened, by path", m.tunnels_opened.clone());
        r.register("instances_starting", "Instances this allocator began to start", m.instances_starting.clone());
        r.register("instances_up", "Instances this allocator started successfully", m.instances_up.clone());
        r.register("culls", "Instances stopped for idleness or a failed idle query", m.culls.clone());
        r.register("instances_gone", "Instances that exited or failed to start", m.instances_gone.clone());
        r.register("instances_running", "Instances this allocator runs now", m.instances_running.clone());
        r.register_with_unit(
            "instance_start_latency",
            "Time from starting an instance to it being reachable",
            Unit::Seconds,
            m.instance_start_latency.clone(),
        );
        r.register("tunnel_served", "Tunnelled requests this service proxy served", m.tunnel_served.clone());
        r.register(
            "idle_seconds",
            "Whole seconds since this service proxy last served a request",
            m.idle_seconds.clone(),
        );
        r.register("registry_entries", "Services this registry holds", m.registry_entries.clone());
        r.register(
            "registry_stale",
            "1 while this registry cannot reach its store's quorum: reads may be stale, writes are refused",
            m.registry_stale.clone(),
        );
        r.register(
            "registry_stale_reads",
            "Registry reads answered while cut off from the store's quorum",
            m.registry_stale_reads.clone(),
        );
        r.register_with_unit("peer_rtt", "Last RTT measured to each connected peer", Unit::Seconds, m.peer_rtt.clone());
        Metrics { registry, ..m }
    }

    /// Count whatever `output` of the core says (call it for every output).
    pub fn observe_output(&self, output: &Output) {
        match output {
            Output::Respond { outcome, .. } => {
                let labels = match outcome {
                    Outcome::Route { .. } => DecisionLabels { decision: "route".into(), status: 0 },
                    Outcome::Fail { status, .. } => DecisionLabels { decision: "fail".into(), status: *status },
                };
                self.decisions.get_or_create(&labels).inc();
            }
            Output::Event(event) => self.observe_event(event),
            _ => {}
        }
    }

    /// Count one of the core's events.
    pub fn observe_event(&self, event: &Event) {
        let svc = |s: &str| ServiceLabels { service: s.to_string() };
        match event {
            Event::CacheHit { service, .. } => {
                self.cache_hits.get_or_create(&svc(service)).inc();
            }
            Event::DiscoveryFinished { took, allocated, found, .. } => {
                let result = match (found, allocated) {
                    (_, true) => DiscoveryResult::Allocated,
                    (true, false) => DiscoveryResult::Found,
                    (false, false) => DiscoveryResult::Failed,
                };
                self.discovery.get_or_create(&DiscoveryLabels { result }).observe(took.as_secs_f64());
            }
            Event::Allocated { service, .. } => {
                self.allocations.get_or_create(&svc(service)).inc();
            }
            Event::AllocationRefused { service, .. } => {
                self.allocations_refused.get_or_create(&svc(service)).inc();
            }
            Event::Evicted { .. } => {
                self.evictions.inc();
            }
            Event::Retried { service } => {
                self.retries.get_or_create(&svc(service)).inc();
            }
            Event::RetryRefused { service } => {
                self.retries_refused.get_or_create(&svc(service)).inc();
            }
            Event::Untrusted { .. } => {
                self.untrusted.inc();
            }
            Event::SeekBetter { .. } | Event::AppHealth { .. } | Event::Selected { .. } => {}
            Event::Switched { .. } => {
                self.switches.inc();
            }
            Event::Probed { rtt, .. } => {
                let result = if rtt.is_some() { ProbeResult::Answered } else { ProbeResult::Lost };
                self.probes.get_or_create(&ProbeLabels { result }).inc();
                if let Some(rtt) = rtt {
                    self.probe_rtt.observe(rtt.as_secs_f64());
                }
            }
            Event::InstanceStarting { instance, service } => {
                self.instances_starting.get_or_create(&svc(service)).inc();
                self.lock_starting().insert(*instance, Instant::now());
            }
            Event::InstanceUp { instance, service, .. } => {
                self.instances_up.get_or_create(&svc(service)).inc();
                self.instances_running.inc();
                if let Some(t0) = self.lock_starting().remove(instance) {
                    self.instance_start_latency.observe(t0.elapsed().as_secs_f64());
                }
            }
            Event::InstanceCulled { instance, service, .. } => {
                self.culls.get_or_create(&svc(service)).inc();
                self.instance_ended(instance);
            }
            Event::InstanceGone { instance, service, .. } => {
                self.instances_gone.get_or_create(&svc(service)).inc();
                self.instance_ended(instance);
            }
        }
    }

    fn instance_ended(&self, instance: &InstanceId) {
        // An instance that never came up was not counted as running.
        if self.lock_starting().remove(instance).is_none() && self.instances_running.get() > 0 {
            self.instances_running.dec();
        }
    }

    fn lock_starting(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Instant>> {
        self.starting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The front end answered a client request with `status` after `took`.
    pub fn request_completed(&self, status: u16, took: Duration) {
        let labels = RequestLabels { status };
        self.requests.get_or_create(&labels).inc();
        self.request_latency.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// Service mode: a tunnelled request was served now.
    pub fn tunnel_served(&self) {
        self.tunnel_served.inc();
        *self.last_served.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    pub fn set_registry_entries(&self, n: usize) {
        self.registry_entries.set(n as i64);
    }

    pub fn set_registry_stale(&self, stale: bool) {
        self.registry_stale.set(stale as i64);
    }

    pub fn set_connected_peers(&self, n: usize) {
        self.connected_peers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Bring the tunnel counters up to the transport's totals (`P2p::tunnels_opened`).
    pub fn set_tunnels_opened(&self, direct: u64, swarm: u64) {
        for (path, total) in [(TunnelPath::Direct, direct), (TunnelPath::Swarm, swarm)] {
            let counter = self.tunnels_opened.get_or_create(&TunnelPathLabels { path });
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }

    /// Bootstrap: record the RTT to `peer` (`None`: the peer went away).
    pub fn set_peer_rtt(&self, peer: &str, rtt: Option<Duration>) {
        let labels = PeerLabels { peer: peer.to_string() };
        match rtt {
            Some(rtt) => {
                self.peer_rtt.get_or_create(&labels).set(rtt.as_secs_f64());
            }
            None => {
                self.peer_rtt.remove(&labels);
            }
        }
    }

    /// Seconds since this process started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let idle = self.last_served.lock().unwrap_or_else(|e| e.into_inner()).elapsed().as_secs();
        self.idle_seconds.set(i64::try_from(idle).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The runtime's observer hook feeding a [`Metrics`]: outputs (client decisions),
/// events, served tunnel requests and finished client requests.
#[derive(Clone, Debug)]
pub struct MetricsObserver(pub Arc<Metrics>);

impl Observer for MetricsObserver {
    fn input(&self, _now: CoreInstant, input: &Input) {
        match input {
            Input::TunnelServed => self.0.tunnel_served(),
            // Idle time counts from the end of the last request.
            Input::TunnelDone => *self.0.last_served.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now(),
            _ => {}
        }
    }
    fn output(&self, _now: CoreInstant, output: &Output) {
        // Events arrive through `event` too: count them there only.
        if !matches!(output, Output::Event(_)) {
            self.0.observe_output(output);
        }
    }
    fn event(&self, _now: CoreInstant, event: &Event) {
        self.0.observe_event(event);
        crate::event_log::log_event(event);
    }
    fn request_finished(&self, _service: &str, status: u16, took: Duration) {
        self.0.request_completed(status, took);
    }
}

/// Parse a metrics listen address the way the original's flags read: `:9101`
/// (all interfaces), `9101`, `127.0.0.1:9101` or `[::1]:9101`.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("invalid metrics address {s:?}: bad port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    s.parse().map_err(|_| format!("invalid metrics address {s:?}: expected :PORT, PORT or IP:PORT"))
}

/// The running metrics endpoint.
pub struct MetricsServer {
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Stop serving.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` now (so a taken port is reported at start-up) and serve
/// `GET /metrics` from `metrics` until the returned server is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!("metrics endpoint: connection error: {e}");
                }
            });
        }
    });
    Ok(MetricsServer { local_addr, task })
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
        resp
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let mut resp = Response::new(Full::new(Bytes::from(metrics.encode())));
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// Whether a metrics endpoint at `addr` answers `GET /metrics` with 200 within
/// `timeout`: how the driver and `physarum dev` tell that a daemon is up.
pub async fn endpoint_answers(addr: SocketAddr, timeout: std::time::Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::types::{ContentHash, PeerAddr, PeerId, ReqId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    }

    #[test]
    fn events_feed_the_counters() {
        let m = Metrics::new();
        m.observe_event(&Event::CacheHit { service: "hello".into(), instance: PeerId("p".into()) });
        m.observe_event(&Event::CacheHit { service: "hello".into(), instance: PeerId("p".into()) });
        m.observe_event(&Event::DiscoveryFinished {
            service: "hello".into(),
            took: Duration::from_millis(300),
            allocated: true,
            found: true,
        });
        m.observe_event(&Event::Probed { peer: PeerId("p".into()), rtt: Some(Duration::from_micros(200)) });
        m.observe_event(&Event::Probed { peer: PeerId("p".into()), rtt: None });
        m.observe_event(&Event::InstanceStarting { instance: InstanceId(1), service: "hello".into() });
        m.observe_event(&Event::InstanceUp {
            instance: InstanceId(1),
            service: "hello".into(),
            peer: PeerId("i".into()),
        });
        m.observe_event(&Event::InstanceStarting { instance: InstanceId(2), service: "hello".into() });
        m.observe_event(&Event::InstanceGone { instance: InstanceId(2), service: "hello".into(), reason: "x".into() });
        assert_eq!(m.instances_running.get(), 1);
        m.observe_event(&Event::InstanceCulled {
            instance: InstanceId(1),
            service: "hello".into(),
            reason: "idle".into(),
        });
        assert_eq!(m.instances_running.get(), 0);
        m.observe_output(&Output::Respond {
            req: ReqId(1),
            outcome: Outcome::Route {
                instance: PeerAddr::new("i", vec![]),
                service: ContentHash("h".into()),
                try_timeout: Duration::from_secs(10),
            },
        });
        m.observe_output(&Output::Respond {
            req: ReqId(2),
            outcome: Outcome::Fail { status: 404, reason: "unknown service".into() },
        });
        m.request_completed(200, Duration::from_millis(2));
        m.request_completed(404, Duration::from_millis(1));
        m.set_connected_peers(3);
        m.set_peer_rtt("QmPeer", Some(Duration::from_millis(5)));
        m.set_tunnels_opened(4, 1);
        m.set_tunnels_opened(7, 1);

        let text = m.encode();
        assert_eq!(line_value(&text, "physarum_cache_hits_total{service=\"hello\"}"), Some(2.0), "{text}");
        assert_eq!(line_value(&text, "physarum_discovery_seconds_count{result=\"Allocated\"}"), Some(1.0), "{text}");
        assert_eq!(line_value(&text, "physarum_probes_total{result=\"Answered\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_probes_total{result=\"Lost\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_culls_total{service=\"hello\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_instances_gone_total{service=\"hello\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_instance_start_latency_seconds_count"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_decisions_total{decision=\"fail\",status=\"404\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_requests_total{status=\"200\"}"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_tunnels_opened_total{path=\"Direct\"}"), Some(7.0), "{text}");
        assert_eq!(line_value(&text, "physarum_tunnels_opened_total{path=\"Swarm\"}"), Some(1.0), "{text}");
        assert_eq!(line_value(&text, "physarum_connected_peers"), Some(3.0));
        assert_eq!(line_value(&text, "physarum_peer_rtt_seconds{peer=\"QmPeer\"}"), Some(0.005));
        assert!(text.ends_with("# EOF\n"));
        m.set_peer_rtt("QmPeer", None);
        assert!(!m.encode().contains("QmPeer"));
    }

    #[test]
    fn the_observer_counts_events_once() {
        let m = Arc::new(Metrics::new());
        let o = MetricsObserver(m.clone());
        let e = Event::Allocated { service: "s".into(), allocator: PeerId("a".into()), instance: PeerId("i".into()) };
        o.output(CoreInstant::ZERO, &Output::Event(e.clone()));
        o.event(CoreInstant::ZERO, &e);
        o.input(CoreInstant::ZERO, &Input::TunnelServed);
        o.request_finished("s", 502, Duration::from_millis(3));
        let text = m.encode();
        assert_eq!(line_value(&text, "physarum_allocations_total{service=\"s\"}"), Some(1.0), "{text}");
        assert_eq!(line_value(&text, "physarum_tunnel_served_total"), Some(1.0));
        assert_eq!(line_value(&text, "physarum_requests_total{status=\"502\"}"), Some(1.0));
    }

    #[test]
    fn listen_addresses_parse_like_the_original_flags() {
        assert_eq!(parse_listen_addr(":9101").unwrap(), "0.0.0.0:9101".parse().unwrap());
        assert_eq!(parse_listen_addr("9101").unwrap(), "0.0.0.0:9101".parse().unwrap());
        assert_eq!(parse_listen_addr("127.0.0.1:0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_listen_addr(":99999").is_err());
        assert!(parse_listen_addr("localhost").is_err());
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_registry() {
        let m = Arc::new(Metrics::new());
        m.tunnel_served();
        let server = serve("127.0.0.1:0".parse().unwrap(), m.clone()).await.unwrap();
        let resp = get(server.local_addr, "/metrics").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("application/openmetrics-text"));
        assert!(resp.contains("physarum_tunnel_served_total 1"), "{resp}");
        assert!(resp.contains("physarum_idle_seconds 0"), "{resp}");
        let resp = get(server.local_addr, "/nope").await;
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        // A taken port is an error at bind time.
        assert!(serve(server.local_addr, m).await.is_err());
    }
}
