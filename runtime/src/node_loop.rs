//! The node loop: owns the core's [`Node`], feeds it inputs with the core's
//! [`Instant`] (derived from `tokio::time::Instant` since the loop started), executes
//! its outputs and sleeps until `poll_timeout()`.
//!
//! Every network operation (find, probe, send, advertise) and every driver call runs
//! in its own task; results come back through channels as inputs. The loop itself
//! never awaits the network, so routing a request to a cached peer never waits
//! behind probes or allocations. Deterministic-friendly: `tokio::time` only, `biased`
//! selects, ordered maps only.

use crate::app_check;
use crate::front;
use crate::limits::Limits;
use crate::transport::{
    AdoptedInstance, Connector, ExitSink, Inbound, InboundRequest, InstanceDriver, Listener, NetEvent, NoApp, NoDriver,
    Observer, Transport,
};
use crate::tunnel::{self, CredentialsCell, TunnelPool};
use physarum_core::config::NodeConfig;
use physarum_core::io::{Input, OpResult, Outcome, Output};
use physarum_core::time::Instant;
use physarum_core::types::{ContentHash, InboundId, InstanceId, OpId, PeerId, ReqId};
use physarum_core::wire::Response;
use physarum_core::Node;
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// The core's `Instant` for a node loop that started at `start` (its `Instant::ZERO`).
pub(crate) fn core_now(start: tokio::time::Instant) -> Instant {
    Instant::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// Knobs of the shared runtime (not of the core).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// How long the core has to answer a client request (its `deadline`).
    pub request_deadline: Duration,
    /// Idle tunnel streams kept per (peer, service).
    pub max_idle_tunnels: usize,
    /// How long opening a tunnel (stream + hello/ack) may take.
    pub tunnel_open_timeout: Duration,
    /// How long a peer may take to send its `TunnelHello` on a stream it opened.
    pub tunnel_hello_timeout: Duration,
    /// Slack added to each operation's timeout before the loop gives up on the
    /// transport itself (the core enforces timeouts too; this only frees the task).
    pub op_slack: Duration,
    /// Client requests one proxy handles at once (deciding and forwarding).
    pub max_concurrent_requests: usize,
    /// Client requests that may wait for a place under `max_concurrent_requests`.
    pub max_queued_requests: usize,
    /// Tunnel streams in use towards one instance at once. With `max_idle_tunnels`
    /// this stays below the muxer's stream limit per connection (512 in net-real).
    pub max_streams_per_instance: usize,
    /// Requests that may wait for a stream to one instance.
    pub max_queued_per_instance: usize,
    /// How long a request waits in a queue before it is answered 503.
    pub queue_wait: Duration,
    /// The `Retry-After` sent with a 503 for overload.
    pub retry_after: Duration,
    /// Service mode: how often the sidecar checks that its application answers ...
    pub app_check_interval: Duration,
    /// ... and how long the application has to answer.
    pub app_check_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            request_deadline: Duration::from_secs(30),
            max_idle_tunnels: 64,
            tunnel_open_timeout: Duration::from_secs(2),
            tunnel_hello_timeout: Duration::from_secs(5),
            op_slack: Duration::from_secs(1),
            max_concurrent_requests: 1024,
            max_queued_requests: 1024,
            max_streams_per_instance: 256,
            max_queued_per_instance: 512,
            queue_wait: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            app_check_interval: Duration::from_secs(1),
            app_check_timeout: Duration::from_secs(1),
        }
    }
}

/// What the front end and the tunnel server ask of the node loop.
pub(crate) enum Command {
    Http { service: String, deadline: Duration, reply: oneshot::Sender<Outcome>, retry: bool },
    Input(Input),
}

/// A cheap, cloneable handle on a running node loop.
#[derive(Clone)]
pub struct NodeHandle {
    cmd: mpsc::UnboundedSender<Command>,
    local: PeerId,
    /// Client requests and tunnelled requests in flight (for draining on shutdown).
    in_flight: Arc<AtomicUsize>,
}

impl NodeHandle {
    /// A handle whose commands a test answers itself (a fake core).
    #[cfg(test)]
    pub(crate) fn for_test(local: PeerId) -> (NodeHandle, mpsc::UnboundedReceiver<Command>) {
        let (cmd, rx) = mpsc::unbounded_channel();
        (NodeHandle { cmd, local, in_flight: Arc::default() }, rx)
    }

    /// This node's peer id.
    pub fn local_peer(&self) -> &PeerId {
        &self.local
    }

    /// Ask the core what to do with a client request for `service` (the first path
    /// segment), to be decided within `deadline`. `None` when the loop has stopped.
    pub async fn request(&self, service: String, deadline: Duration) -> Option<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.cmd.send(Command::Http { service, deadline, reply, retry: false }).ok()?;
        rx.await.ok()
    }

    /// Forwarding a routed request failed: the core evicts the peer.
    pub fn route_failed(&self, service: ContentHash, peer: PeerId, reason: String) {
        self.feed(Input::RouteFailed { service, peer, reason });
    }

    /// Service mode: a tunnelled request begins; it ends when the guard is dropped.
    pub fn serving_request(&self) -> ServingRequest {
        self.feed(Input::TunnelServed);
        ServingRequest { node: self.clone(), _busy: self.busy() }
    }

    /// A request in flight, until the guard is dropped.
    pub fn busy(&self) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.in_flight.clone())
    }

    /// Requests in flight now (client requests in the front end, tunnelled ones served).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Wait until no request is in flight, or `limit` has passed; whether none is.
    pub async fn drained(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.in_flight() == 0
    }

    /// Route a request again after its try failed (the core checks its retry budget).
    pub async fn retry(&self, service: String, deadline: Duration) -> Option<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.cmd.send(Command::Http { service, deadline, reply, retry: true }).ok()?;
        rx.await.ok()
    }

    /// Feed any other input (not `HttpRequest`: use [`NodeHandle::request`]; not
    /// `PeerRequest`/`OpDone`: those belong to the loop).
    pub fn feed(&self, input: Input) {
        let _ = self.cmd.send(Command::Input(input));
    }
}

/// A tunnelled request being served (service mode); dropping it tells the core
/// the request ended.
pub struct ServingRequest {
    node: NodeHandle,
    _busy: Busy,
}

/// Counts one request in flight while it lives.
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ServingRequest {
    fn drop(&mut self) {
        self.node.feed(Input::TunnelDone);
    }
}

/// Builder for one node's runtime. `T` is the network, `D` the instance driver
/// (allocators), `C` the connector to the local application (service mode).
pub struct NodeRuntime<T: Transport, D = NoDriver, C = NoApp> {
    node_config: NodeConfig,
    seed: u64,
    transport: T,
    inbound: Inbound<T::Stream>,
    config: RuntimeConfig,
    driver: D,
    app: C,
    observer: Rc<dyn Observer>,
}

impl<T: Transport> NodeRuntime<T> {
    /// A node driven over `transport`; `inbound` is the receiving half of the
    /// [`crate::transport::inbound_channel`] whose senders the transport holds.
    pub fn new(
        node_config: NodeConfig,
        seed: u64,
        transport: T,
        inbound: Inbound<T::Stream>,
        config: RuntimeConfig,
    ) -> Self {
        NodeRuntime {
            node_config,
            seed,
            transport,
            inbound,
            config,
            driver: NoDriver,
            app: NoApp,
            observer: Rc::new(()),
        }
    }
}

impl<T: Transport, D: InstanceDriver, C: Connector> NodeRuntime<T, D, C> {
    /// Allocator role: start/stop instances with `driver`.
    pub fn with_driver<D2: InstanceDriver>(self, driver: D2) -> NodeRuntime<T, D2, C> {
        NodeRuntime {
            node_config: self.node_config,
            seed: self.seed,
            transport: self.transport,
            inbound: self.inbound,
            config: self.config,
            driver,
            app: self.app,
            observer: self.observer,
        }
    }

    /// Service mode: tunnelled requests go to the application through `app`.
    pub fn with_app<C2: Connector>(self, app: C2) -> NodeRuntime<T, D, C2> {
        NodeRuntime {
            node_config: self.node_config,
            seed: self.seed,
            transport: self.transport,
            inbound: self.inbound,
            config: self.config,
            driver: self.driver,
            app,
            observer: self.observer,
        }
    }

    /// Metrics / trace hooks.
    pub fn with_observer(mut self, observer: impl Observer) -> Self {
        self.observer = Rc::new(observer);
        self
    }

    /// Start the node loop and the tunnel server as `spawn_local` tasks (call inside
    /// a `LocalSet` or a turmoil host). Dropping the returned [`Running`] stops them.
    pub fn spawn(self) -> Running<T> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let local = self.transport.local_peer();
        let handle = NodeHandle { cmd: cmd_tx, local, in_flight: Arc::default() };
        let Inbound { requests, tunnels, events } = self.inbound;
        let serve = self.node_config.serve.clone();
        let start = tokio::time::Instant::now();
        let mut verifier = self.node_config.trust.clone();
        verifier.issuer = None;
        let pool = Rc::new(TunnelPool::new(self.transport.clone(), &self.config, verifier, start));
        let credentials = CredentialsCell::default();
        let mut tasks = Vec::new();
        if serve.is_some() {
            let check = app_check::check_app(
                self.app.clone(),
                handle.clone(),
                self.config.app_check_interval,
                self.config.app_check_timeout,
            );
            tasks.push(tokio::task::spawn_local(check));
        }
        let tunnel_task = tokio::task::spawn_local(tunnel::serve_tunnels(
            tunnels,
            serve,
            self.app,
            handle.clone(),
            credentials.clone(),
            self.config.tunnel_hello_timeout,
        ));
        let node = Node::new(self.node_config, self.seed, Instant::ZERO);
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = ExitSink::channel();
        let state = LoopState {
            node,
            start,
            transport: self.transport,
            driver: Rc::new(self.driver),
            observer: self.observer.clone(),
            config: self.config.clone(),
            credentials,
            ops_tx,
            local_tx,
            exits: exit_tx,
            pending_http: BTreeMap::new(),
            next_req: 0,
            pending_peer: BTreeMap::new(),
            next_inbound: 0,
            tasks: JoinSet::new(),
        };
        let loop_task = tokio::task::spawn_local(state.run(cmd_rx, ops_rx, local_rx, exit_rx, requests, events));
        let limits = Rc::new(Limits::new(&self.config));
        // The loop task stays second: `Running::stopped` waits on it.
        tasks.splice(0..0, [tunnel_task, loop_task]);
        Running { handle, pool, limits, observer: self.observer, config: self.config, tasks }
    }
}

/// A running node. Dropping it aborts every task it started (the loop, the tunnel
/// server, the front ends) — and with the loop, every operation task.
pub struct Running<T: Transport> {
    handle: NodeHandle,
    pool: Rc<TunnelPool<T>>,
    limits: Rc<Limits>,
    observer: Rc<dyn Observer>,
    config: RuntimeConfig,
    tasks: Vec<JoinHandle<()>>,
}

impl<T: Transport> Running<T> {
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Serve the HTTP front end (`METHOD /<service>/<rest>?<query>`) on `listener`,
    /// as a task owned by this `Running`.
    pub fn serve_http<L: Listener>(&mut self, listener: L) {
        let ctx = Rc::new(front::FrontCtx {
            handle: self.handle.clone(),
            pool: self.pool.clone(),
            observer: self.observer.clone(),
            request_deadline: self.config.request_deadline,
            limits: self.limits.clone(),
        });
        self.tasks.push(tokio::task::spawn_local(front::serve(listener, ctx)));
    }

    /// Stop everything now (same as dropping).
    pub fn shutdown(self) {}

    /// Resolves if the node loop ends on its own (it only does when it panics).
    pub fn stopped(&mut self) -> impl Future<Output = ()> + '_ {
        let loop_task = self.tasks.get_mut(1);
        async move {
            if let Some(t) = loop_task {
                let _ = t.await;
            }
        }
    }
}

impl<T: Transport> Drop for Running<T> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct LoopState<T: Transport, D: InstanceDriver> {
    node: Node,
    start: tokio::time::Instant,
    transport: T,
    driver: Rc<D>,
    observer: Rc<dyn Observer>,
    config: RuntimeConfig,
    credentials: CredentialsCell,
    ops_tx: mpsc::UnboundedSender<(OpId, OpResult)>,
    local_tx: mpsc::UnboundedSender<Input>,
    exits: ExitSink,
    pending_http: BTreeMap<ReqId, oneshot::Sender<Outcome>>,
    next_req: u64,
    pending_peer: BTreeMap<InboundId, oneshot::Sender<Response>>,
    next_inbound: u64,
    tasks: JoinSet<()>,
}

impl<T: Transport, D: InstanceDriver> LoopState<T, D> {
    fn now(&self) -> Instant {
        core_now(self.start)
    }

    fn to_tokio(&self, at: Instant) -> tokio::time::Instant {
        self.start + Duration::from_micros(at.as_micros())
    }

    fn feed(&mut self, input: Input) {
        let now = self.now();
        self.observer.input(now, &input);
        self.node.handle_input(now, input);
        self.drain(now);
    }

    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Command>,
        mut ops: mpsc::UnboundedReceiver<(OpId, OpResult)>,
        mut locals: mpsc::UnboundedReceiver<Input>,
        mut exits: mpsc::UnboundedReceiver<InstanceId>,
        mut requests: mpsc::UnboundedReceiver<InboundRequest>,
        mut events: mpsc::UnboundedReceiver<NetEvent>,
    ) {
        let now = self.now();
        self.drain(now);
        // Before any request can start an instance whose number an adopted one holds.
        for adopted in self.driver.adopt(self.exits.clone()).await {
            let AdoptedInstance { instance, service, peer } = adopted;
            self.feed(Input::InstanceAdopted { instance, service, peer });
        }
        loop {
            let wake = self.node.poll_timeout().map(|t| self.to_tokio(t));
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = sleep => self.feed(Input::Tick),
                Some((op, result)) = ops.recv() => self.feed(Input::OpDone { op, result }),
                Some(cmd) = cmds.recv() => match cmd {
                    Command::Http { service, deadline, reply, retry } => {
                        let req = ReqId(self.next_req);
                        self.next_req += 1;
                        self.pending_http.insert(req, reply);
                        let deadline = self.now() + deadline;
                        match retry {
                            false => self.feed(Input::HttpRequest { req, service, deadline }),
                            true => self.feed(Input::HttpRetry { req, service, deadline }),
                        }
                    }
                    Command::Input(input) => self.feed(input),
                },
                Some(input) = locals.recv() => self.feed(input),
                Some(instance) = exits.recv() => self.feed(Input::InstanceExited { instance }),
                Some(InboundRequest { from, request, reply }) = requests.recv() => {
                    let id = InboundId(self.next_inbound);
                    self.next_inbound += 1;
                    self.pending_peer.insert(id, reply);
                    self.feed(Input::PeerRequest { id, from, request });
                }
                Some(event) = events.recv() => match event {
                    NetEvent::BootstrapConnected => self.feed(Input::BootstrapConnected),
                },
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            // Answer slots whose asker is gone (the core answers every request, so this
            // only guards against a bug) are dropped once there are many.
            if self.pending_peer.len() > 1024 {
                self.pending_peer.retain(|_, tx| !tx.is_closed());
            }
            if self.pending_http.len() > 4096 {
                self.pending_http.retain(|_, tx| !tx.is_closed());
            }
        }
    }

    fn drain(&mut self, now: Instant) {
        while let Some(output) = self.node.poll_output() {
            self.observer.output(now, &output);
            self.execute(output, now);
        }
    }

    fn execute(&mut self, output: Output, now: Instant) {
        let slack = self.config.op_slack;
        match output {
            Output::Respond { req, outcome } => {
                if let Some(tx) = self.pending_http.remove(&req) {
                    let _ = tx.send(outcome);
                }
            }
            Output::FindProviders { op, key, timeout } => {
                let t = self.transport.clone();
                self.op(
                    op,
                    timeout + slack,
                    async move { t.find_providers(key, timeout).await.map(OpResult::Providers) },
                );
            }
            Output::Probe { op, peer, timeout } => {
                let t = self.transport.clone();
                self.op(op, timeout + slack, async move { t.probe(peer, timeout).await.map(OpResult::Rtt) });
            }
            Output::SendRequest { op, peer, request, timeout } => {
                let t = self.transport.clone();
                self.op(op, timeout + slack, async move {
                    t.send_request(peer, request, timeout).await.map(OpResult::Response)
                });
            }
            Output::ReplyToPeer { id, response } => {
                if let Some(tx) = self.pending_peer.remove(&id) {
                    let _ = tx.send(response);
                }
            }
            Output::Advertise { key } => {
                let t = self.transport.clone();
                self.tasks.spawn_local(async move {
                    if let Err(e) = t.advertise(key.clone()).await {
                        tracing::debug!(?key, "advertise failed: {e}");
                    }
                });
            }
            Output::StartInstance { instance, service } => {
                let driver = self.driver.clone();
                let done = self.local_tx.clone();
                let exits = self.exits.clone();
                self.tasks.spawn_local(async move {
                    let input = match driver.start(instance, service, exits).await {
                        Ok(peer) => Input::InstanceStarted { instance, peer },
                        Err(reason) => Input::InstanceFailed { instance, reason },
                    };
                    let _ = done.send(input);
                });
            }
            Output::StopInstance { instance } => {
                let driver = self.driver.clone();
                self.tasks.spawn_local(async move { driver.stop(instance).await });
            }
            Output::PersistRegistry { entries } => self.observer.persist_registry(entries),
            Output::ServeCredentials { credentials } => *self.credentials.borrow_mut() = Some(credentials),
            Output::Event(event) => self.observer.event(now, &event),
        }
    }

    fn op(&mut self, op: OpId, limit: Duration, fut: impl Future<Output = Result<OpResult, String>> + 'static) {
        let done = self.ops_tx.clone();
        self.tasks.spawn_local(async move {
            let result = match tokio::time::timeout(limit, fut).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => OpResult::Failed(e),
                Err(_) => OpResult::Failed("timed out".into()),
            };
            let _ = done.send((op, result));
        });
    }
}
