//! The runtime's [`Transport`] on turmoil.
//!
//! - Node ↔ node requests (allocate, registry, idle query, ping) are the core's
//!   [`Envelope`] frames in UDP datagrams on the node's port: one datagram per request
//!   and per response, correlated by the envelope id. A lost datagram is a timeout —
//!   the same as a stalled stream in production. Pings are answered by the transport
//!   itself (like libp2p's ping protocol), so a probe measures the network only.
//! - Tunnels are turmoil TCP streams to the same port number (TCP).
//! - Message loss ([`LossModel`]) is applied here, not by turmoil (whose fail rate
//!   cuts the whole link for a moment and drops everything in flight on it): a lost
//!   datagram is gone, as over UDP; a lost stream segment is sent again after a
//!   retransmission timeout, as over TCP ([`SimStream`]), so on a stream loss becomes
//!   delay; a lost connection attempt is repeated after TCP's initial 1 s SYN timeout.
//! - Discovery talks to the bootstrap DHT servers of [`crate::dht`], and the
//!   bootstrap "connections" are keepalives with the core's backoff
//!   (`physarum_core::dht_policy`, as production: 2, 4, 8, 16 s and 5 attempts, then
//!   the node exits with a clear error; after a loss, reconnection forever, 2 s
//!   doubling, capped at 512 s). A (re)connection emits
//!   [`NetEvent::BootstrapConnected`] so the core advertises again.

use crate::dht::{AbortOnDrop, DhtMsg, DHT_PORT, MAX_DATAGRAM};
use crate::trace::{Kind, Trace};
use physarum_core::dht_policy::{Backoff, BootstrapLink, Retry};
use physarum_core::types::{DhtKey, PeerAddr, PeerId};
use physarum_core::wire::{self, Envelope, Request, Response};
use physarum_runtime::transport::{
    Connector, InboundRequest, InboundSenders, InboundTunnel, Listener, NetEvent, Transport,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, timeout_at, Instant, Sleep};
use turmoil::net::{TcpListener, TcpStream, UdpSocket};

/// Per-link message loss, shared by every node of a run (all on turmoil's one thread,
/// so the draws from its one seeded RNG happen in a deterministic order).
#[derive(Clone)]
pub struct LossModel {
    state: Rc<RefCell<LossState>>,
}

struct LossState {
    /// Loss probability per message, by host pair (names in order).
    rates: BTreeMap<(String, String), f64>,
    rng: ChaCha8Rng,
}

impl LossModel {
    pub fn new(seed: u64) -> Self {
        let state = LossState { rates: BTreeMap::new(), rng: ChaCha8Rng::seed_from_u64(seed) };
        LossModel { state: Rc::new(RefCell::new(state)) }
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    }

    /// Lose messages between hosts `a` and `b` (both ways) with probability `rate`; 0 repairs.
    pub fn set(&self, a: &str, b: &str, rate: f64) {
        let mut s = self.state.borrow_mut();
        if rate > 0.0 {
            s.rates.insert(Self::pair(a, b), rate.min(1.0));
        } else {
            s.rates.remove(&Self::pair(a, b));
        }
    }

    /// Whether the message being sent now from host `from` to host `to` is lost.
    pub fn lost(&self, from: &str, to: &str) -> bool {
        if from == to {
            return false;
        }
        let mut s = self.state.borrow_mut();
        let Some(rate) = s.rates.get(&Self::pair(from, to)).copied() else { return false };
        // 53 random bits, uniform in [0, 1).
        let draw = (s.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        draw < rate
    }
}

impl std::fmt::Debug for LossModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossModel").field("rates", &self.state.borrow().rates).finish()
    }
}

impl Default for LossModel {
    fn default() -> Self {
        LossModel::new(0)
    }
}

/// TCP's retransmission timeout: the first (Linux's minimum), doubled for every loss
/// of the same segment, up to the last.
pub(crate) const MIN_RTO: Duration = Duration::from_millis(200);
pub(crate) const MAX_RTO: Duration = Duration::from_secs(60);
/// TCP's initial SYN retransmission timeout (RFC 6298).
const SYN_RTO: Duration = Duration::from_secs(1);

/// A tunnel stream over turmoil TCP, with loss turned into delay: every write is one
/// segment; a lost one is written only after the retransmission timeout (doubling
/// while it keeps being lost). Order and content are kept, as TCP keeps them.
pub struct SimStream {
    inner: TcpStream,
    link: LossyLink,
}

struct LossyLink {
    loss: LossModel,
    from: String,
    to: String,
    /// Waiting out a retransmission timeout before the current segment goes.
    stall: Option<Pin<Box<Sleep>>>,
    rto: Duration,
    /// The current segment has been through the loss draw and goes through.
    passed: bool,
}

impl SimStream {
    /// `inner`, whose writes from host `from` to host `to` suffer `loss`.
    pub fn new(inner: TcpStream, loss: LossModel, from: &str, to: &str) -> Self {
        let link =
            LossyLink { loss, from: from.to_string(), to: to.to_string(), stall: None, rto: MIN_RTO, passed: false };
        SimStream { inner, link }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let l = &mut this.link;
        while !l.passed {
            if let Some(stall) = l.stall.as_mut() {
                ready!(stall.as_mut().poll(cx));
                l.stall = None;
            }
            if l.loss.lost(&l.from, &l.to) {
                l.stall = Some(Box::pin(sleep(l.rto)));
                l.rto = (l.rto * 2).min(MAX_RTO);
            } else {
                l.passed = true;
                l.rto = MIN_RTO;
            }
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            l.passed = false;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The host part of a `host:port` address.
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// Where a node listens and whom it joins through.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// The peer id the core uses for this node.
    pub peer: PeerId,
    /// The host it runs on.
    pub host: String,
    /// UDP port for wire frames, TCP port for tunnels.
    pub port: u16,
    /// Host names of the bootstrap DHT servers.
    pub bootstraps: Vec<String>,
    /// Keepalive period of bootstrap connections.
    pub keepalive: Duration,
    /// How long a keepalive or connection attempt waits for the answer.
    pub hello_timeout: Duration,
    /// Missed keepalives before a bootstrap connection counts as lost.
    pub max_missed: u32,
    /// Start-up attempts and retries after a loss (the core's policy, as in production).
    pub backoff: Backoff,
    /// How long opening a tunnel stream may take.
    pub tunnel_connect_timeout: Duration,
    /// How long an advertisement waits for a bootstrap's acknowledgement.
    pub advertise_timeout: Duration,
    /// Pass pings on to the node rather than answering them here (sidecars: their
    /// answer says whether the application answers).
    pub pings_to_node: bool,
    /// Message loss on this node's links.
    pub loss: LossModel,
}

impl EndpointConfig {
    pub fn new(peer: PeerId, host: &str, port: u16, bootstraps: Vec<String>) -> Self {
        EndpointConfig {
            peer,
            host: host.to_string(),
            port,
            bootstraps,
            keepalive: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(1),
            max_missed: 3,
            backoff: Backoff::default(),
            tunnel_connect_timeout: Duration::from_secs(2),
            advertise_timeout: Duration::from_secs(2),
            pings_to_node: false,
            loss: LossModel::default(),
        }
    }

    /// This node's own dialable address.
    pub fn addr(&self) -> PeerAddr {
        PeerAddr { peer: self.peer.clone(), addrs: vec![format!("{}:{}", self.host, self.port)] }
    }
}

struct Inner {
    cfg: EndpointConfig,
    node_sock: UdpSocket,
    dht_sock: UdpSocket,
    next_id: Cell<u64>,
    pending: RefCell<BTreeMap<u64, oneshot::Sender<Response>>>,
    dht_pending: RefCell<BTreeMap<u64, mpsc::UnboundedSender<(String, DhtMsg)>>>,
    /// Connected bootstraps and the epoch they answered with.
    connected: RefCell<BTreeMap<String, u64>>,
    trace: Trace,
}

impl Inner {
    fn id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// The bootstraps to talk to: the connected ones, else all of them.
    fn targets(&self) -> Vec<String> {
        let c = self.connected.borrow();
        if c.is_empty() {
            self.cfg.bootstraps.clone()
        } else {
            c.keys().cloned().collect()
        }
    }

    /// Send `msg(id)` to each of `to`; answers arrive on the returned receiver as
    /// (bootstrap, answer). The ids are forgotten when [`Inner::forget`] is called.
    async fn dht_multicast(
        &self,
        to: &[String],
        msg: impl Fn(u64) -> DhtMsg,
    ) -> (Vec<u64>, mpsc::UnboundedReceiver<(String, DhtMsg)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut ids = Vec::new();
        for b in to {
            let id = self.id();
            let Ok(frame) = wire::encode(&msg(id)) else { continue };
            ids.push(id);
            self.dht_pending.borrow_mut().insert(id, tx.clone());
            if self.cfg.loss.lost(&self.cfg.host, b) {
                continue;
            }
            if self.dht_sock.send_to(&frame, (b.as_str(), DHT_PORT)).await.is_err() {
                self.dht_pending.borrow_mut().remove(&id);
            }
        }
        (ids, rx)
    }

    fn forget(&self, ids: &[u64]) {
        let mut p = self.dht_pending.borrow_mut();
        for id in ids {
            p.remove(id);
        }
    }
}

/// The turmoil transport of one node. Cheap to clone.
#[derive(Clone)]
pub struct SimTransport {
    inner: Rc<Inner>,
}

/// The background tasks of a transport; dropping it stops them.
pub struct Endpoint {
    _tasks: AbortOnDrop,
    /// Resolves with the reason when the node must exit (no bootstrap reachable).
    pub fatal: oneshot::Receiver<String>,
}

impl SimTransport {
    /// Bind the node's sockets and start its receive loops and bootstrap connections.
    pub async fn start(
        cfg: EndpointConfig,
        senders: InboundSenders<SimStream>,
        trace: Trace,
    ) -> io::Result<(SimTransport, Endpoint)> {
        let node_sock = UdpSocket::bind(("0.0.0.0", cfg.port)).await?;
        let dht_sock = UdpSocket::bind(("0.0.0.0", 0)).await?;
        let listener = TcpListener::bind(("0.0.0.0", cfg.port)).await?;
        let inner = Rc::new(Inner {
            cfg,
            node_sock,
            dht_sock,
            next_id: Cell::new(1),
            pending: RefCell::new(BTreeMap::new()),
            dht_pending: RefCell::new(BTreeMap::new()),
            connected: RefCell::new(BTreeMap::new()),
            trace,
        });
        let (fatal_tx, fatal) = oneshot::channel();
        let tasks = vec![
            tokio::task::spawn_local(node_loop(inner.clone(), senders.requests.clone())),
            tokio::task::spawn_local(dht_loop(inner.clone())),
            tokio::task::spawn_local(accept_loop(inner.clone(), listener, senders.tunnels.clone())),
            tokio::task::spawn_local(bootstrap_loop(inner.clone(), senders.events.clone(), fatal_tx)),
        ];
        Ok((SimTransport { inner }, Endpoint { _tasks: AbortOnDrop(tasks), fatal }))
    }

    pub fn addr(&self) -> PeerAddr {
        self.inner.cfg.addr()
    }

    /// Bootstraps currently connected (for tests and traces).
    pub fn connected_bootstraps(&self) -> Vec<String> {
        self.inner.connected.borrow().keys().cloned().collect()
    }
}

fn first_addr(peer: &PeerAddr) -> Result<&str, String> {
    peer.addrs.first().map(String::as_str).ok_or_else(|| format!("peer {} has no address", peer.peer))
}

impl Transport for SimTransport {
    type Stream = SimStream;

    fn local_peer(&self) -> PeerId {
        self.inner.cfg.peer.clone()
    }

    async fn find_providers(&self, key: DhtKey, limit: Duration) -> Result<Vec<PeerAddr>, String> {
        let inner = &self.inner;
        let targets = inner.targets();
        let (ids, mut rx) = inner.dht_multicast(&targets, |id| DhtMsg::GetProviders { id, key: key.clone() }).await;
        let mut deadline = Instant::now() + limit;
        let mut answered = 0;
        let mut found: BTreeMap<PeerId, PeerAddr> = BTreeMap::new();
        while answered < ids.len() {
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some((_, DhtMsg::Providers { providers, .. }))) => {
                    answered += 1;
                    if !providers.is_empty() {
                        // Enough once someone knows providers: the others get a moment.
                        deadline = deadline.min(Instant::now() + Duration::from_millis(50));
                    }
                    for p in providers {
                        found.entry(p.peer.clone()).or_insert(p);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        inner.forget(&ids);
        if answered == 0 {
            return Err(format!("no bootstrap answered the lookup within {limit:?}"));
        }
        Ok(found.into_values().collect())
    }

    async fn advertise(&self, key: DhtKey) -> Result<(), String> {
        let inner = &self.inner;
        let me = inner.cfg.addr();
        let targets = inner.targets();
        let (ids, mut rx) = inner
            .dht_multicast(&targets, |id| DhtMsg::AddProvider { id, key: key.clone(), provider: me.clone() })
            .await;
        let got = timeout(inner.cfg.advertise_timeout, async {
            while let Some((_, m)) = rx.recv().await {
                if matches!(m, DhtMsg::Ack { .. }) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        inner.forget(&ids);
        if got {
            Ok(())
        } else {
            Err("no bootstrap acknowledged the advertisement".into())
        }
    }

    async fn probe(&self, peer: PeerAddr, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let nonce = self.inner.next_id.get();
        match self.send_request(peer, Request::Ping { nonce }, limit).await? {
            Response::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(format!("unexpected answer to a ping: {other:?}")),
        }
    }

    async fn send_request(&self, peer: PeerAddr, request: Request, limit: Duration) -> Result<Response, String> {
        let inner = &self.inner;
        let addr = first_addr(&peer)?;
        let id = inner.id();
        let frame = wire::encode(&Envelope::Request { id, from: inner.cfg.peer.0.clone(), body: request })
            .map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel();
        inner.pending.borrow_mut().insert(id, tx);
        let lost = inner.cfg.loss.lost(&inner.cfg.host, host_of(addr));
        if let Err(e) = if lost { Ok(0) } else { inner.node_sock.send_to(&frame, addr).await } {
            inner.pending.borrow_mut().remove(&id);
            return Err(format!("cannot send to {addr}: {}", e.kind()));
        }
        let r = timeout(limit, rx).await;
        inner.pending.borrow_mut().remove(&id);
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err("request abandoned".into()),
            Err(_) => Err(format!("no answer from {} within {limit:?}", peer.peer)),
        }
    }

    async fn open_tunnel(&self, peer: PeerAddr) -> Result<SimStream, String> {
        let addr = first_addr(&peer)?.to_string();
        let cfg = &self.inner.cfg;
        let to = host_of(&addr).to_string();
        let connect = async {
            // A lost SYN or SYN-ACK is sent again after TCP's SYN timeout, doubling.
            let mut rto = SYN_RTO;
            while cfg.loss.lost(&cfg.host, &to) || cfg.loss.lost(&to, &cfg.host) {
                sleep(rto).await;
                rto *= 2;
            }
            TcpStream::connect(addr.as_str()).await
        };
        match timeout(cfg.tunnel_connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(SimStream::new(s, cfg.loss.clone(), &cfg.host, &to)),
            // The error kind only: turmoil's message names the IP address.
            Ok(Err(e)) => Err(format!("cannot connect to {}: {}", peer.peer, e.kind())),
            Err(_) => Err(format!("connecting to {} timed out", peer.peer)),
        }
    }
}

/// Wire frames on the node's UDP port: answer pings, hand requests to the runtime,
/// match responses to waiting requests. Malformed datagrams are dropped.
async fn node_loop(inner: Rc<Inner>, requests: mpsc::UnboundedSender<InboundRequest>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, src)) = inner.node_sock.recv_from(&mut buf).await else { return };
        let Ok(Some((env, _))) = wire::decode::<Envelope>(&buf[..n]) else { continue };
        match env {
            Envelope::Request { id, body: Request::Ping { nonce }, .. } if !inner.cfg.pings_to_node => {
                reply(&inner, id, Response::Pong { nonce }, src).await;
            }
            Envelope::Request { id, from, body } => {
                let (tx, rx) = oneshot::channel();
                if requests.send(InboundRequest { from: PeerId(from), request: body, reply: tx }).is_err() {
                    reply(&inner, id, Response::Error { reason: "node is shutting down".into() }, src).await;
                    continue;
                }
                let inner = inner.clone();
                tokio::task::spawn_local(async move {
                    let response =
                        rx.await.unwrap_or_else(|_| Response::Error { reason: "request dropped unanswered".into() });
                    reply(&inner, id, response, src).await;
                });
            }
            Envelope::Response { id, body } => {
                if let Some(tx) = inner.pending.borrow_mut().remove(&id) {
                    let _ = tx.send(body);
                }
            }
        }
    }
}

async fn reply(inner: &Inner, id: u64, body: Response, to: SocketAddr) {
    let frame = match wire::encode(&Envelope::Response { id, body }) {
        Ok(f) => f,
        Err(e) => match wire::encode(&Envelope::Response { id, body: Response::Error { reason: e.to_string() } }) {
            Ok(f) => f,
            Err(_) => return,
        },
    };
    let to_host = turmoil::reverse_lookup(to.ip()).unwrap_or_default();
    if !inner.cfg.loss.lost(&inner.cfg.host, &to_host) {
        let _ = inner.node_sock.send_to(&frame, to).await;
    }
}

/// DHT answers on the node's DHT client socket.
async fn dht_loop(inner: Rc<Inner>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, src)) = inner.dht_sock.recv_from(&mut buf).await else { return };
        let Ok(Some((msg, _))) = wire::decode::<DhtMsg>(&buf[..n]) else { continue };
        let id = match &msg {
            DhtMsg::HelloAck { id, .. } | DhtMsg::Ack { id } | DhtMsg::Providers { id, .. } => *id,
            _ => continue,
        };
        let from = turmoil::reverse_lookup(src.ip()).unwrap_or_default();
        let tx = inner.dht_pending.borrow().get(&id).cloned();
        if let Some(tx) = tx {
            let _ = tx.send((from, msg));
        }
    }
}

async fn accept_loop(
    inner: Rc<Inner>,
    listener: TcpListener,
    tunnels: mpsc::UnboundedSender<InboundTunnel<SimStream>>,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        let from = turmoil::reverse_lookup(from.ip()).unwrap_or_else(|| from.ip().to_string());
        let stream = SimStream::new(stream, inner.cfg.loss.clone(), &inner.cfg.host, &from);
        let from = PeerId(from);
        if tunnels.send(InboundTunnel { from, stream }).is_err() {
            return;
        }
    }
}

/// Hello every bootstrap in `to` at once; the epochs of those that answered in time.
async fn hello_all(inner: &Inner, to: &[String]) -> BTreeMap<String, u64> {
    let (ids, mut rx) = inner.dht_multicast(to, |id| DhtMsg::Hello { id }).await;
    let deadline = Instant::now() + inner.cfg.hello_timeout;
    let mut got = BTreeMap::new();
    while got.len() < ids.len() {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some((from, DhtMsg::HelloAck { epoch, .. }))) => {
                got.insert(from, epoch);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    inner.forget(&ids);
    got
}

/// Bootstrap connections: start-up with backoff, keepalives, reconnection, each
/// bootstrap's retries decided by the core's [`BootstrapLink`].
async fn bootstrap_loop(inner: Rc<Inner>, events: mpsc::UnboundedSender<NetEvent>, fatal: oneshot::Sender<String>) {
    let me = inner.cfg.peer.0.clone();
    let all = inner.cfg.bootstraps.clone();
    let backoff = inner.cfg.backoff.clone();
    let mut links: BTreeMap<String, BootstrapLink> =
        all.iter().map(|b| (b.clone(), BootstrapLink::default())).collect();
    // Start-up: all bootstraps in parallel, each retried with backoff, then a clear error.
    let mut up = BTreeMap::new();
    let mut attempt = 0;
    while up.is_empty() {
        attempt += 1;
        up = hello_all(&inner, &all).await;
        if !up.is_empty() {
            break;
        }
        let mut delay = None;
        for l in links.values_mut() {
            if let Retry::After(d) = l.failed(&backoff, false) {
                delay = Some(delay.map_or(d, |x: Duration| x.min(d)));
            }
        }
        let Some(d) = delay else { break };
        inner.trace.here(&me, Kind::Bootstrap(format!("attempt {attempt} failed, retry in {}s", d.as_secs())));
        sleep(d).await;
    }
    if up.is_empty() {
        let reason = format!("no bootstrap reachable after {attempt} attempts ({})", all.join(", "));
        inner.trace.here(&me, Kind::NodeExited(reason.clone()));
        let _ = fatal.send(reason);
        return;
    }
    inner.trace.here(&me, Kind::Bootstrap(format!("connected {}", up.keys().cloned().collect::<Vec<_>>().join(","))));
    *inner.connected.borrow_mut() = up;
    let _ = events.send(NetEvent::BootstrapConnected);

    // Steady state: bootstraps not connected are retried at their link's pace.
    let mut missed: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_try: BTreeMap<String, Instant> = BTreeMap::new();
    let now = Instant::now();
    for (b, l) in links.iter_mut() {
        if inner.connected.borrow().contains_key(b) {
            l.connected();
        } else {
            let d = l.revive(&backoff).unwrap_or_else(|| backoff.delay(l.failures()));
            next_try.insert(b.clone(), now + d);
        }
    }
    loop {
        sleep(inner.cfg.keepalive).await;
        let now = Instant::now();
        let due: BTreeSet<String> = next_try.iter().filter(|(_, t)| **t <= now).map(|(b, _)| b.clone()).collect();
        let to: Vec<String> =
            all.iter().filter(|b| inner.connected.borrow().contains_key(*b) || due.contains(*b)).cloned().collect();
        if to.is_empty() {
            continue;
        }
        let answers = hello_all(&inner, &to).await;
        let mut reconnected = Vec::new();
        for b in &to {
            let was = inner.connected.borrow().get(b).copied();
            let Some(link) = links.get_mut(b) else { continue };
            match (was, answers.get(b)) {
                (Some(old), Some(&epoch)) => {
                    missed.remove(b);
                    if old != epoch {
                        // The bootstrap restarted between two keepalives: a new connection.
                        inner.connected.borrow_mut().insert(b.clone(), epoch);
                        reconnected.push(b.clone());
                    }
                }
                (Some(_), None) => {
                    let m = missed.entry(b.clone()).or_insert(0);
                    *m += 1;
                    if *m >= inner.cfg.max_missed {
                        missed.remove(b);
                        inner.connected.borrow_mut().remove(b);
                        inner.trace.here(&me, Kind::Bootstrap(format!("lost {b}")));
                        next_try.insert(b.clone(), Instant::now() + link.lost(&backoff));
                    }
                }
                (None, Some(&epoch)) => {
                    next_try.remove(b);
                    link.connected();
                    inner.connected.borrow_mut().insert(b.clone(), epoch);
                    reconnected.push(b.clone());
                }
                (None, None) => {
                    let d = match link.failed(&backoff, true) {
                        Retry::After(d) => d,
                        Retry::GiveUp => backoff.cap,
                    };
                    next_try.insert(b.clone(), Instant::now() + d);
                }
            }
        }
        if !reconnected.is_empty() {
            inner.trace.here(&me, Kind::Bootstrap(format!("connected {}", reconnected.join(","))));
            let _ = events.send(NetEvent::BootstrapConnected);
        }
    }
}

/// The HTTP front end's listener: turmoil TCP.
pub struct SimListener(pub TcpListener);

impl SimListener {
    pub async fn bind(port: u16) -> io::Result<SimListener> {
        Ok(SimListener(TcpListener::bind(("0.0.0.0", port)).await?))
    }
}

impl Listener for SimListener {
    type Conn = TcpStream;
    async fn accept(&mut self) -> io::Result<TcpStream> {
        Ok(self.0.accept().await?.0)
    }
}

/// Service mode: the application in the same host, over turmoil TCP (loopback).
#[derive(Clone, Debug)]
pub struct SimConnector {
    pub port: u16,
}

impl Connector for SimConnector {
    type Conn = TcpStream;
    async fn connect(&self) -> io::Result<TcpStream> {
        match timeout(Duration::from_secs(2), TcpStream::connect(("127.0.0.1", self.port))).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connecting to the application timed out")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::{self, ServerConfig};
    use physarum_core::types::ContentHash;
    use physarum_runtime::transport::inbound_channel;

    fn boot_host(sim: &mut turmoil::Sim<'_>, name: &'static str, peers: Vec<String>, trace: Trace) {
        sim.host(name, move || {
            let cfg = ServerConfig {
                name: name.into(),
                peers: peers.clone(),
                record_ttl: Duration::from_secs(5),
                replicate_interval: Duration::from_secs(1),
                epoch: 1,
            };
            let trace = trace.clone();
            async move {
                dht::serve(cfg, trace).await?;
                Ok(())
            }
        });
    }

    #[test]
    fn discovery_probe_and_requests_over_turmoil() -> turmoil::Result {
        let mut sim = turmoil::Builder::new()
            .rng_seed(7)
            .simulation_duration(Duration::from_secs(60))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(1))
            .build();
        let trace = Trace::new();
        boot_host(&mut sim, "boot1", vec!["boot2".into()], trace.clone());
        boot_host(&mut sim, "boot2", vec!["boot1".into()], trace.clone());
        let bootstraps = vec!["boot1".to_string(), "boot2".to_string()];
        let t = trace.clone();
        let bs = bootstraps.clone();
        sim.host("a", move || {
            let (t, bs) = (t.clone(), bs.clone());
            async move {
                let (senders, mut inbound) = inbound_channel();
                let cfg = EndpointConfig::new(PeerId("a".into()), "a", 7000, bs);
                let (tr, _ep) = SimTransport::start(cfg, senders, t).await?;
                tr.advertise(DhtKey::Service(ContentHash("h".into()))).await.ok();
                while let Some(r) = inbound.requests.recv().await {
                    let _ = r.reply.send(Response::Idle { seconds: 3 });
                }
                Ok(())
            }
        });
        let t = trace.clone();
        sim.client("b", async move {
            let (senders, _inbound) = inbound_channel();
            let cfg = EndpointConfig::new(PeerId("b".into()), "b", 7000, bootstraps);
            let (tr, _ep) = SimTransport::start(cfg, senders, t).await?;
            sleep(Duration::from_secs(2)).await;
            assert_eq!(tr.connected_bootstraps(), vec!["boot1".to_string(), "boot2".to_string()]);
            let key = DhtKey::Service(ContentHash("h".into()));
            let found = tr.find_providers(key.clone(), Duration::from_secs(1)).await?;
            assert_eq!(found, vec![PeerAddr::new("a", vec!["a:7000".into()])]);
            let none = tr.find_providers(DhtKey::Registry, Duration::from_secs(1)).await?;
            assert!(none.is_empty());
            let rtt = tr.probe(found[0].clone(), Duration::from_secs(1)).await?;
            assert!(rtt >= Duration::from_millis(6) && rtt <= Duration::from_millis(8), "rtt {rtt:?}");
            let r = tr
                .send_request(found[0].clone(), Request::IdleQuery { credentials: None }, Duration::from_secs(1))
                .await?;
            assert_eq!(r, Response::Idle { seconds: 3 });
            let gone = PeerAddr::new("x", vec!["nohost:1".into()]);
            assert!(tr
                .send_request(gone, Request::IdleQuery { credentials: None }, Duration::from_secs(1))
                .await
                .is_err());
            // Records expire (TTL 5 s) when not re-advertised.
            sleep(Duration::from_secs(6)).await;
            assert!(tr.find_providers(key, Duration::from_secs(1)).await?.is_empty());
            Ok(())
        });
        sim.set_link_latency("a", "b", Duration::from_millis(3));
        sim.run()
    }

    #[test]
    fn records_replicate_and_bootstrap_loss_is_noticed() -> turmoil::Result {
        let mut sim = turmoil::Builder::new()
            .rng_seed(3)
            .simulation_duration(Duration::from_secs(120))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(1))
            .build();
        let trace = Trace::new();
        boot_host(&mut sim, "boot1", vec!["boot2".into()], trace.clone());
        boot_host(&mut sim, "boot2", vec!["boot1".into()], trace.clone());
        let t = trace.clone();
        sim.client("a", async move {
            let (senders, mut inbound) = inbound_channel::<SimStream>();
            // Only knows boot1.
            let cfg = EndpointConfig::new(PeerId("a".into()), "a", 7000, vec!["boot1".into()]);
            let (tr, _ep) = SimTransport::start(cfg, senders, t).await?;
            assert_eq!(inbound.events.recv().await, Some(NetEvent::BootstrapConnected));
            tr.advertise(DhtKey::Allocators).await?;
            sleep(Duration::from_secs(1)).await;
            // Now only boot2 is asked.
            let cfg = EndpointConfig::new(PeerId("q".into()), "a", 7001, vec!["boot2".into()]);
            let (senders, _i) = inbound_channel();
            let (q, _ep2) = SimTransport::start(cfg, senders, Trace::new()).await?;
            sleep(Duration::from_secs(1)).await;
            let found = q.find_providers(DhtKey::Allocators, Duration::from_secs(1)).await?;
            assert_eq!(found.len(), 1);
            // boot1 goes away: noticed after the missed keepalives, then it comes back.
            sleep(Duration::from_secs(30)).await;
            assert!(tr.connected_bootstraps().is_empty());
            assert_eq!(inbound.events.recv().await, Some(NetEvent::BootstrapConnected));
            assert_eq!(tr.connected_bootstraps(), vec!["boot1".to_string()]);
            Ok(())
        });
        for _ in 0..5000 {
            sim.step()?;
        }
        sim.crash("boot1");
        for _ in 0..20_000 {
            sim.step()?;
        }
        sim.bounce("boot1");
        sim.run()?;
        let text = trace.text();
        assert!(text.contains("a bootstrap lost boot1"), "{text}");
        Ok(())
    }

    #[test]
    fn no_bootstrap_at_start_is_a_clear_exit_after_five_attempts() -> turmoil::Result {
        let mut sim = turmoil::Builder::new().rng_seed(3).simulation_duration(Duration::from_secs(120)).build();
        let trace = Trace::new();
        let t = trace.clone();
        sim.host("boot1", || async { std::future::pending::<turmoil::Result>().await });
        sim.client("a", async move {
            let (senders, _inbound) = inbound_channel();
            let cfg = EndpointConfig::new(PeerId("a".into()), "a", 7000, vec!["boot1".into()]);
            let (_tr, ep) = SimTransport::start(cfg, senders, t).await?;
            let reason = ep.fatal.await?;
            assert!(reason.contains("after 5 attempts"), "{reason}");
            // 2+4+8+16 s of backoff plus five 1 s attempts.
            let at = crate::trace::sim_now();
            assert!(at >= Duration::from_secs(34) && at <= Duration::from_secs(36), "{at:?}");
            Ok(())
        });
        sim.run()
    }
}
