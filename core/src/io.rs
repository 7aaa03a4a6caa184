//! The `Node` machine's inputs and outputs: the whole contract between the core and
//! a runtime. The runtime feeds [`Input`]s, executes [`Output`]s and reports each
//! operation's result back as [`Input::OpDone`]. Bodies of HTTP requests and
//! responses never pass through here.

use crate::time::Instant;
use crate::trust::{Credentials, SignedEntry};
use crate::types::{ContentHash, DhtKey, InboundId, InstanceId, OpId, PeerAddr, PeerId, ReqId, ServiceInfo};
use crate::wire::{Request, Response};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Nothing but time passing: a deadline from `poll_timeout` may have come.
    Tick,
    /// A client asked the front end for `service` (the first path segment). The
    /// core answers with exactly one [`Output::Respond`] for `req`, no later than
    /// `deadline`.
    HttpRequest { req: ReqId, service: String, deadline: Instant },
    /// Forwarding a routed request to `peer` failed; the peer is evicted.
    RouteFailed { service: ContentHash, peer: PeerId, reason: String },
    /// An instance of `service` showed no valid credentials before any request byte
    /// was sent: it is evicted and not chosen again.
    Untrusted { service: ContentHash, peer: PeerId, reason: String },
    /// Service mode: the sidecar began serving a tunnelled request (the instance is
    /// busy until the matching [`Input::TunnelDone`]).
    TunnelServed,
    /// Service mode: a tunnelled request ended (its response sent or abandoned); idle
    /// time counts from the end of the last one.
    TunnelDone,
    /// Service mode: the sidecar checked whether its application answers.
    AppChecked { answered: bool },
    /// A try of a routed request failed before any of its response reached the client,
    /// and the request may be sent again: the core routes it anew (to another
    /// instance; `peer` has been reported with [`Input::RouteFailed`]) if its retry
    /// budget allows, and answers with one [`Output::Respond`] for `req` as for
    /// [`Input::HttpRequest`].
    HttpRetry { req: ReqId, service: String, deadline: Instant },
    /// A peer sent us a request; answer with [`Output::ReplyToPeer`] naming `id`.
    PeerRequest { id: InboundId, from: PeerId, request: Request },
    /// The result of an operation the core asked for. Every `OpId` the core hands
    /// out may be answered at most once; late or unknown answers are ignored (the
    /// core enforces each operation's timeout itself).
    OpDone { op: OpId, result: OpResult },
    /// A bootstrap connection came up (first time or after a loss): advertise again.
    BootstrapConnected,
    /// Allocator: the driver started an instance; it is reachable as `peer`.
    InstanceStarted { instance: InstanceId, peer: PeerAddr },
    /// Allocator: the driver could not start the instance.
    InstanceFailed { instance: InstanceId, reason: String },
    /// Allocator: a running instance exited on its own.
    InstanceExited { instance: InstanceId },
    /// Allocator: an instance an earlier run of this allocator started is still
    /// running (found by the driver at start-up); track it as if started now.
    InstanceAdopted { instance: InstanceId, service: ServiceInfo, peer: PeerAddr },
}

/// The result of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// [`Output::FindProviders`]: the providers found (possibly none).
    Providers(Vec<PeerAddr>),
    /// [`Output::Probe`]: the measured round-trip time.
    Rtt(Duration),
    /// [`Output::SendRequest`]: the peer's answer.
    Response(Response),
    /// Any operation: it failed (unreachable, refused, timed out, malformed answer).
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The one answer to client request `req`.
    Respond { req: ReqId, outcome: Outcome },
    /// Look up who provides `key` in the DHT; answer with `OpResult::Providers`.
    FindProviders { op: OpId, key: DhtKey, timeout: Duration },
    /// Measure the RTT to `peer` (dialling it at its addresses if need be).
    Probe { op: OpId, peer: PeerAddr, timeout: Duration },
    /// Send `request` to `peer`; answer with `OpResult::Response`.
    SendRequest { op: OpId, peer: PeerAddr, request: Request, timeout: Duration },
    /// Answer the peer request `id`.
    ReplyToPeer { id: InboundId, response: Response },
    /// Announce in the DHT that this node provides `key`. Repeated periodically.
    Advertise { key: DhtKey },
    /// Allocator: start an instance of `service` (what to run comes from the registry).
    StartInstance { instance: InstanceId, service: ServiceInfo },
    /// Allocator: stop and remove the instance.
    StopInstance { instance: InstanceId },
    /// Registry: the store's full contents after a change; persist them.
    PersistRegistry { entries: Vec<SignedEntry> },
    /// Service mode: show these credentials to clients (in every `TunnelAck`) from now on.
    ServeCredentials { credentials: Credentials },
    /// Something worth counting or tracing happened.
    Event(Event),
}

/// How a client request ends, as far as the core is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the request to this instance of `service`; a try that has no response
    /// head within `try_timeout` has failed (the instance is stalled).
    Route { instance: PeerAddr, service: ContentHash, try_timeout: Duration },
    /// Answer the client with this status and plain-text reason.
    Fail { status: u16, reason: String },
}

/// Notable happenings, for metrics and simulation traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A request was routed from the peer cache without discovery.
    CacheHit { service: String, instance: PeerId },
    /// A find-or-allocate round ended (successfully or not) after `took`.
    DiscoveryFinished { service: String, took: Duration, allocated: bool, found: bool },
    /// An allocator started an instance for us.
    Allocated { service: String, allocator: PeerId, instance: PeerId },
    /// An allocator refused a start request.
    AllocationRefused { service: String, allocator: PeerId, reason: String },
    /// A peer failed the trust check and will not be chosen again for a while.
    Untrusted { service: ContentHash, peer: PeerId, reason: String },
    /// A cached peer was dropped.
    Evicted { service: ContentHash, peer: PeerId, reason: String },
    /// A request is routed again after a failed try.
    Retried { service: String },
    /// A retry was refused: the retry budget is spent.
    RetryRefused { service: String },
    /// Service mode: the application stopped or started answering.
    AppHealth { service: String, answering: bool },
    /// A cached peer violated the soft limit for longer than the grace.
    SeekBetter { service: ContentHash, peer: PeerId },
    /// A better instance replaced a soft-violating one.
    Switched { service: ContentHash, from: PeerId, to: PeerId },
    /// A probe answered (`rtt: None`: lost).
    Probed { peer: PeerId, rtt: Option<Duration> },
    /// Allocator: an instance is being started.
    InstanceStarting { instance: InstanceId, service: String },
    /// Allocator: an instance is up.
    InstanceUp { instance: InstanceId, service: String, peer: PeerId },
    /// Allocator: an instance was stopped for idleness or a failed idle query.
    InstanceCulled { instance: InstanceId, service: String, reason: String },
    /// Allocator: an instance went away (exited, failed to start).
    InstanceGone { instance: InstanceId, service: String, reason: String },
}
