//! Tunnels on connections of their own: the data plane.
//!
//! A tunnel stream on the swarm is a yamux stream, and every write to it goes through
//! its connection's task (yamux framing, then Noise, then the socket): two more task
//! hand-offs and wake-ups per message on each side. The profile put most of a hop's
//! cost there. So each tunnel stream gets a TCP connection of its own to the peer's
//! data-plane listener, secured exactly as the swarm's connections are (pnet when a
//! PSK is set, then Noise with the libp2p identity, under a prologue of our own), and
//! the runtime's task writes straight into it. Discovery, requests and probes stay on
//! the swarm; a peer whose data plane cannot be reached gets swarm streams instead.
//!
//! The dialer learns the listener's port with a `TunnelEndpoint` request on the swarm
//! and dials the IP address its swarm connection to that peer uses; the Noise
//! handshake proves the listener holds the peer's identity key before any byte of a
//! tunnel crosses.

use futures::future::Either;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::{noise, pnet, PeerId};
use physarum_runtime::transport::InboundTunnel;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// Hashed into every data-plane Noise handshake: a peer speaking anything else fails it.
const PROLOGUE: &[u8] = b"/physarum/tunnel-direct/1.0.0";
/// Handshakes in progress on one listener; past it new connections wait in the backlog.
const MAX_HANDSHAKES: usize = 64;
/// Data-plane connections one listener keeps open; past it new ones are closed and
/// their dialers fall back to the swarm.
pub const MAX_DIRECT_CONNECTIONS: usize = 4096;
/// Peers whose data-plane route a node remembers.
const MAX_ROUTES: usize = 4096;
/// How long a peer whose data plane failed is reached over the swarm before trying again.
const SWARM_FALLBACK: Duration = Duration::from_secs(30);
/// A data-plane connection whose peer went away without a word (host down, cable
/// cut) is found out by TCP keepalive after about this long plus a few probes, so it
/// gives its slot back. The swarm's connections have libp2p ping for this.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

type Plain = Compat<TcpStream>;
type Private = Either<pnet::PnetOutput<Plain>, Plain>;
/// An established, authenticated data-plane connection.
pub type DirectIo = noise::Output<Private>;

/// What both ends secure a data-plane connection with.
#[derive(Clone)]
pub(crate) struct DirectKeys {
    pub keypair: Keypair,
    pub psk: Option<pnet::PreSharedKey>,
}

impl DirectKeys {
    /// pnet (when a PSK is set), then Noise; the peer id the remote proved.
    async fn secure(&self, socket: TcpStream, dialer: bool) -> Result<(PeerId, DirectIo), String> {
        let _ = socket.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive);
        let socket = socket.compat();
        let socket = match self.psk {
            Some(psk) => Either::Left(
                pnet::PnetConfig::new(psk).handshake(socket).await.map_err(|e| format!("private network: {e}"))?,
            ),
            None => Either::Right(socket),
        };
        let noise =
            noise::Config::new(&self.keypair).map_err(|e| format!("noise: {e}"))?.with_prologue(PROLOGUE.to_vec());
        let secured = if dialer {
            noise.upgrade_outbound(socket, "/noise").await
        } else {
            noise.upgrade_inbound(socket, "/noise").await
        };
        secured.map_err(|e| format!("noise handshake: {e}"))
    }
}

/// A tunnel stream: a yamux stream on the swarm, or a data-plane connection (which
/// holds its slot in the listener's connection limit while it lives).
pub enum TunnelIo {
    Swarm(libp2p::Stream),
    Direct { io: Box<DirectIo>, _slot: Option<OwnedSemaphorePermit> },
}

impl std::fmt::Debug for TunnelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TunnelIo::Swarm(_) => "TunnelIo::Swarm",
            TunnelIo::Direct { .. } => "TunnelIo::Direct",
        })
    }
}

impl TunnelIo {
    /// Whether this stream runs on a data-plane connection of its own.
    pub fn is_direct(&self) -> bool {
        matches!(self, TunnelIo::Direct { .. })
    }
}

impl futures::AsyncRead for TunnelIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::Swarm(s) => Pin::new(s).poll_read(cx, buf),
            TunnelIo::Direct { io, .. } => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl futures::AsyncWrite for TunnelIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::Swarm(s) => Pin::new(s).poll_write(cx, buf),
            TunnelIo::Direct { io, .. } => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelIo::Swarm(s) => Pin::new(s).poll_flush(cx),
            TunnelIo::Direct { io, .. } => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelIo::Swarm(s) => Pin::new(s).poll_close(cx),
            TunnelIo::Direct { io, .. } => Pin::new(io.as_mut()).poll_close(cx),
        }
    }
}

/// Dial `peer`'s data plane at `addr`: TCP, pnet, Noise, all within `timeout`, and
/// only if the listener proves it is `peer`.
pub(crate) async fn dial(
    keys: &DirectKeys,
    addr: SocketAddr,
    peer: PeerId,
    timeout: Duration,
) -> Result<TunnelIo, String> {
    let fut = async {
        let socket = TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (proved, io) = keys.secure(socket, true).await?;
        if proved != peer {
            return Err(format!("{addr} answered as {proved}, not {peer}"));
        }
        Ok(TunnelIo::Direct { io: Box::new(io), _slot: None })
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| format!("data plane at {addr}: timed out"))?
}

/// Listen for data-plane connections on `bind`; each one that completes its
/// handshake within `handshake_timeout` goes to `deliver` as an inbound tunnel.
/// Returns the bound address and the accept loop (run it on a task).
pub(crate) async fn listen<S: Send + 'static>(
    bind: SocketAddr,
    keys: DirectKeys,
    handshake_timeout: Duration,
    wrap: fn(TunnelIo) -> S,
    deliver: mpsc::UnboundedSender<InboundTunnel<S>>,
) -> io::Result<(SocketAddr, impl std::future::Future<Output = ()> + Send)> {
    let listener = TcpListener::bind(bind).await?;
    let local = listener.local_addr()?;
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_DIRECT_CONNECTIONS));
    let accept_loop = async move {
        loop {
            let Ok(handshake) = handshakes.clone().acquire_owned().await else { return };
            let socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("data plane: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                tracing::warn!("data plane: {MAX_DIRECT_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let keys = keys.clone();
            let deliver = deliver.clone();
            tokio::spawn(async move {
                let secured = tokio::time::timeout(handshake_timeout, keys.secure(socket, false)).await;
                drop(handshake);
                match secured {
                    Ok(Ok((from, io))) => {
                        let stream = wrap(TunnelIo::Direct { io: Box::new(io), _slot: Some(slot) });
                        let from = physarum_core::types::PeerId(from.to_base58());
                        let _ = deliver.send(InboundTunnel { from, stream });
                    }
                    Ok(Err(e)) => tracing::debug!("data plane: handshake failed: {e}"),
                    Err(_) => tracing::debug!("data plane: handshake timed out"),
                }
            });
        }
    };
    Ok((local, accept_loop))
}

/// How a dialer reaches each peer's tunnels: its data-plane address, or the swarm
/// for a while after the data plane failed. Bounded.
#[derive(Default)]
pub(crate) struct Routes(BTreeMap<PeerId, Route>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Direct(SocketAddr),
    SwarmUntil(Instant),
}

impl Routes {
    /// The route to `peer` if one is known and still current.
    pub fn get(&mut self, peer: &PeerId, now: Instant) -> Option<Route> {
        match self.0.get(peer) {
            Some(Route::SwarmUntil(until)) if *until <= now => {
                self.0.remove(peer);
                None
            }
            found => found.copied(),
        }
    }

    pub fn set_direct(&mut self, peer: PeerId, addr: SocketAddr, now: Instant) {
        self.insert(peer, Route::Direct(addr), now);
    }

    /// Reach `peer` over the swarm for a while.
    pub fn fall_back(&mut self, peer: PeerId, now: Instant) {
        self.insert(peer, Route::SwarmUntil(now + SWARM_FALLBACK), now);
    }

    fn insert(&mut self, peer: PeerId, route: Route, now: Instant) {
        if self.0.len() >= MAX_ROUTES && !self.0.contains_key(&peer) {
            self.0.retain(|_, r| !matches!(r, Route::SwarmUntil(until) if *until <= now));
            if self.0.len() >= MAX_ROUTES {
                // Forgetting a route costs one more endpoint request later, nothing else.
                self.0.pop_first();
            }
        }
        self.0.insert(peer, route);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn a_fallback_expires_and_the_table_stays_bounded() {
        let mut routes = Routes::default();
        let now = Instant::now();
        let p = peer();
        routes.fall_back(p, now);
        assert_eq!(routes.get(&p, now), Some(Route::SwarmUntil(now + SWARM_FALLBACK)));
        assert_eq!(routes.get(&p, now + SWARM_FALLBACK), None, "the data plane is tried again");
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for _ in 0..MAX_ROUTES + 10 {
            routes.set_direct(peer(), addr, now);
        }
        assert_eq!(routes.len(), MAX_ROUTES);
    }

    fn keys() -> DirectKeys {
        DirectKeys { keypair: Keypair::generate_ed25519(), psk: None }
    }

    async fn listener(keys: DirectKeys) -> (SocketAddr, mpsc::UnboundedReceiver<InboundTunnel<TunnelIo>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (addr, accept) =
            listen("127.0.0.1:0".parse().unwrap(), keys, Duration::from_secs(2), |io| io, tx).await.unwrap();
        tokio::spawn(accept);
        (addr, rx)
    }

    #[tokio::test]
    async fn bytes_cross_an_authenticated_connection() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let (server, client) = (keys(), keys());
        let server_id = server.keypair.public().to_peer_id();
        let (addr, mut inbound) = listener(server).await;
        let mut out = dial(&client, addr, server_id, Duration::from_secs(2)).await.unwrap();
        out.write_all(b"hello").await.unwrap();
        out.flush().await.unwrap();
        let InboundTunnel { from, mut stream } = inbound.recv().await.unwrap();
        assert_eq!(from.0, client.keypair.public().to_peer_id().to_base58(), "the dialer's identity is proved");
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_listener_with_another_identity_is_refused() {
        let (server, client) = (keys(), keys());
        let (addr, _inbound) = listener(server).await;
        let err = dial(&client, addr, peer(), Duration::from_secs(2)).await.unwrap_err();
        assert!(err.contains("answered as"), "{err}");
    }

    #[tokio::test]
    async fn a_dialer_without_the_network_key_gets_no_tunnel() {
        let psk = |b| Some(pnet::PreSharedKey::new([b; 32]));
        let server = DirectKeys { psk: psk(1), ..keys() };
        let client = DirectKeys { psk: psk(2), ..keys() };
        let server_id = server.keypair.public().to_peer_id();
        let (addr, mut inbound) = listener(server).await;
        assert!(dial(&client, addr, server_id, Duration::from_secs(2)).await.is_err());
        let same = DirectKeys { psk: psk(1), ..keys() };
        dial(&same, addr, server_id, Duration::from_secs(2)).await.expect("the right key gets through");
        let first = inbound.recv().await.unwrap();
        assert_eq!(first.from.0, same.keypair.public().to_peer_id().to_base58(), "only the right key's tunnel arrives");
    }
}
