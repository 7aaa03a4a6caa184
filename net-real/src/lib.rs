//! physarum-net-real: the production runtime (libp2p + hyper) around the core's `Node`.
//!
//! Public API for the binaries:
//! - [`P2p::start`]`(`[`P2pOptions`]`) -> (P2p, Inbound<TunnelStream>)`: builds the swarm
//!   (TCP + pnet when `psk` is set + Noise + Yamux; Kademlia server mode on
//!   `/physarum/kad/1.0.0`; identify; ping; request-response with the wire codec),
//!   the data plane (`direct`: each tunnel on a TCP connection of its own, pnet +
//!   Noise with the node's identity, at `P2pOptions::data_plane_port`; tunnels to
//!   peers without one go as libp2p-stream streams, accepted by our own lossless
//!   behaviour, see `inbound`), listens, connects to the bootstraps (in parallel, backoff
//!   2, 4, 8, 16 s, then an error naming each bootstrap; later drops reconnect forever,
//!   at most 512 s apart) and returns once one is connected. `P2p` is a cloneable handle
//!   implementing [`physarum_runtime::Transport`]; [`P2p::peer_id`],
//!   [`P2p::listen_addrs`], [`P2p::dial_addrs`] (with `/p2p/<id>`), [`P2p::peer_addr`]
//!   for logs and for handing out; [`P2p::connected_peers`] (with ping RTTs) for the
//!   bootstrap's metrics. The network stops when the last clone is dropped.
//! - [`run_node`]: the whole daemon on the current task — `P2p` + the shared
//!   runtime's node loop, tunnel server and (optionally) the HTTP front end. Call it on
//!   a tokio current_thread runtime; it sets up its own `LocalSet`.
//! - [`psk_from_passphrase`]: SHA3-256 of the passphrase → the 32-byte pnet key.
//!
//! RTT probes are a `wire::Request::Ping` over request-response on the connection
//! requests use, answered by the swarm task itself: on demand, with the core's own
//! timeout (libp2p ping only measures on its own schedule per connection, so a hard
//! violation would be seen up to an interval late). Measured on loopback (release,
//! `cargo test --release -p physarum-net-real --test e2e -- --ignored --nocapture`):
//! p50 227 µs vs ~100 µs for a libp2p ping — a new substream per probe.
//!
//! Lower level, for custom wiring: `physarum_runtime::NodeRuntime::new(config, seed,
//! p2p.clone(), inbound, runtime_config)….spawn()` inside a `LocalSet`.

mod codec;
mod direct;
mod event_log;
mod inbound;
mod p2p;
mod run;

pub use codec::{WireCodec, RR_PROTOCOL};
pub use direct::{TunnelIo, MAX_DIRECT_CONNECTIONS};
pub use p2p::{
    psk_from_passphrase, record_key, Backoff, FindCost, P2p, P2pOptions, TunnelStream, IDENTIFY_VERSION, KAD_PROTOCOL,
    KEEPALIVE_PROTOCOL, TUNNEL_PROTOCOL,
};
pub use run::{run_node, NodeOptions};

// Owned by the binaries/driver engineer:
pub mod driver;
pub mod keyfile;
pub mod metrics;
pub mod ports;
