//! L4 mappings and service chains over tunnel streams.
//!
//! A client asks the proxy's HTTP port `GET /tcp/<service>` (or `/udp/…`, or a chain
//! `/tcp/s1/s2/udp/s3`, see [`physarum_core::l4::Chain`]); the proxy sets the chain up
//! once (so a hop that cannot be placed is reported now, by hop and reason), opens a
//! local listener for it and answers its address, `IP:PORT`. The same chain asked
//! again gets the same listener.
//!
//! Each TCP connection to that listener, and each UDP client address (a *flow*),
//! gets its own session: an instance of the first service is found or allocated and
//! its trust chain checked exactly as for HTTP (the core's find-or-allocate, the
//! peer cache, the per-instance stream limit and the tunnel's hello/ack), then an
//! [`L4Open`] frame goes on the tunnel stream instead of HTTP. The instance's sidecar
//! sets up the rest of the chain the same way, from its own node, and answers
//! [`L4Ready`] with every hop's choice, or which hop failed and why. Then data flows:
//! raw bytes for TCP, length-prefixed datagrams for UDP (at most
//! [`physarum_core::wire::MAX_DATAGRAM`] bytes each, boundaries kept).
//!
//! In a chain, each hop's application is a network function on the way out: what a
//! hop receives from upstream goes to its application; what its application sends
//! goes to the next hop (the last hop's back upstream); what comes back from the
//! next hop is relayed upstream as it is. Between protocols, a byte stream is cut
//! into datagrams of at most the maximum size, and datagrams are joined into a
//! stream.
//!
//! Bounds: at most [`L4Config::max_mappings`] listeners, each with at most
//! [`L4Config::max_tcp_connections`] connections or [`L4Config::max_udp_flows`]
//! flows; a flow idle for [`L4Config::udp_flow_idle`] ends; datagrams waiting for a
//! flow's stream are bounded per flow (past it they are dropped, as UDP may).

use crate::front::{decide, Route};
use crate::http::{read_frame, text_response, write_frame, ProxyBody};
use crate::limits::{Admitted, Limits};
use crate::link::{first_setup, LinkEnd};
use crate::node_loop::NodeHandle;
use crate::relay::{self, pump, stream_ends, udp_ends, Activity, Pump, Rx, Tx, UdpEnd};
use crate::transport::{ByteStream, Connector, Transport};
use crate::tunnel::{OpenFailure, TunnelPool};
use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, Response};
use physarum_core::chain::LinkConfig;
use physarum_core::l4::Chain;
use physarum_core::types::{ContentHash, PeerAddr};
use physarum_core::wire::{HopChoice, L4Hop, L4Open, L4Proto, L4Ready, MAX_CHAIN_HOPS};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// The header of a control answer that lists each hop's choice, `service=peer,…`.
pub const CHAIN_HEADER: &str = "x-physarum-chain";

/// How many instances failing the trust check one set-up may skip before it fails.
const MAX_UNTRUSTED_PER_SETUP: usize = 4;

/// Knobs of L4 mappings.
#[derive(Clone, Debug)]
pub struct L4Config {
    /// Where mapping listeners are opened (the proxy's `--bind`).
    pub bind: IpAddr,
    /// Listeners one proxy keeps at most.
    pub max_mappings: usize,
    /// TCP connections one mapping carries at once; more are closed at once.
    pub max_tcp_connections: usize,
    /// UDP flows (client addresses) one mapping carries at once; datagrams of further
    /// addresses are dropped until one ends.
    pub max_udp_flows: usize,
    /// A UDP flow with no datagram either way for this long ends.
    pub udp_flow_idle: Duration,
    /// Datagrams one flow may have waiting for its stream.
    pub udp_flow_queue: usize,
    /// How long setting a whole chain up may take.
    pub setup_timeout: Duration,
}

impl Default for L4Config {
    fn default() -> Self {
        L4Config {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            max_mappings: 256,
            max_tcp_connections: 1024,
            max_udp_flows: 1024,
            udp_flow_idle: Duration::from_secs(60),
            udp_flow_queue: 1024,
            setup_timeout: Duration::from_secs(30),
        }
    }
}

/// A listener of a mapping; its task stops when this is dropped.
struct Mapping {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What L4 sessions share on one node: the core (find or allocate), the tunnel pool
/// (open + trust check), the per-instance stream limits, and the mappings.
pub(crate) struct L4Ctx<T: Transport> {
    pub handle: NodeHandle,
    pub pool: Rc<TunnelPool<T>>,
    pub limits: Rc<Limits>,
    pub config: L4Config,
    /// Service mode: the served service's name (`None` when this node serves none).
    pub serve: Option<Rc<str>>,
    mappings: RefCell<BTreeMap<String, Mapping>>,
}

impl<T: Transport> L4Ctx<T> {
    pub fn new(
        handle: NodeHandle,
        pool: Rc<TunnelPool<T>>,
        limits: Rc<Limits>,
        config: L4Config,
        serve: Option<Rc<str>>,
    ) -> Self {
        L4Ctx { handle, pool, limits, config, serve, mappings: RefCell::new(BTreeMap::new()) }
    }

    /// Stop every mapping's listener (sessions already running end with their peers).
    pub fn close_all(&self) {
        let all = std::mem::take(&mut *self.mappings.borrow_mut());
        drop(all);
    }
}

/// Why a chain could not be set up: which hop (0 = the first service the caller
/// asked for), its service, an HTTP-like status and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SetupFailure {
    pub hop: usize,
    pub service: String,
    pub status: u16,
    pub reason: String,
}

impl std::fmt::Display for SetupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hop {} ({}) cannot be placed: {}", self.hop + 1, self.service, self.reason)
    }
}

/// A set-up chain: the stream to its first hop, and what every hop chose.
pub(crate) struct Session<S> {
    pub stream: S,
    pub hops: Vec<HopChoice>,
    pub instance: PeerAddr,
    pub hash: ContentHash,
    /// The stream's place under the instance's stream limit, for the session's life.
    pub place: Admitted,
}

/// Set up `hops` (at least one) from this node by `deadline`: find or allocate the
/// first hop's instance, open a checked tunnel stream to it and ask it for the rest.
pub(crate) async fn open_session<T: Transport>(
    ctx: &L4Ctx<T>,
    hops: &[L4Hop],
    deadline: tokio::time::Instant,
) -> Result<Session<T::Stream>, SetupFailure> {
    let Some((first, rest)) = hops.split_first() else {
        return Err(SetupFailure { hop: 0, service: String::new(), status: 400, reason: "an empty chain".into() });
    };
    let fail = |status: u16, reason: String| SetupFailure { hop: 0, service: first.service.clone(), status, reason };
    let mut retry = false;
    let mut untrusted_left = MAX_UNTRUSTED_PER_SETUP;
    loop {
        let Route { instance, hash, .. } =
            decide(&ctx.handle, &first.service, deadline, retry).await.map_err(|(s, r)| fail(s, r))?;
        let gate = ctx.limits.streams.gate(&instance.peer);
        let place = gate.enter(ctx.limits.queue_wait).await.map_err(|refusal| {
            fail(503, format!("overloaded: the streams to instance {} are at their limit ({refusal:?})", instance.peer))
        })?;
        // A try that fails before any data flowed may go to another instance, once.
        let failed_try = |reason: String, retry: &mut bool| -> Result<(), SetupFailure> {
            ctx.handle.route_failed(hash.clone(), instance.peer.clone(), reason.clone());
            if *retry {
                return Err(fail(502, format!("instance {} failed: {reason}", instance.peer)));
            }
            *retry = true;
            Ok(())
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let opened = tokio::time::timeout(left, ctx.pool.open_verified(&instance, &first.service, &hash)).await;
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(OpenFailure::Untrusted(reason))) => {
                ctx.handle.untrusted(&first.service, hash, &instance.peer, &reason);
                untrusted_left -= 1;
                if untrusted_left == 0 {
                    return Err(fail(502, format!("no trusted instance: {} {reason}", instance.peer)));
                }
                continue;
            }
            Ok(Err(OpenFailure::Unreachable(reason))) => {
                failed_try(reason, &mut retry)?;
                continue;
            }
            Err(_) => return Err(fail(504, "no tunnel within the set-up timeout".into())),
        };
        let open = L4Open { proto: first.proto, rest: rest.to_vec() };
        if let Err(e) = write_frame(&mut stream, &open).await {
            failed_try(format!("sending the chain set-up: {e}"), &mut retry)?;
            continue;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ready = match tokio::time::timeout(left, read_frame::<_, L4Ready>(&mut stream)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                failed_try(format!("no chain acknowledgement: {e}"), &mut retry)?;
                continue;
            }
            Err(_) => return Err(fail(504, "no chain acknowledgement within the set-up timeout".into())),
        };
        match ready {
            L4Ready::Ok { hops: chosen } if chosen.len() == hops.len() => {
                return Ok(Session { stream, hops: chosen, instance, hash, place })
            }
            L4Ready::Ok { hops: chosen } => {
                let reason = format!("acknowledged {} hops for a chain of {}", chosen.len(), hops.len());
                failed_try(reason, &mut retry)?;
            }
            // The first hop's own application failed: another instance may do.
            L4Ready::Failed { hop: 0, reason, .. } => failed_try(reason, &mut retry)?,
            L4Ready::Failed { hop, service, status, reason } => {
                let hop = hop as usize;
                let service = if hop < hops.len() { service } else { format!("{service} (hop out of range)") };
                return Err(SetupFailure { hop, service, status, reason });
            }
        }
    }
}

/// `GET /tcp/…` or `/udp/…` on the proxy's HTTP port: the mapping's address.
pub(crate) async fn control<T: Transport>(ctx: &Rc<L4Ctx<T>>, method: &Method, path: &str) -> Response<ProxyBody> {
    if method != Method::GET {
        return text_response(405, "L4 mappings are asked for with GET /tcp/<service> or GET /udp/<service>");
    }
    let chain = match Chain::parse(path) {
        Ok(c) => c,
        Err(e) => return text_response(400, format!("bad L4 path: {e}")),
    };
    let key = chain.to_string();
    if let Some(m) = ctx.mappings.borrow().get(&key) {
        return mapped(m.addr, None);
    }
    if ctx.mappings.borrow().len() >= ctx.config.max_mappings {
        return text_response(503, format!("this proxy keeps at most {} L4 mappings", ctx.config.max_mappings));
    }
    // Set the chain up once now: a hop that cannot be placed is reported here, and
    // the instances it allocated are up for the first client.
    let hops = match first_setup(ctx, chain.hops(), LinkConfig::default()).await {
        Ok(linked) => linked.hops().to_vec(),
        Err(f) => {
            tracing::info!(chain = %key, "L4 chain refused: {f}");
            return text_response(f.status, f.to_string());
        }
    };
    // Another request may have mapped the same chain meanwhile.
    if let Some(m) = ctx.mappings.borrow().get(&key) {
        return mapped(m.addr, Some(&hops));
    }
    let bind = SocketAddr::new(ctx.config.bind, 0);
    let (addr, task) = match chain.proto() {
        L4Proto::Tcp => match tcp_listener(bind) {
            Ok(l) => {
                let addr = l.local_addr().unwrap_or(bind);
                (addr, tokio::task::spawn_local(serve_tcp(ctx.clone(), l, chain.clone())))
            }
            Err(e) => return text_response(500, format!("cannot open a TCP listener on {bind}: {e}")),
        },
        L4Proto::Udp => match udp_socket(bind) {
            Ok(s) => {
                let addr = s.local_addr().unwrap_or(bind);
                (addr, tokio::task::spawn_local(serve_udp(ctx.clone(), Rc::new(s), chain.clone())))
            }
            Err(e) => return text_response(500, format!("cannot open a UDP socket on {bind}: {e}")),
        },
    };
    tracing::info!(chain = %key, %addr, "L4 mapping opened");
    ctx.mappings.borrow_mut().insert(key, Mapping { addr, task });
    mapped(addr, Some(&hops))
}

fn mapped(addr: SocketAddr, hops: Option<&[HopChoice]>) -> Response<ProxyBody> {
    let mut resp = text_response(200, addr.to_string());
    if let Some(hops) = hops {
        let list: Vec<String> = hops.iter().map(|h| format!("{}={}", h.service, h.instance)).collect();
        if let Ok(v) = HeaderValue::from_str(&list.join(",")) {
            resp.headers_mut().insert(CHAIN_HEADER, v);
        }
    }
    resp
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

async fn serve_tcp<T: Transport>(ctx: Rc<L4Ctx<T>>, listener: TcpListener, chain: Chain) {
    let places = Arc::new(Semaphore::new(ctx.config.max_tcp_connections));
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("L4 mapping {chain}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::warn!(%from, "L4 mapping {chain}: {} connections already; closing this one", ctx.config.max_tcp_connections);
            continue;
        };
        let _ = conn.set_nodelay(true);
        let ctx = ctx.clone();
        let chain = chain.clone();
        tokio::task::spawn_local(async move {
            let _place = place;
            let linked = match first_setup(&ctx, chain.hops(), LinkConfig::default()).await {
                Ok(l) => l,
                Err(f) => {
                    tracing::warn!(%from, "L4 mapping {chain}: {f}");
                    return;
                }
            };
            // A second handle on the socket: a reset is a close with zero linger.
            let (conn, resetter) = match conn.into_std().and_then(|s| Ok((s.try_clone()?, s))) {
                Ok((dup, s)) => match TcpStream::from_std(s) {
                    Ok(conn) => (conn, dup),
                    Err(e) => return tracing::warn!(%from, "L4 mapping {chain}: {e}"),
                },
                Err(e) => return tracing::warn!(%from, "L4 mapping {chain}: {e}"),
            };
            let (client_rx, client_tx) = stream_ends(conn, L4Proto::Tcp);
            match linked.relay(&ctx, chain.hops(), client_rx, client_tx).await {
                LinkEnd::Done => {}
                LinkEnd::Failed(f) => tracing::warn!(%from, "L4 connection over {chain} ended: {f}"),
                LinkEnd::Reset(reason) => {
                    tracing::warn!(%from, "L4 connection over {chain} reset: {reason}");
                    if let Ok(s) = TcpStream::from_std(resetter) {
                        let _ = s.set_zero_linger();
                    }
                }
            }
        });
    }
}

/// Each flow's queue, and when it last carried a datagram either way.
type Flows = Rc<RefCell<BTreeMap<SocketAddr, (mpsc::Sender<Bytes>, Rc<Activity>)>>>;

async fn serve_udp<T: Transport>(ctx: Rc<L4Ctx<T>>, socket: Rc<UdpSocket>, chain: Chain) {
    let flows: Flows = Rc::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("L4 mapping {chain}: receive failed: {e}");
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let mut map = flows.borrow_mut();
        if let Some((tx, activity)) = map.get(&from) {
            activity.touch();
            // A full queue drops the datagram, as a congested UDP path would.
            let _ = tx.try_send(datagram);
            continue;
        }
        if map.len() >= ctx.config.max_udp_flows {
            tracing::debug!(%from, "L4 mapping {chain}: {} flows already; datagram dropped", ctx.config.max_udp_flows);
            continue;
        }
        let (tx, rx) = mpsc::channel(ctx.config.udp_flow_queue.max(1));
        let _ = tx.try_send(datagram);
        let activity = Rc::new(Activity::default());
        activity.touch();
        map.insert(from, (tx, activity.clone()));
        drop(map);
        let flow = udp_flow(ctx.clone(), socket.clone(), from, rx, activity, chain.clone());
        let flows = flows.clone();
        tokio::task::spawn_local(async move {
            flow.await;
            flows.borrow_mut().remove(&from);
        });
    }
}

/// One client address's flow: its own session, until it has been idle too long or
/// the chain ends it.
async fn udp_flow<T: Transport>(
    ctx: Rc<L4Ctx<T>>,
    socket: Rc<UdpSocket>,
    from: SocketAddr,
    queue: mpsc::Receiver<Bytes>,
    activity: Rc<Activity>,
    chain: Chain,
) {
    let linked = match first_setup(&ctx, chain.hops(), LinkConfig::default()).await {
        Ok(l) => l,
        Err(f) => {
            tracing::warn!(%from, "L4 mapping {chain}: {f}");
            return;
        }
    };
    let feed = Rx::Queue(queue);
    let back = Tx::UdpTo(socket, from, Some(activity.clone()));
    let idle = ctx.config.udp_flow_idle;
    let expired = async {
        loop {
            let last = activity.last.get().unwrap_or_else(tokio::time::Instant::now);
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    };
    tokio::select! {
        end = linked.relay(&ctx, chain.hops(), feed, back) => match end {
            LinkEnd::Done => {}
            LinkEnd::Failed(f) => tracing::warn!(%from, "L4 flow over {chain} ended: {f}"),
            LinkEnd::Reset(reason) => tracing::warn!(%from, "L4 flow over {chain} ended: {reason}"),
        },
        _ = expired => tracing::debug!(%from, "L4 flow over {chain} idle for {idle:?}: ended"),
    }
}

/// Service side: a client opened an L4 session on a tunnel stream to this sidecar
/// (its hello, ack and trust check done): set up the rest of the chain, answer, relay.
pub(crate) async fn serve_hop<T: Transport, C: Connector, S: ByteStream>(
    ctx: Rc<L4Ctx<T>>,
    app: C,
    mut up: S,
    read_timeout: Duration,
) -> Result<(), String> {
    let open: L4Open = tokio::time::timeout(read_timeout, read_frame(&mut up))
        .await
        .map_err(|_| "no chain set-up in time".to_string())?
        .map_err(|e| format!("bad chain set-up: {e}"))?;
    let served = ctx.serve.clone().unwrap_or_else(|| Rc::from(""));
    let refuse = |status: u16, reason: String| L4Ready::Failed { hop: 0, service: served.to_string(), status, reason };
    if open.rest.len() >= MAX_CHAIN_HOPS {
        let answer = refuse(400, format!("a chain of more than {MAX_CHAIN_HOPS} services"));
        return write_frame(&mut up, &answer).await.map_err(|e| e.to_string());
    }
    // Busy (never culled as idle) while the session lasts.
    let _busy = ctx.handle.serving_request();
    let app_end = match connect_app(&app, open.proto).await {
        Ok(e) => e,
        Err(reason) => return write_frame(&mut up, &refuse(502, reason)).await.map_err(|e| e.to_string()),
    };
    let me = HopChoice { service: served.to_string(), instance: ctx.handle.local_peer().clone() };
    let (app_rx, app_tx) = app_end;
    if open.rest.is_empty() {
        write_frame(&mut up, &L4Ready::Ok { hops: vec![me] }).await.map_err(|e| e.to_string())?;
        let (up_rx, up_tx) = stream_ends(up, open.proto);
        let pumps: Vec<Pump> = vec![Box::pin(pump(up_rx, app_tx)), Box::pin(pump(app_rx, up_tx))];
        return relay::run(pumps).await.map_err(|e| e.to_string());
    }
    let linked = match first_setup(&ctx, &open.rest, LinkConfig::default()).await {
        Ok(l) => l,
        Err(f) => {
            // Hop numbers in the answer count from this hop.
            let hop = u32::try_from(f.hop + 1).unwrap_or(u32::MAX);
            let answer = L4Ready::Failed { hop, service: f.service, status: f.status, reason: f.reason };
            return write_frame(&mut up, &answer).await.map_err(|e| e.to_string());
        }
    };
    let mut hops = vec![me];
    hops.extend(linked.hops().iter().cloned());
    write_frame(&mut up, &L4Ready::Ok { hops }).await.map_err(|e| e.to_string())?;
    let (up_rx, up_tx) = stream_ends(up, open.proto);
    // Out through this hop's application, then down the link; back as it comes.
    let mut into_app = Box::pin(pump(up_rx, app_tx));
    let mut relay = Box::pin(linked.relay(&ctx, &open.rest, app_rx, up_tx));
    tokio::select! {
        end = &mut relay => match end {
            // The chain ended; what upstream still sends goes on to the application.
            LinkEnd::Done => into_app.await.map_err(|e| e.to_string()),
            // Upstream sees the stream end with its data in flight, and resets too.
            LinkEnd::Reset(reason) => Err(format!("reset: {reason}")),
            LinkEnd::Failed(f) => Err(format!("chain failed: {f}")),
        },
        sent = &mut into_app => {
            if let Err(e) = sent {
                return Err(format!("upstream: {e}"));
            }
            match relay.await {
                LinkEnd::Done => Ok(()),
                LinkEnd::Reset(reason) => Err(format!("reset: {reason}")),
                LinkEnd::Failed(f) => Err(format!("chain failed: {f}")),
            }
        }
    }
}

/// This hop's end towards its application, speaking `proto`.
async fn connect_app<C: Connector>(app: &C, proto: L4Proto) -> Result<(Rx, Tx), String> {
    match proto {
        L4Proto::Tcp => {
            let conn = app.connect().await.map_err(|e| format!("cannot reach the service over TCP: {e}"))?;
            Ok(stream_ends(conn, L4Proto::Tcp))
        }
        L4Proto::Udp => {
            let target = app.udp_target().ok_or("this sidecar has no UDP address for its service")?;
            let any = match target {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let socket =
                UdpSocket::bind(SocketAddr::new(any, 0)).await.map_err(|e| format!("cannot open a UDP socket: {e}"))?;
            socket.connect(target).await.map_err(|e| format!("cannot reach the service over UDP: {e}"))?;
            Ok(udp_ends(UdpEnd::new(socket)))
        }
    }
}
