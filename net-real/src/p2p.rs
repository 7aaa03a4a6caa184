//! The libp2p network: one swarm per daemon, driven by its own task, and a cloneable
//! handle ([`P2p`]) that implements the runtime's [`Transport`].
//!
//! Swarm: TCP (+ pnet when a PSK is set) + Noise + Yamux; Kademlia in server mode on
//! our own protocol with short provider TTLs; identify (listen addresses go into
//! Kademlia and our address book); ping (RTT per connection, for the bootstrap's
//! metrics); request-response with the core's wire codec (RTT probes are a
//! `wire::Request::Ping` answered by the swarm task itself, so a probe is one
//! request round trip on an established connection); libp2p-stream for tunnels and
//! for keep-alive streams to bootstraps.

use crate::codec::{WireCodec, RR_PROTOCOL};
use crate::direct::{self, DirectKeys, Route, Routes, TunnelIo};
use crate::inbound::AcceptStreams;
use anyhow::{anyhow, Context as _};
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt as _, StreamExt};
use libp2p::core::transport::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self as rr, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, pnet, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, Transport as _};
use physarum_core::types::{DhtKey, PeerAddr};
use physarum_core::wire::{Request, Response};
use physarum_runtime::transport::{inbound_channel, Inbound, InboundRequest, InboundSenders, InboundTunnel, NetEvent};
use physarum_runtime::Transport;
use sha3::Digest;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

/// Kademlia protocol name: our own DHT, not the IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/physarum/kad/1.0.0");
/// Tunnelled HTTP streams.
pub const TUNNEL_PROTOCOL: StreamProtocol = StreamProtocol::new("/physarum/tunnel/1.0.0");
/// Streams held open to keep bootstrap connections alive.
pub const KEEPALIVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/physarum/keepalive/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_VERSION: &str = "/physarum/1.0.0";

/// A tunnel stream as the runtime sees it: tokio I/O over a data-plane connection or
/// a libp2p stream (see `direct`), read through a buffer of its own. futures-io
/// reads need initialised memory, so the compat layer zeroes whatever fresh buffer
/// it is handed: hyper hands it one of 8 KiB or more per read, which showed in the
/// profile as memset. The buffer is zeroed once per stream instead, and larger than
/// hyper's reads so they go through it.
pub type TunnelStream = tokio::io::BufReader<Compat<TunnelIo>>;

/// The read buffer of each tunnel stream.
const TUNNEL_READ_BUFFER: usize = 16 * 1024;

fn tunnel_stream(io: TunnelIo) -> TunnelStream {
    tokio::io::BufReader::with_capacity(TUNNEL_READ_BUFFER, io.compat())
}

/// The 32-byte private-network key for a passphrase: SHA3-256 of it (as the original).
pub fn psk_from_passphrase(passphrase: &str) -> pnet::PreSharedKey {
    let digest = sha3::Sha3_256::digest(passphrase.as_bytes());
    pnet::PreSharedKey::new(digest.into())
}

pub use physarum_core::dht_policy::Backoff;
use physarum_core::dht_policy::{BootstrapLink, Retry};

/// How the network is set up.
#[derive(Clone)]
pub struct P2pOptions {
    /// This node's identity.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001` (port 0: any).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap nodes (`/ip4/…/tcp/…/p2p/<peer id>`; the `/p2p` part is optional).
    pub bootstraps: Vec<Multiaddr>,
    /// Private-network passphrase (`P2P_PSK`); `None`: public network.
    pub psk: Option<String>,
    pub backoff: Backoff,
    /// Idle connections (no open stream) close after this long.
    pub idle_connection_timeout: Duration,
    /// Provider records expire after this long (the core re-advertises every 30 s).
    pub provider_ttl: Duration,
    /// Kademlia queries give up after this long (ours finish earlier on their own).
    pub kad_query_timeout: Duration,
    /// Request-response timeout (must exceed the slowest allocation).
    pub request_timeout: Duration,
    /// Interval of libp2p pings on every connection (RTTs for [`P2p::connected_peers`]).
    pub ping_interval: Duration,
    /// A connection whose ping goes unanswered this long is closed and its peer taken
    /// out of Kademlia's routing table: a hung peer (paused, black-holed) keeps its TCP
    /// connection open and would otherwise stall every DHT query that asks it.
    pub ping_timeout: Duration,
    /// One Kademlia request to one peer gives up after this long, so a query moves on
    /// past a hung peer within a find's deadline rather than waiting 10 s.
    pub kad_rpc_timeout: Duration,
    /// Connection set-up (TCP + pnet + Noise + Yamux) must finish within this.
    pub handshake_timeout: Duration,
    /// Pass pings on to the node rather than answering them here: a sidecar's answer
    /// then says whether its application answers, not only whether the sidecar runs.
    pub pings_to_node: bool,
    /// The data plane (see `direct`): take tunnels on connections of their own at
    /// this TCP port (0: any) on the first listen address's IP. `None`: tunnels
    /// only on the swarm. Dialing peers' data planes needs no listener of one's own.
    pub data_plane_port: Option<u16>,
    /// Opening a tunnel on a peer's data plane (connect and handshakes) must finish
    /// within this, or the tunnel goes over the swarm.
    pub data_plane_dial_timeout: Duration,
}

impl P2pOptions {
    pub fn new(keypair: Keypair) -> Self {
        P2pOptions {
            keypair,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")],
            bootstraps: vec![],
            psk: None,
            backoff: Backoff::default(),
            idle_connection_timeout: Duration::from_secs(120),
            provider_ttl: physarum_core::dht_policy::PROVIDER_RECORD_TTL,
            kad_query_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            kad_rpc_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            pings_to_node: false,
            data_plane_port: Some(0),
            data_plane_dial_timeout: Duration::from_secs(2),
        }
    }
}

impl fmt::Debug for P2pOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2pOptions")
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("listen", &self.listen)
            .field("bootstraps", &self.bootstraps)
            .field("psk", &self.psk.as_ref().map(|_| "<set>"))
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    rr: rr::Behaviour<WireCodec>,
    stream: libp2p_stream::Behaviour,
    tunnels: AcceptStreams,
    keepalives: AcceptStreams,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Cmd {
    Find {
        key: kad::RecordKey,
        timeout: Duration,
        grace: Duration,
        reply: Reply<(Vec<PeerAddr>, FindCost)>,
    },
    Advertise {
        key: kad::RecordKey,
        reply: Reply<()>,
    },
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: Reply<()>,
    },
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: Reply<Response>,
    },
    /// The IP address a connection to `peer` runs over.
    RemoteIp {
        peer: PeerId,
        reply: Reply<IpAddr>,
    },
}

/// Aborts the network's tasks when the last handle goes.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A handle on a running libp2p node. Cheap to clone; implements the runtime's
/// [`Transport`]. The network stops when the last clone is dropped.
#[derive(Clone)]
pub struct P2p {
    cmds: mpsc::UnboundedSender<Cmd>,
    control: libp2p_stream::Control,
    local: PeerId,
    listen_addrs: Arc<Vec<Multiaddr>>,
    peers: Arc<Mutex<BTreeMap<PeerId, Option<Duration>>>>,
    /// How each peer's tunnels are reached.
    routes: Arc<Mutex<Routes>>,
    keys: DirectKeys,
    data_plane: Option<SocketAddr>,
    dial_timeout: Duration,
    /// Tunnel streams opened on peers' data planes, and inside swarm connections.
    opened_direct: Arc<AtomicU64>,
    opened_swarm: Arc<AtomicU64>,
    _tasks: Arc<Tasks>,
}

impl fmt::Debug for P2p {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2p").field("peer_id", &self.local).field("listen_addrs", &self.listen_addrs).finish()
    }
}

fn build_swarm(
    opts: &P2pOptions,
    tunnels: AcceptStreams,
    keepalives: AcceptStreams,
) -> anyhow::Result<Swarm<Behaviour>> {
    let psk = opts.psk.as_deref().map(psk_from_passphrase);
    let handshake_timeout = opts.handshake_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(opts.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            // pnet wraps the raw TCP socket, before Noise; there is no TCP path around it.
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            let maybe_private = tcp.and_then(move |socket, _| async move {
                match psk {
                    Some(psk) => pnet::PnetConfig::new(psk).handshake(socket).await.map(futures::future::Either::Left),
                    None => Ok(futures::future::Either::Right(socket)),
                }
            });
            Ok(maybe_private
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux_config())
                // A wrong PSK can leave the handshake waiting for bytes that never come.
                .timeout(handshake_timeout))
        })?
        .with_behaviour(|key| {
            let local = key.public().to_peer_id();
            let mut kcfg = kad::Config::new(KAD_PROTOCOL);
            kcfg.set_query_timeout(opts.kad_query_timeout);
            kcfg.set_substreams_timeout(opts.kad_rpc_timeout);
            kcfg.set_provider_record_ttl(Some(opts.provider_ttl));
            // The core re-advertises on its own schedule (and on bootstrap reconnects).
            kcfg.set_provider_publication_interval(None);
            kcfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let mut kad = kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kcfg);
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_VERSION.to_string(), key.public())
                    .with_agent_version(format!("physarum/{}", env!("CARGO_PKG_VERSION"))),
            );
            let ping = ping::Behaviour::new(
                ping::Config::new().with_interval(opts.ping_interval).with_timeout(opts.ping_timeout),
            );
            let rr = rr::Behaviour::with_codec(
                WireCodec,
                [(RR_PROTOCOL, ProtocolSupport::Full)],
                rr::Config::default().with_request_timeout(opts.request_timeout),
            );
            Behaviour { kad, identify, ping, rr, stream: libp2p_stream::Behaviour::new(), tunnels, keepalives }
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(opts.idle_connection_timeout)
                .with_substream_upgrade_protocol_override(Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// Peers the address book keeps before it forgets those it is not connected to.
const MAX_BOOK_PEERS: usize = 4096;

/// Streams one connection may carry at once. Past it yamux ends the whole connection,
/// so the runtime keeps its tunnel streams per peer well below this
/// (`RuntimeConfig::max_streams_per_instance` + `max_idle_tunnels` = 320 by default).
pub const YAMUX_MAX_STREAMS: usize = 512;

fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(YAMUX_MAX_STREAMS);
    c
}

impl P2p {
    /// Build the swarm, listen, connect to the bootstraps (all in parallel, with the
    /// backoff of `opts.backoff`) and return once at least one is connected — or an
    /// error once every bootstrap has failed all its start-up attempts. With no
    /// bootstraps (a bootstrap node itself) it returns as soon as it listens. Needs a
    /// tokio runtime; the swarm runs in its own task.
    pub async fn start(opts: P2pOptions) -> anyhow::Result<(P2p, Inbound<TunnelStream>)> {
        let (accept, mut incoming) = AcceptStreams::new(TUNNEL_PROTOCOL);
        let (accept_keepalives, mut keepalives) = AcceptStreams::new(KEEPALIVE_PROTOCOL);
        let mut swarm = build_swarm(&opts, accept, accept_keepalives).context("building the libp2p swarm")?;
        let local = *swarm.local_peer_id();
        for addr in &opts.listen {
            swarm.listen_on(addr.clone()).with_context(|| format!("cannot listen on {addr}"))?;
        }
        // Wait for the listeners to report their addresses.
        let mut listen_addrs = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while listen_addrs.len() < opts.listen.len() {
            match tokio::time::timeout_at(until, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
                Ok(SwarmEvent::ListenerError { error, .. }) => return Err(anyhow!("listener failed: {error}")),
                Ok(SwarmEvent::ListenerClosed { reason: Err(e), addresses, .. }) => {
                    return Err(anyhow!("listener on {addresses:?} closed: {e}"))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // Drain the rest of the addresses reported right away (0.0.0.0 → every interface).
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(20), swarm.next()).await {
            if let SwarmEvent::NewListenAddr { address, .. } = ev {
                listen_addrs.push(address);
            }
        }
        if listen_addrs.is_empty() {
            return Err(anyhow!("no listen address came up"));
        }
        for a in &listen_addrs {
            // Provider records and identify carry these.
            swarm.add_external_address(a.clone());
        }

        let control = swarm.behaviour().stream.new_control();
        let (senders, inbound) = inbound_channel::<TunnelStream>();
        let mut tasks = Vec::new();
        // Inbound tunnels come through our own lossless accept behaviour (see
        // `inbound`); this loop only converts and hands them on.
        let tunnels = senders.tunnels.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.recv().await {
                let t = InboundTunnel { from: core_peer(&peer), stream: tunnel_stream(TunnelIo::Swarm(stream)) };
                if tunnels.send(t).is_err() {
                    break;
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            while let Some((_, stream)) = keepalives.recv().await {
                tokio::spawn(hold_stream(stream));
            }
        }));

        let keys = DirectKeys { keypair: opts.keypair.clone(), psk: opts.psk.as_deref().map(psk_from_passphrase) };
        let data_plane = match opts.data_plane_port {
            Some(port) => {
                let ip = opts.listen.iter().find_map(ip_of).unwrap_or(IpAddr::from([0, 0, 0, 0]));
                let bind = SocketAddr::new(ip, port);
                let (bound, accept) =
                    direct::listen(bind, keys.clone(), opts.handshake_timeout, tunnel_stream, senders.tunnels.clone())
                        .await
                        .with_context(|| format!("cannot listen for tunnels on {bind}"))?;
                tasks.push(tokio::spawn(accept));
                Some(bound)
            }
            None => None,
        };

        let peers = Arc::new(Mutex::new(BTreeMap::new()));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut state = SwarmTask {
            swarm,
            local,
            opts: opts.clone(),
            inbound: senders,
            control: control.clone(),
            peers: peers.clone(),
            book: BTreeMap::new(),
            boots: opts.bootstraps.iter().map(|a| Boot::new(a.clone())).collect(),
            ready: Some(ready_tx),
            finds: HashMap::new(),
            connects: BTreeMap::new(),
            requests: HashMap::new(),
            replies: FuturesUnordered::new(),
            remote_ips: BTreeMap::new(),
            data_plane_port: data_plane.map(|a| a.port()),
        };
        state.start_bootstraps();
        tasks.push(tokio::spawn(state.run(cmd_rx)));
        let p2p = P2p {
            cmds: cmd_tx,
            control,
            local,
            listen_addrs: Arc::new(listen_addrs),
            peers,
            routes: Arc::default(),
            keys,
            data_plane,
            dial_timeout: opts.data_plane_dial_timeout,
            opened_direct: Arc::default(),
            opened_swarm: Arc::default(),
            _tasks: Arc::new(Tasks(tasks)),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok((p2p, inbound)),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(anyhow!("the network task stopped during start-up")),
        }
    }

    /// [`Transport::find_providers`], with what the Kademlia query cost.
    pub async fn find_providers_costed(
        &self,
        key: DhtKey,
        timeout: Duration,
    ) -> Result<(Vec<PeerAddr>, FindCost), String> {
        let grace = physarum_core::dht_policy::find_grace(&key);
        let key = record_key(&key);
        self.call(|reply| Cmd::Find { key, timeout, grace, reply }).await
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.local
    }

    /// The addresses this node listens on (without `/p2p/…`).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.to_vec()
    }

    /// Full dialable addresses (`…/p2p/<peer id>`), e.g. to hand out as bootstraps.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.iter().map(|a| a.clone().with(Protocol::P2p(self.local))).collect()
    }

    /// This node as the core names it, with its listen addresses.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr { peer: core_peer(&self.local), addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect() }
    }

    /// Where this node takes tunnels on connections of their own, if it does.
    pub fn data_plane_addr(&self) -> Option<SocketAddr> {
        self.data_plane
    }

    /// Whether tunnels to `peer` currently go over its data plane (`Some(true)`), the
    /// swarm (`Some(false)`), or are not decided yet (`None`).
    pub fn tunnels_direct_to(&self, peer: &PeerId) -> Option<bool> {
        let mut routes = self.routes.lock().ok()?;
        routes.get(peer, Instant::now()).map(|r| matches!(r, Route::Direct(_)))
    }

    /// The data-plane address of `peer`, asked for once and remembered; `None`: use
    /// the swarm (it has none, or it failed a short while ago).
    async fn data_plane_of(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Option<SocketAddr> {
        let known = self.routes.lock().ok()?.get(&peer, Instant::now());
        match known {
            Some(Route::Direct(addr)) => return Some(addr),
            Some(Route::SwarmUntil(_)) => return None,
            None => {}
        }
        let request = Request::TunnelEndpoint;
        let answer = self.call(|reply| Cmd::Request { peer, addrs, request, reply });
        let port = match tokio::time::timeout(self.dial_timeout, answer).await {
            Ok(Ok(Response::TunnelEndpoint { port })) => port,
            _ => None,
        };
        let ip = match port {
            Some(_) => self.call(|reply| Cmd::RemoteIp { peer, reply }).await.ok(),
            None => None,
        };
        let mut routes = self.routes.lock().ok()?;
        match (ip, port) {
            (Some(ip), Some(port)) => {
                let addr = SocketAddr::new(ip, port);
                routes.set_direct(peer, addr, Instant::now());
                Some(addr)
            }
            _ => {
                routes.fall_back(peer, Instant::now());
                None
            }
        }
    }

    /// Tunnel streams opened so far: (on peers' data planes, inside swarm connections).
    pub fn tunnels_opened(&self) -> (u64, u64) {
        (self.opened_direct.load(Ordering::Relaxed), self.opened_swarm.load(Ordering::Relaxed))
    }

    /// Ask for `peer`'s data plane in the background if its route is not known yet.
    fn learn_data_plane_soon(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let known = self.routes.lock().map(|mut r| r.get(&peer, Instant::now()).is_some()).unwrap_or(true);
        if !known {
            let me = self.clone();
            tokio::spawn(async move { me.data_plane_of(peer, addrs).await });
        }
    }

    /// Peers connected right now, with the last libp2p ping RTT measured to each.
    pub fn connected_peers(&self) -> Vec<(PeerId, Option<Duration>)> {
        self.peers.lock().map(|p| p.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> impl Future<Output = Result<T, String>> + 'static
    where
        T: 'static,
    {
        let (tx, rx) = oneshot::channel();
        let sent = self.cmds.send(make(tx));
        async move {
            sent.map_err(|_| "the network has stopped".to_string())?;
            rx.await.map_err(|_| "the network has stopped".to_string())?
        }
    }
}

/// Keep a stream open until the other side closes it (it keeps the connection alive).
async fn hold_stream(mut stream: libp2p::Stream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn core_peer(p: &PeerId) -> physarum_core::types::PeerId {
    physarum_core::types::PeerId(p.to_string())
}

fn parse_peer(p: &PeerAddr) -> Result<(PeerId, Vec<Multiaddr>), String> {
    let peer: PeerId = p.peer.0.parse().map_err(|e| format!("invalid peer id {:?}: {e}", p.peer.0))?;
    let addrs = p
        .addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .map(|a| match a.iter().last() {
            Some(Protocol::P2p(_)) => a,
            _ => a.with(Protocol::P2p(peer)),
        })
        .collect();
    Ok((peer, addrs))
}

/// The DHT key for one of the core's keys.
pub fn record_key(key: &DhtKey) -> kad::RecordKey {
    let name = match key {
        DhtKey::Service(hash) => format!("/physarum/service/{hash}"),
        DhtKey::Allocators => "/physarum/allocators".to_string(),
        DhtKey::Registry => "/physarum/registry".to_string(),
    };
    kad::RecordKey::new(&name)
}

impl Transport for P2p {
    type Stream = TunnelStream;

    fn local_peer(&self) -> physarum_core::types::PeerId {
        core_peer(&self.local)
    }

    async fn find_providers(&self, key: DhtKey, timeout: Duration) -> Result<Vec<PeerAddr>, String> {
        self.find_providers_costed(key, timeout).await.map(|(found, _)| found)
    }

    async fn advertise(&self, key: DhtKey) -> Result<(), String> {
        let key = record_key(&key);
        self.call(|reply| Cmd::Advertise { key, reply }).await
    }

    async fn probe(&self, peer: PeerAddr, timeout: Duration) -> Result<Duration, String> {
        let (peer, addrs) = parse_peer(&peer)?;
        let until = Instant::now() + timeout;
        let fut = async {
            // Connect first so the RTT is not a dial.
            self.call(|reply| Cmd::Connect { peer, addrs: addrs.clone(), reply }).await?;
            let nonce = rand_nonce();
            let sent = Instant::now();
            let request = Request::Ping { nonce };
            match self.call(|reply| Cmd::Request { peer, addrs: addrs.clone(), request, reply }).await? {
                Response::Pong { nonce: n } if n == nonce => {
                    let rtt = sent.elapsed();
                    // A probed peer is likely tunnelled to next: learn its data plane
                    // now, so the first tunnel does not wait for the extra round trip.
                    self.learn_data_plane_soon(peer, addrs);
                    Ok(rtt)
                }
                other => Err(format!("unexpected answer to a ping: {other:?}")),
            }
        };
        tokio::time::timeout_at(until, fut).await.map_err(|_| "probe timed out".to_string())?
    }

    async fn send_request(&self, peer: PeerAddr, request: Request, timeout: Duration) -> Result<Response, String> {
        let (peer, addrs) = parse_peer(&peer)?;
        let fut = self.call(|reply| Cmd::Request { peer, addrs, request, reply });
        tokio::time::timeout(timeout, fut).await.map_err(|_| "request timed out".to_string())?
    }

    /// On the peer's data plane when it has one, else on the swarm.
    async fn open_tunnel(&self, peer: PeerAddr) -> Result<TunnelStream, String> {
        let (peer, addrs) = parse_peer(&peer)?;
        let connect = addrs.clone();
        self.call(|reply| Cmd::Connect { peer, addrs: connect, reply }).await?;
        if let Some(addr) = self.data_plane_of(peer, addrs).await {
            match direct::dial(&self.keys, addr, peer, self.dial_timeout).await {
                Ok(io) => {
                    self.opened_direct.fetch_add(1, Ordering::Relaxed);
                    return Ok(tunnel_stream(io));
                }
                Err(e) => {
                    tracing::info!(%peer, "tunnels go over the swarm for a while: {e}");
                    if let Ok(mut routes) = self.routes.lock() {
                        routes.fall_back(peer, Instant::now());
                    }
                }
            }
        }
        let mut control = self.control.clone();
        let stream = control.open_stream(peer, TUNNEL_PROTOCOL).await.map_err(|e| format!("opening a tunnel: {e}"))?;
        self.opened_swarm.fetch_add(1, Ordering::Relaxed);
        Ok(tunnel_stream(TunnelIo::Swarm(stream)))
    }
}

pub(crate) fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Only needs to differ between probes; not security relevant.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// A configured bootstrap and its connection state.
struct Boot {
    addr: Multiaddr,
    peer: Option<PeerId>,
    /// Connected, failures, given up: the core's bookkeeping of retries.
    link: BootstrapLink,
    dialing: Option<ConnectionId>,
    next_try: Option<Instant>,
    last_error: String,
}

impl Boot {
    fn new(addr: Multiaddr) -> Self {
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(p)) => Some(p),
            _ => None,
        };
        Boot { addr, peer, link: BootstrapLink::default(), dialing: None, next_try: None, last_error: String::new() }
    }
}

/// What one provider lookup cost, from libp2p-kad's query statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FindCost {
    /// Kademlia requests the query sent (answered, failed or still pending).
    pub requests: u32,
    pub failures: u32,
}

impl FindCost {
    fn of(stats: &kad::QueryStats) -> Self {
        FindCost { requests: stats.num_requests(), failures: stats.num_failures() }
    }
}

struct Find {
    reply: Reply<(Vec<PeerAddr>, FindCost)>,
    /// The query's statistics so far.
    cost: FindCost,
    providers: BTreeSet<PeerId>,
    deadline: Instant,
    /// How long to wait for more answers after the first providers.
    grace_after_first: Duration,
    /// When to stop waiting for more answers (set by the first providers).
    grace: Option<Instant>,
    /// Connecting to the providers found (their addresses are known to Kademlia only
    /// while the query lives, so we dial before finishing it).
    connecting: Option<BTreeSet<PeerId>>,
}

type ReplyFuture = Pin<Box<dyn Future<Output = (ResponseChannel<Response>, Response)> + Send>>;

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    opts: P2pOptions,
    inbound: InboundSenders<TunnelStream>,
    control: libp2p_stream::Control,
    peers: Arc<Mutex<BTreeMap<PeerId, Option<Duration>>>>,
    /// Known addresses per peer (identify, connections, Kademlia).
    book: BTreeMap<PeerId, Vec<Multiaddr>>,
    boots: Vec<Boot>,
    ready: Option<oneshot::Sender<Result<(), String>>>,
    finds: HashMap<QueryId, Find>,
    connects: BTreeMap<PeerId, Vec<Reply<()>>>,
    requests: HashMap<OutboundRequestId, Reply<Response>>,
    replies: FuturesUnordered<ReplyFuture>,
    /// The IP address each connected peer's (first) connection runs over.
    remote_ips: BTreeMap<PeerId, IpAddr>,
    /// Answered to `TunnelEndpoint` requests.
    data_plane_port: Option<u16>,
}

impl SwarmTask {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        // One timer, set to the next deadline of housekeeping (find deadlines and
        // graces, bootstrap retries): an idle node does not wake up at all.
        let far = || Instant::now() + Duration::from_secs(3600);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        loop {
            let due = self.next_housekeeping().unwrap_or_else(far);
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some((channel, response)) = self.replies.next(), if !self.replies.is_empty() => {
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, response);
                }
                event = self.swarm.select_next_some() => self.event(event),
                _ = &mut timer => self.housekeeping(),
            }
        }
    }

    /// When [`SwarmTask::housekeeping`] has something to do next, if ever.
    fn next_housekeeping(&self) -> Option<Instant> {
        let finds = self.finds.values().flat_map(|f| {
            let grace = f.grace.filter(|_| f.connecting.is_none());
            [Some(f.deadline), grace].into_iter().flatten()
        });
        let boots = self.boots.iter().filter(|b| !b.link.is_connected() && b.dialing.is_none() && !b.link.gave_up());
        finds.chain(boots.filter_map(|b| b.next_try)).min()
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Find { key, timeout, grace, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                let deadline = Instant::now() + timeout.saturating_sub(Duration::from_millis(50));
                self.finds.insert(
                    id,
                    Find {
                        reply,
                        cost: FindCost::default(),
                        providers: BTreeSet::new(),
                        deadline,
                        grace_after_first: grace,
                        grace: None,
                        connecting: None,
                    },
                );
            }
            Cmd::Advertise { key, reply } => {
                let r = self.swarm.behaviour_mut().kad.start_providing(key).map(|_| ()).map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Cmd::Connect { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.remember(peer, &addrs);
                self.connects.entry(peer).or_default().push(reply);
                self.dial(peer, addrs);
            }
            Cmd::Request { peer, addrs, request, reply } => {
                self.remember(peer, &addrs);
                let mut addrs = addrs;
                if addrs.is_empty() {
                    addrs = self.book.get(&peer).cloned().unwrap_or_default();
                }
                let id = self.swarm.behaviour_mut().rr.send_request_with_addresses(&peer, request, addrs);
                self.requests.insert(id, reply);
            }
            Cmd::RemoteIp { peer, reply } => {
                let ip = self.remote_ips.get(&peer).copied().ok_or_else(|| format!("not connected to {peer}"));
                let _ = reply.send(ip);
            }
        }
    }

    fn dial(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            addrs = self.book.get(&peer).cloned().unwrap_or_default();
        }
        // Kademlia contributes the addresses it knows (also those a live provider query
        // learnt), which the swarm discards unless asked to extend.
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => {}
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {} // already dialling or connected
            Err(e) => self.connect_done(peer, Err(format!("cannot dial {peer}: {e}"))),
        }
    }

    fn connect_done(&mut self, peer: PeerId, result: Result<(), String>) {
        for reply in self.connects.remove(&peer).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
        let mut done = Vec::new();
        for (id, find) in self.finds.iter_mut() {
            if let Some(connecting) = &mut find.connecting {
                connecting.remove(&peer);
                if connecting.is_empty() {
                    done.push(*id);
                }
            }
        }
        for id in done {
            self.finish_find(id);
        }
    }

    fn remember(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if self.book.len() >= MAX_BOOK_PEERS && !self.book.contains_key(&peer) {
            // Peers we are not connected to go first; Kademlia keeps its own routing table.
            let swarm = &self.swarm;
            self.book.retain(|p, _| swarm.is_connected(p));
        }
        let book = self.book.entry(peer).or_default();
        for a in addrs {
            let a = strip_p2p(a);
            if !book.contains(&a) {
                book.push(a);
            }
        }
        if book.len() > 16 {
            let extra = book.len() - 16;
            book.drain(..extra);
        }
    }

    fn peer_addr(&self, peer: &PeerId) -> PeerAddr {
        PeerAddr {
            peer: core_peer(peer),
            addrs: self.book.get(peer).map(|v| v.iter().map(|a| a.to_string()).collect()).unwrap_or_default(),
        }
    }

    /// Stop a find: dial the providers still unconnected while Kademlia still knows
    /// their addresses, then answer once those dials have ended (or at the deadline).
    fn settle_find(&mut self, id: QueryId) {
        let Some(find) = self.finds.get_mut(&id) else { return };
        if find.connecting.is_some() {
            return;
        }
        let pending: BTreeSet<PeerId> =
            find.providers.iter().filter(|p| !self.swarm.is_connected(p)).copied().collect();
        find.connecting = Some(pending.clone());
        for p in &pending {
            self.dial(*p, vec![]);
        }
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            let cost = FindCost::of(q.stats());
            q.finish();
            if let Some(find) = self.finds.get_mut(&id) {
                find.cost = cost;
            }
        }
        if self.finds.get(&id).and_then(|f| f.connecting.as_ref()).is_some_and(|c| c.is_empty()) {
            self.finish_find(id);
        }
    }

    fn finish_find(&mut self, id: QueryId) {
        let live = self.swarm.behaviour_mut().kad.query_mut(&id).map(|mut q| {
            let cost = FindCost::of(q.stats());
            q.finish();
            cost
        });
        if let Some(find) = self.finds.remove(&id) {
            let found = find.providers.iter().map(|p| self.peer_addr(p)).collect();
            let _ = find.reply.send(Ok((found, live.unwrap_or(find.cost))));
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<QueryId> = self.finds.iter().filter(|(_, f)| f.deadline <= now).map(|(id, _)| *id).collect();
        for id in due {
            self.finish_find(id);
        }
        let graced: Vec<QueryId> = self
            .finds
            .iter()
            .filter(|(_, f)| f.connecting.is_none() && f.grace.is_some_and(|g| g <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in graced {
            self.settle_find(id);
        }
        for i in 0..self.boots.len() {
            let b = &self.boots[i];
            if !b.link.is_connected()
                && b.dialing.is_none()
                && !b.link.gave_up()
                && b.next_try.is_some_and(|t| t <= now)
            {
                self.dial_boot(i);
            }
        }
    }

    fn start_bootstraps(&mut self) {
        if self.boots.is_empty() {
            if let Some(r) = self.ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        for i in 0..self.boots.len() {
            self.dial_boot(i);
        }
    }

    fn dial_boot(&mut self, i: usize) {
        let b = &mut self.boots[i];
        b.next_try = None;
        let opts = match b.peer {
            Some(p) => DialOpts::peer_id(p).addresses(vec![b.addr.clone()]).condition(PeerCondition::Always).build(),
            None => DialOpts::unknown_peer_id().address(b.addr.clone()).build(),
        };
        let id = opts.connection_id();
        b.dialing = Some(id);
        tracing::debug!(addr = %b.addr, "dialling bootstrap");
        if let Err(e) = self.swarm.dial(opts) {
            self.boot_failed(i, e.to_string());
        }
    }

    fn boot_failed(&mut self, i: usize, error: String) {
        let backoff = self.opts.backoff.clone();
        let node_up = self.ready.is_none();
        let b = &mut self.boots[i];
        b.dialing = None;
        b.last_error = error;
        // Start-up gives up after `startup_attempts`; once the node is up (another
        // bootstrap answered) every bootstrap is retried forever.
        match b.link.failed(&backoff, node_up) {
            Retry::GiveUp => {
                let failures = b.link.failures();
                tracing::warn!(addr = %b.addr, "bootstrap unreachable after {failures} attempts: {}", b.last_error);
            }
            Retry::After(delay) => {
                tracing::info!(addr = %b.addr, "bootstrap connection failed ({}); retrying in {delay:?}", b.last_error);
                b.next_try = Some(Instant::now() + delay);
            }
        }
        if physarum_core::dht_policy::startup_failed(self.boots.iter().map(|b| &b.link)) {
            if let Some(r) = self.ready.take() {
                let detail: Vec<String> = self.boots.iter().map(|b| format!("{}: {}", b.addr, b.last_error)).collect();
                let _ = r.send(Err(format!(
                    "could not connect to any bootstrap after {} attempts each ({}); check the addresses \
                     and that every node uses the same private network key (P2P_PSK): a mismatched key \
                     fails the handshake",
                    backoff.startup_attempts,
                    detail.join("; ")
                )));
            }
        }
    }

    fn boot_connected(&mut self, i: usize, peer: PeerId) {
        let b = &mut self.boots[i];
        b.dialing = None;
        b.peer = Some(peer);
        b.next_try = None;
        if !b.link.connected() {
            return;
        }
        let addr = strip_p2p(&b.addr);
        tracing::info!(%peer, %addr, "connected to bootstrap");
        self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
        // Keep the connection open as long as both sides live.
        let mut control = self.control.clone();
        tokio::spawn(async move {
            if let Ok(s) = control.open_stream(peer, KEEPALIVE_PROTOCOL).await {
                hold_stream(s).await;
            }
        });
        let _ = self.inbound.events.send(NetEvent::BootstrapConnected);
        if let Some(r) = self.ready.take() {
            let _ = r.send(Ok(()));
            // Bootstraps that failed start-up are retried from now on.
            let now = Instant::now();
            for b in self.boots.iter_mut() {
                if let Some(delay) = b.link.revive(&self.opts.backoff) {
                    b.next_try = Some(now + delay);
                }
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.remember(peer_id, std::slice::from_ref(address));
                }
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remote_ips.entry(peer_id).or_insert(ip);
                }
                if let Ok(mut p) = self.peers.lock() {
                    p.entry(peer_id).or_insert(None);
                }
                let boot = self.boots.iter().position(|b| b.dialing == Some(connection_id) || b.peer == Some(peer_id));
                if let Some(i) = boot {
                    self.boot_connected(i, peer_id);
                }
                self.connect_done(peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. } => {
                if num_established > 0 {
                    return;
                }
                self.remote_ips.remove(&peer_id);
                if let Ok(mut p) = self.peers.lock() {
                    p.remove(&peer_id);
                }
                let backoff = &self.opts.backoff;
                for b in self.boots.iter_mut().filter(|b| b.peer == Some(peer_id) && b.link.is_connected()) {
                    tracing::warn!(addr = %b.addr, "lost the bootstrap connection ({cause:?}); reconnecting");
                    b.next_try = Some(Instant::now() + b.link.lost(backoff));
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                if let Some(i) = self.boots.iter().position(|b| b.dialing == Some(connection_id)) {
                    self.boot_failed(i, error.to_string());
                }
                if let Some(peer) = peer_id {
                    if !self.swarm.is_connected(&peer) {
                        self.connect_done(peer, Err(format!("cannot connect to {peer}: {error}")));
                    }
                }
            }
            SwarmEvent::NewExternalAddrOfPeer { peer_id, address } => self.remember(peer_id, &[address]),
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
                for a in &info.listen_addrs {
                    if speaks_kad {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                }
                self.remember(peer_id, &info.listen_addrs);
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                if let Ok(mut p) = self.peers.lock() {
                    if let Some(slot) = p.get_mut(&peer) {
                        *slot = Some(rtt);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(ping::Failure::Timeout) }) => {
                tracing::info!(%peer, "no answer to a ping: closing the connection, out of the routing table");
                self.swarm.close_connection(connection);
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::GetProviders(res),
                step,
                stats,
            }) => {
                if let Some(find) = self.finds.get_mut(&id) {
                    find.cost = FindCost::of(&stats);
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = res {
                        let local = self.local;
                        find.providers.extend(providers.into_iter().filter(|p| *p != local));
                        if !find.providers.is_empty() && find.grace.is_none() {
                            find.grace = Some(Instant::now() + find.grace_after_first);
                        }
                    }
                    if step.last {
                        self.settle_find(id);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                self.remember(peer, &addrs);
            }
            BehaviourEvent::Rr(rr::Event::Message { peer, message, .. }) => match message {
                rr::Message::Request { request, channel, .. } => self.inbound_request(peer, request, channel),
                rr::Message::Response { request_id, response } => {
                    if let Some(reply) = self.requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            BehaviourEvent::Rr(rr::Event::OutboundFailure { request_id, error, peer, .. }) => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Err(format!("request to {peer} failed: {error}")));
                }
            }
            BehaviourEvent::Rr(rr::Event::InboundFailure { peer, error, .. }) => {
                tracing::debug!(%peer, "inbound request failed: {error}");
            }
            _ => {}
        }
    }

    fn inbound_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        if let (Request::Ping { nonce }, false) = (&request, self.opts.pings_to_node) {
            let nonce = *nonce;
            // Answered here, so a probe measures the network, not the node loop.
            let _ = self.swarm.behaviour_mut().rr.send_response(channel, Response::Pong { nonce });
            return;
        }
        if let Request::TunnelEndpoint = request {
            let port = self.data_plane_port;
            let _ = self.swarm.behaviour_mut().rr.send_response(channel, Response::TunnelEndpoint { port });
            return;
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.inbound.requests.send(InboundRequest { from: core_peer(&peer), request, reply: tx });
        if sent.is_err() {
            let _ = self
                .swarm
                .behaviour_mut()
                .rr
                .send_response(channel, Response::Error { reason: "the node is shutting down".into() });
            return;
        }
        self.replies.push(Box::pin(async move {
            let response = rx.await.unwrap_or(Response::Error { reason: "the node dropped the request".into() });
            (channel, response)
        }));
    }
}

/// The IP address at the start of a multiaddr (`/ip4/…` or `/ip6/…`).
fn ip_of(a: &Multiaddr) -> Option<IpAddr> {
    match a.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

fn strip_p2p(a: &Multiaddr) -> Multiaddr {
    let mut a = a.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}
