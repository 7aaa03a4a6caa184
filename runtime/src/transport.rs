//! What a network (libp2p in production, turmoil in the simulation) must provide to
//! the shared runtime, and the other pluggable edges of a node: the local application
//! (service mode), the instance driver (allocator), the HTTP listener and the observer.
//!
//! Everything here is single-threaded friendly: nothing needs `Send`, every future is
//! polled on the task that calls it or in a `tokio::task::spawn_local` task, so it all
//! runs inside a turmoil host (current_thread + LocalSet) and on a tokio
//! current_thread runtime + `LocalSet` in production. The traits use `async fn`
//! (callers are generic, never `dyn`). Errors are plain strings: they end up as
//! reasons in the core (`OpResult::Failed`) or in a 502 body.
//!
//! STABLE: the simulation codes against this file. Changes are additive only.

use physarum_core::io::{Event, Input, Output};
use physarum_core::time::Instant;
use physarum_core::trust::SignedEntry;
use physarum_core::types::{DhtKey, InstanceId, PeerAddr, PeerId, ServiceInfo};
use physarum_core::wire::{Request, Response};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// A tokio byte stream: a tunnel stream, an accepted HTTP connection, a connection to
/// the local application.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + 'static> ByteStream for S {}

/// Outbound half of a network. Cheap to clone (a handle); every call is independent,
/// so the runtime runs many at once, each in its own task.
#[allow(async_fn_in_trait)]
pub trait Transport: Clone + 'static {
    /// The byte stream a tunnel runs over (libp2p stream + compat; turmoil TCP).
    type Stream: ByteStream;

    /// This node's own peer id as the core names it.
    fn local_peer(&self) -> PeerId;

    /// Providers of `key` in the DHT (possibly none), within `timeout`; stop early when enough.
    async fn find_providers(&self, key: DhtKey, timeout: Duration) -> Result<Vec<PeerAddr>, String>;

    /// Announce that this node provides `key` (the core repeats this periodically).
    async fn advertise(&self, key: DhtKey) -> Result<(), String>;

    /// One round-trip time measurement to `peer`, dialling its addresses if need be.
    async fn probe(&self, peer: PeerAddr, timeout: Duration) -> Result<Duration, String>;

    /// Send `request` to `peer` and await its answer, within `timeout`.
    async fn send_request(&self, peer: PeerAddr, request: Request, timeout: Duration) -> Result<Response, String>;

    /// Open a fresh tunnel byte stream to `peer` (the runtime does the
    /// `TunnelHello`/`TunnelAck` exchange and HTTP on it; it keeps streams long-lived).
    async fn open_tunnel(&self, peer: PeerAddr) -> Result<Self::Stream, String>;
}

/// A request a peer sent us. Send the answer on `reply`; dropping it unanswered
/// makes the transport fail the peer's request.
#[derive(Debug)]
pub struct InboundRequest {
    pub from: PeerId,
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// A tunnel stream a peer opened to us (it starts with a `TunnelHello` frame).
#[derive(Debug)]
pub struct InboundTunnel<S> {
    pub from: PeerId,
    pub stream: S,
}

/// Things the network reports on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetEvent {
    /// A bootstrap connection came up (first time or after a loss): re-advertise.
    BootstrapConnected,
}

/// Inbound half of a network: what peers send us. The transport holds the
/// [`InboundSenders`]; the runtime consumes this. Unbounded so the network's own
/// event loop never blocks on (or drops because of) a slow consumer.
#[derive(Debug)]
pub struct Inbound<S> {
    /// Peer requests (allocate, registry, idle query, ping …).
    pub requests: mpsc::UnboundedReceiver<InboundRequest>,
    /// Tunnel streams peers opened to us.
    pub tunnels: mpsc::UnboundedReceiver<InboundTunnel<S>>,
    /// Network events.
    pub events: mpsc::UnboundedReceiver<NetEvent>,
}

/// The transport's side of [`Inbound`]. `Clone + Send` when `S: Send`.
#[derive(Debug)]
pub struct InboundSenders<S> {
    pub requests: mpsc::UnboundedSender<InboundRequest>,
    pub tunnels: mpsc::UnboundedSender<InboundTunnel<S>>,
    pub events: mpsc::UnboundedSender<NetEvent>,
}

impl<S> Clone for InboundSenders<S> {
    fn clone(&self) -> Self {
        InboundSenders { requests: self.requests.clone(), tunnels: self.tunnels.clone(), events: self.events.clone() }
    }
}

/// A connected pair: give the senders to the transport, the receivers to the runtime.
pub fn inbound_channel<S>() -> (InboundSenders<S>, Inbound<S>) {
    let (rq_tx, rq_rx) = mpsc::unbounded_channel();
    let (tn_tx, tn_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    (
        InboundSenders { requests: rq_tx, tunnels: tn_tx, events: ev_tx },
        Inbound { requests: rq_rx, tunnels: tn_rx, events: ev_rx },
    )
}

/// Service mode: how to reach the local application (ADDRESS). The tunnel server
/// keeps one connection per tunnel stream and reconnects when it closes.
#[allow(async_fn_in_trait)]
pub trait Connector: Clone + 'static {
    type Conn: ByteStream;
    /// A new connection to the application.
    async fn connect(&self) -> io::Result<Self::Conn>;
    /// Where the application takes UDP datagrams (L4 mappings), if anywhere.
    fn udp_target(&self) -> Option<SocketAddr> {
        None
    }
}

/// Connects to the application over TCP at a fixed address (production).
#[derive(Clone, Debug)]
pub struct TcpConnector(pub SocketAddr);

impl Connector for TcpConnector {
    type Conn = tokio::net::TcpStream;
    async fn connect(&self) -> io::Result<tokio::net::TcpStream> {
        let s = tokio::net::TcpStream::connect(self.0).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
    /// The same address as for TCP.
    fn udp_target(&self) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// A node that serves no application (client, allocator, registry, bootstrap).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoApp;

impl Connector for NoApp {
    type Conn = tokio::io::DuplexStream;
    async fn connect(&self) -> io::Result<tokio::io::DuplexStream> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this node serves no application"))
    }
}

/// Where the HTTP front end gets its client connections from.
#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    type Conn: ByteStream;
    /// The next client connection. An error is logged and accepting goes on (after a
    /// short pause), so return errors only for per-connection failures.
    async fn accept(&mut self) -> io::Result<Self::Conn>;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<tokio::net::TcpStream> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Where an allocator's driver reports instances that exited on their own.
/// `Clone + Send + Sync`: a process driver may report from anywhere.
#[derive(Clone, Debug)]
pub struct ExitSink(pub(crate) mpsc::UnboundedSender<InstanceId>);

impl ExitSink {
    /// A sink and the receiver the node loop reads (for drivers tested on their own).
    pub fn channel() -> (ExitSink, mpsc::UnboundedReceiver<InstanceId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ExitSink(tx), rx)
    }
    /// Report that `instance` exited (crashed, finished) without being asked to stop.
    pub fn exited(&self, instance: InstanceId) {
        let _ = self.0.send(instance);
    }
}

/// Allocator: starts and stops instances (processes and containers in production,
/// simulated ones in the simulation).
#[allow(async_fn_in_trait)]
pub trait InstanceDriver: 'static {
    /// Start `instance` of `service`; resolve with its dialable address once it is up,
    /// or a reason. Report a later exit of its own on `exits` (not after `stop`).
    async fn start(&self, instance: InstanceId, service: ServiceInfo, exits: ExitSink) -> Result<PeerAddr, String>;
    /// Stop and remove `instance` (a start in progress is abandoned). Idempotent.
    async fn stop(&self, instance: InstanceId);
    /// Called once before the allocator serves: the instances an earlier run of this
    /// allocator left running that the driver takes over (and reports exits of on
    /// `exits`). The rest of what an earlier run left, the driver removes.
    async fn adopt(&self, _exits: ExitSink) -> Vec<AdoptedInstance> {
        Vec::new()
    }
}

/// An instance of an earlier run, still running, that a driver took over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedInstance {
    pub instance: InstanceId,
    pub service: ServiceInfo,
    pub peer: PeerAddr,
}

/// For nodes that are not allocators: every start fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDriver;

impl InstanceDriver for NoDriver {
    async fn start(&self, _: InstanceId, _: ServiceInfo, _: ExitSink) -> Result<PeerAddr, String> {
        Err("this node has no instance driver".into())
    }
    async fn stop(&self, _: InstanceId) {}
}

/// Hooks the runtime calls from the node loop and the front end. The production
/// metrics and the simulation's trace implement it; every method defaults to nothing.
/// Called synchronously: keep them quick (spawn for slow work such as file writes).
pub trait Observer: 'static {
    /// An input is about to be fed to the core at `now`.
    fn input(&self, _now: Instant, _input: &Input) {}
    /// The core produced `output` (every output, events included) at `now`.
    fn output(&self, _now: Instant, _output: &Output) {}
    /// The core reported `event` (also passed to `output`).
    fn event(&self, _now: Instant, _event: &Event) {}
    /// Registry role: persist the store's full contents.
    fn persist_registry(&self, _entries: Vec<SignedEntry>) {}
    /// The front end answered a client request for `service` with `status` after
    /// `took` (time to the response head; the body may still be streaming).
    fn request_finished(&self, _service: &str, _status: u16, _took: Duration) {}
}

/// No observer.
impl Observer for () {}

impl<O: Observer> Observer for std::rc::Rc<O> {
    fn input(&self, now: Instant, input: &Input) {
        (**self).input(now, input)
    }
    fn output(&self, now: Instant, output: &Output) {
        (**self).output(now, output)
    }
    fn event(&self, now: Instant, event: &Event) {
        (**self).event(now, event)
    }
    fn persist_registry(&self, entries: Vec<SignedEntry>) {
        (**self).persist_registry(entries)
    }
    fn request_finished(&self, service: &str, status: u16, took: Duration) {
        (**self).request_finished(service, status, took)
    }
}
