//! physarum-runtime: what both runtimes share beyond the core — the node loop that
//! executes the core's outputs, the hyper front end and the tunnel (client pool and
//! server) — generic over the network. Used by `physarum-net-real` (libp2p) and
//! `physarum-net-sim` (turmoil). Nothing here needs `Send`: run it on a tokio
//! current_thread runtime inside a `LocalSet` (production) or in a turmoil host.
//!
//! Implement the traits of [`transport`] for a network ([`Transport`]: find providers,
//! advertise, probe, send a request, open a tunnel stream; inbound requests, tunnels
//! and events arrive through [`inbound_channel`]), then:
//! ```ignore
//! let (senders, inbound) = transport::inbound_channel();   // senders → your network
//! let mut running = NodeRuntime::new(node_config, seed, my_transport, inbound, RuntimeConfig::default())
//!     .with_driver(driver)          // allocator only (InstanceDriver)
//!     .with_app(TcpConnector(addr)) // service mode only (node_config.serve is Some); any Connector
//!     .with_observer(observer)      // metrics / trace (Observer: inputs, outputs, events, persist, requests)
//!     .spawn();                     // node loop + tunnel server, as spawn_local tasks
//! running.serve_http(listener);     // the front end, on any Listener (tokio or turmoil TCP)
//! let handle = running.handle();    // NodeHandle: feed inputs, ask for routes
//! // dropping `running` stops every task it started
//! ```
//!
//! - Node loop ([`node_loop`]): core time = `tokio::time::Instant` since spawn; each
//!   find/probe/send/advertise/driver call runs in its own task and comes back as an
//!   input, so routing never waits behind them; `biased` selects, ordered maps only.
//! - Front end: `METHOD /<service>/<rest>?<query>` → `Input::HttpRequest` (deadline
//!   [`RuntimeConfig::request_deadline`]) → `Route`: forwarded with hop-by-hop headers
//!   removed and bodies streamed both ways; failure → `Input::RouteFailed` + 502;
//!   `Fail` → that status, text/plain reason; no service segment → 400.
//! - Tunnel ([`tunnel`]): a pool of long-lived HTTP/1.1 keep-alive streams per
//!   (peer, service), each opened with `TunnelHello`/`TunnelAck`; see that module for
//!   why. Service side: hello checked against the served name, HTTP served on the
//!   stream, each request forwarded to the app through the [`Connector`] and reported
//!   as `Input::TunnelServed`.
mod app_check;
mod front;
pub mod http;
pub mod l4;
mod limits;
mod link;
pub mod node_loop;
mod relay;
pub mod transport;
pub mod tunnel;

pub use front::{forward_path, split_path};
pub use l4::L4Config;
pub use node_loop::{NodeHandle, NodeRuntime, Running, RuntimeConfig, ServingRequest};
pub use transport::{
    inbound_channel, ByteStream, Connector, ExitSink, Inbound, InboundRequest, InboundSenders, InboundTunnel,
    InstanceDriver, Listener, NetEvent, NoApp, NoDriver, Observer, TcpConnector, Transport,
};
#[cfg(test)]
mod tests;
