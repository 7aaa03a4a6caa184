//! The node loop: owns the core's [`Node`], feeds it inputs with the core's
//! [`Instant`] (derived from `tokio::time::Instant` since the loop started), executes
//! its outputs and sleeps until `poll_timeout()`.
//!
//! Every network operation (find, probe, send, advertise) and every driver call runs
//! in its own task; results come back through channels as inputs. The loop itself
//! never awaits the network, so routing a request to a cached peer never waits
//! behind probes or allocations. Deterministic-friendly: `tokio::time` only, `biased`
//! selects, ordered maps only.
//!
//! The front end and the tunnel server run on the loop's thread, so their inputs
//! go into the core directly (a [`NodeHandle`] borrows the loop's state for the
//! call): a request routed to a cached peer is decided on the caller's task with no
//! hand-off, and the loop is woken only when the core's next deadline moved earlier.
//! The loop owns one timer, reset to the core's `poll_timeout()`.

use crate::app_check;
use crate::front;
use crate::l4::{L4Config, L4Ctx};
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
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
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
    /// L4 mappings and chains (`GET /tcp/…`, `GET /udp/…`).
    pub l4: L4Config,
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
            l4: L4Config::default(),
        }
    }
}

/// What the front end and the tunnel server ask of the node loop, when they cannot
/// feed it directly (a fake core in tests; a call made while the loop's state is
/// in use).
pub(crate) enum Command {
    Http { service: String, deadline: Duration, reply: oneshot::Sender<Outcome>, retry: bool },
    Input(Input),
}

/// The core behind a [`NodeHandle`]: a running loop, or (tests) whoever reads the
/// commands.
trait CoreLink {
    fn http(&self, service: String, deadline: Duration, retry: bool) -> Option<oneshot::Receiver<Outcome>>;
    fn feed(&self, input: Input);
    /// The hard RTT limit of `service`, when the core knows one.
    fn hard_limit(&self, _service: &str) -> Option<Duration> {
        None
    }
}

/// Commands to a fake core (tests).
#[cfg(test)]
struct CommandLink(mpsc::UnboundedSender<Command>);

#[cfg(test)]
impl CoreLink for CommandLink {
    fn http(&self, service: String, deadline: Duration, retry: bool) -> Option<oneshot::Receiver<Outcome>> {
        let (reply, rx) = oneshot::channel();
        self.0.send(Command::Http { service, deadline, reply, retry }).ok()?;
        Some(rx)
    }
    fn feed(&self, input: Input) {
        let _ = self.0.send(Command::Input(input));
    }
}

/// A cheap, cloneable handle on a running node loop (on the loop's thread).
#[derive(Clone)]
pub struct NodeHandle {
    core: Rc<dyn CoreLink>,
    local: PeerId,
    /// Client requests and tunnelled requests in flight (for draining on shutdown).
    in_flight: Arc<AtomicUsize>,
}

impl NodeHandle {
    /// A handle whose commands a test answers itself (a fake core).
    #[cfg(test)]
    pub(crate) fn for_test(local: PeerId) -> (NodeHandle, mpsc::UnboundedReceiver<Command>) {
        let (cmd, rx) = mpsc::unbounded_channel();
        (NodeHandle { core: Rc::new(CommandLink(cmd)), local, in_flight: Arc::default() }, rx)
    }

    /// This node's peer id.
    pub fn local_peer(&self) -> &PeerId {
        &self.local
    }

    /// Ask the core what to do with a client request for `service` (the first path
    /// segment), to be decided within `deadline`. `None` when the loop has stopped.
    pub async fn request(&self, service: String, deadline: Duration) -> Option<Outcome> {
        // A cached route is already answered here: the receiver is ready at once.
        self.core.http(service, deadline, false)?.await.ok()
    }

    /// Forwarding a routed request failed: the core evicts the peer.
    pub fn route_failed(&self, service: ContentHash, peer: PeerId, reason: String) {
        self.feed(Input::RouteFailed { service, peer, reason });
    }

    /// An instance of `service` failed the trust check before anything was sent to
    /// it: say so, and have the core ban it.
    pub fn untrusted(&self, service: &str, hash: ContentHash, peer: &PeerId, reason: &str) {
        tracing::warn!(%service, %peer, %reason, "instance failed the trust check; not routing to it");
        self.feed(Input::Untrusted { service: hash, peer: peer.clone(), reason: reason.to_string() });
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

    /// The hard RTT limit clients hold `service`'s instances to (its registry entry's,
    /// else the configured default), when known.
    pub fn hard_limit(&self, service: &str) -> Option<Duration> {
        self.core.hard_limit(service)
    }

    /// Route a request again after its try failed (the core checks its retry budget).
    pub async fn retry(&self, service: String, deadline: Duration) -> Option<Outcome> {
        self.core.http(service, deadline, true)?.await.ok()
    }

    /// Feed any other input (not `HttpRequest`: use [`NodeHandle::request`]; not
    /// `PeerRequest`/`OpDone`: those belong to the loop).
    pub fn feed(&self, input: Input) {
        self.core.feed(input);
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
        let Inbound { requests, tunnels, events } = self.inbound;
        let serve = self.node_config.serve.clone();
        let start = tokio::time::Instant::now();
        let mut verifier = self.node_config.trust.clone();
        verifier.issuer = None;
        let pool = Rc::new(TunnelPool::new(self.transport.clone(), &self.config, verifier, start));
        let credentials = CredentialsCell::default();
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
            credentials: credentials.clone(),
            ops_tx,
            local_tx,
            exits: exit_tx,
            pending_http: BTreeMap::new(),
            next_req: 0,
            pending_peer: BTreeMap::new(),
            next_inbound: 0,
            tasks: JoinSet::new(),
        };
        let shared = Rc::new(LoopShared {
            state: RefCell::new(state),
            deferred: cmd_tx,
            armed: Cell::new(None),
            wake: Notify::new(),
        });
        let handle = NodeHandle { core: shared.clone(), local, in_flight: Arc::default() };
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
        let limits = Rc::new(Limits::new(&self.config));
        let l4 = Rc::new(L4Ctx::new(
            handle.clone(),
            pool.clone(),
            limits.clone(),
            self.config.l4.clone(),
            serve.map(Rc::from),
        ));
        let tunnel_task = tokio::task::spawn_local(tunnel::serve_tunnels(
            tunnels,
            l4.clone(),
            self.app,
            credentials,
            self.config.tunnel_hello_timeout,
        ));
        let loop_task = tokio::task::spawn_local(run_loop(shared, cmd_rx, ops_rx, local_rx, exit_rx, requests, events));
        // The loop task stays second: `Running::stopped` waits on it.
        tasks.splice(0..0, [tunnel_task, loop_task]);
        Running { handle, pool, limits, l4, observer: self.observer, config: self.config, tasks }
    }
}

/// A running node. Dropping it aborts every task it started (the loop, the tunnel
/// server, the front ends) — and with the loop, every operation task.
pub struct Running<T: Transport> {
    handle: NodeHandle,
    pool: Rc<TunnelPool<T>>,
    limits: Rc<Limits>,
    l4: Rc<L4Ctx<T>>,
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
            l4: self.l4.clone(),
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
        self.l4.close_all();
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

    /// A client request (or its retry) for `service`: the core answers on `reply`.
    fn http(&mut self, service: String, deadline: Duration, reply: oneshot::Sender<Outcome>, retry: bool) {
        let req = ReqId(self.next_req);
        self.next_req += 1;
        self.pending_http.insert(req, reply);
        let deadline = self.now() + deadline;
        match retry {
            false => self.feed(Input::HttpRequest { req, service, deadline }),
            true => self.feed(Input::HttpRetry { req, service, deadline }),
        }
        // Answer slots whose asker is gone (the core answers every request, so this
        // only guards against a bug) are dropped once there are many.
        if self.pending_http.len() > 4096 {
            self.pending_http.retain(|_, tx| !tx.is_closed());
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Http { service, deadline, reply, retry } => self.http(service, deadline, reply, retry),
            Command::Input(input) => self.feed(input),
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

/// The loop's state, shared with the [`NodeHandle`]s on its thread so that they
/// feed the core directly.
struct LoopShared<T: Transport, D: InstanceDriver> {
    state: RefCell<LoopState<T, D>>,
    /// Commands that could not be fed directly (the state was borrowed: a guard
    /// dropped while the loop executes an output); the loop feeds them.
    deferred: mpsc::UnboundedSender<Command>,
    /// The deadline the loop's timer is set to.
    armed: Cell<Option<Instant>>,
    /// Wakes the loop when a direct input moved the core's next deadline earlier.
    wake: Notify,
}

impl<T: Transport, D: InstanceDriver> LoopShared<T, D> {
    /// After a direct input: wake the loop if its timer is now too late.
    fn rearm(&self) {
        let next = self.state.borrow().node.poll_timeout();
        if next.is_some_and(|n| self.armed.get().is_none_or(|a| n < a)) {
            self.wake.notify_one();
        }
    }
}

impl<T: Transport, D: InstanceDriver> CoreLink for LoopShared<T, D> {
    fn http(&self, service: String, deadline: Duration, retry: bool) -> Option<oneshot::Receiver<Outcome>> {
        let (reply, rx) = oneshot::channel();
        match self.state.try_borrow_mut() {
            Ok(mut state) => {
                state.http(service, deadline, reply, retry);
                drop(state);
                self.rearm();
            }
            Err(_) => self.deferred.send(Command::Http { service, deadline, reply, retry }).ok()?,
        }
        Some(rx)
    }

    fn hard_limit(&self, service: &str) -> Option<Duration> {
        self.state.try_borrow().ok()?.node.hard_limit(service)
    }

    fn feed(&self, input: Input) {
        match self.state.try_borrow_mut() {
            Ok(mut state) => {
                state.feed(input);
                drop(state);
                self.rearm();
            }
            Err(_) => {
                let _ = self.deferred.send(Command::Input(input));
            }
        }
    }
}

/// The loop: the core's timer, operation results, deferred commands, peer requests
/// and network events. Each is fed to the core with the state borrowed only for
/// that call.
async fn run_loop<T: Transport, D: InstanceDriver>(
    shared: Rc<LoopShared<T, D>>,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    mut ops: mpsc::UnboundedReceiver<(OpId, OpResult)>,
    mut locals: mpsc::UnboundedReceiver<Input>,
    mut exits: mpsc::UnboundedReceiver<InstanceId>,
    mut requests: mpsc::UnboundedReceiver<InboundRequest>,
    mut events: mpsc::UnboundedReceiver<NetEvent>,
) {
    let (driver, exits_sink) = {
        let mut state = shared.state.borrow_mut();
        let now = state.now();
        state.drain(now);
        (state.driver.clone(), state.exits.clone())
    };
    // Before any request can start an instance whose number an adopted one holds
    // (allocators' requests come through this loop, which is not polling them yet).
    for adopted in driver.adopt(exits_sink).await {
        let AdoptedInstance { instance, service, peer } = adopted;
        shared.state.borrow_mut().feed(Input::InstanceAdopted { instance, service, peer });
    }
    // One timer for the whole loop, moved to each new deadline.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let wake = {
            let state = shared.state.borrow();
            state.node.poll_timeout().map(|t| (t, state.to_tokio(t)))
        };
        shared.armed.set(wake.map(|(t, _)| t));
        if let Some((_, at)) = wake {
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
        }
        let reap = std::future::poll_fn(|cx| match shared.state.borrow_mut().tasks.poll_join_next(cx) {
            std::task::Poll::Ready(Some(_)) => std::task::Poll::Ready(()),
            _ => std::task::Poll::Pending,
        });
        tokio::select! {
            biased;
            _ = &mut timer, if wake.is_some() => shared.state.borrow_mut().feed(Input::Tick),
            _ = shared.wake.notified() => {}
            Some((op, result)) = ops.recv() => shared.state.borrow_mut().feed(Input::OpDone { op, result }),
            Some(cmd) = cmds.recv() => shared.state.borrow_mut().command(cmd),
            Some(input) = locals.recv() => shared.state.borrow_mut().feed(input),
            Some(instance) = exits.recv() => shared.state.borrow_mut().feed(Input::InstanceExited { instance }),
            Some(InboundRequest { from, request, reply }) = requests.recv() => {
                let mut state = shared.state.borrow_mut();
                let id = InboundId(state.next_inbound);
                state.next_inbound += 1;
                state.pending_peer.insert(id, reply);
                state.feed(Input::PeerRequest { id, from, request });
                // Answer slots whose asker is gone are dropped once there are many.
                if state.pending_peer.len() > 1024 {
                    state.pending_peer.retain(|_, tx| !tx.is_closed());
                }
            }
            Some(event) = events.recv() => match event {
                NetEvent::BootstrapConnected => shared.state.borrow_mut().feed(Input::BootstrapConnected),
            },
            _ = reap => {}
        }
    }
}
