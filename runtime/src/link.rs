//! One downstream link of an L4 session, driven by the core's [`Link`] machine: the
//! set-up of the rest of the chain, probes of the next hop every second with its
//! hard limit as timeout, and repair when it fails, while the upstream side (the
//! client's socket, or the previous hop's stream) stays.
//!
//! Two pumps move data across the link: *feed* (what goes down: the client's data,
//! or this hop's application's output) and *back* (what comes up from the next
//! hop). The upstream ends live in shared slots so that a repair can drop the pumps
//! of the failed link and start new ones on the same ends. The back pump is only
//! stopped between chunks, never within a write upstream (a partial write would
//! corrupt the stream the client still holds).
//!
//! *In flight* (what decides between repair and reset for TCP, see
//! [`physarum_core::chain`]): bytes went down since bytes last came back.

use crate::l4::{open_session, L4Ctx, Session, SetupFailure};
use crate::relay::{Rx, Tx};
use crate::transport::Transport;
use physarum_core::chain::{Link, LinkConfig, LinkInput, LinkOutput, Placed, SetupError};
use physarum_core::time::Instant;
use physarum_core::types::{ContentHash, PeerAddr};
use physarum_core::wire::{HopChoice, L4Hop, MAX_DATAGRAM};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};

/// How long a repair waits for the back pump to finish a write upstream.
const BACK_STOP_WAIT: Duration = Duration::from_secs(2);
/// The hard limit used when the core knows none for the next hop's service.
const DEFAULT_HARD: Duration = Duration::from_secs(1);

/// How a linked session ended.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// Both directions ended, or the upstream left.
    Done,
    /// The chain could not be placed or replaced.
    Failed(SetupFailure),
    /// TCP data was in flight when the next hop failed: reset the upstream.
    Reset(String),
}

/// A link whose first set-up succeeded: what the caller answers upstream with,
/// before [`Linked::relay`] moves the data.
pub(crate) struct Linked<S> {
    link: Link,
    session: Session<S>,
    started: tokio::time::Instant,
}

impl<S> Linked<S> {
    pub fn hops(&self) -> &[HopChoice] {
        &self.session.hops
    }
}

fn core_time(started: tokio::time::Instant) -> Instant {
    Instant::from_micros(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
}

fn placed<S, T: Transport>(ctx: &L4Ctx<T>, rest: &[L4Hop], s: &Session<S>) -> Placed {
    let hard = ctx.handle.hard_limit(&rest[0].service).unwrap_or(DEFAULT_HARD);
    Placed { peer: s.instance.peer.clone(), hops: s.hops.clone(), hard }
}

fn setup_error(f: SetupFailure) -> SetupError {
    SetupError { hop: f.hop, service: f.service, status: f.status, reason: f.reason }
}

fn setup_failure(e: SetupError) -> SetupFailure {
    SetupFailure { hop: e.hop, service: e.service, status: e.status, reason: e.reason }
}

/// Set up `rest` (at least one hop) under a new link machine: attempts and retries
/// as it decides, all within the set-up timeout. The first success, or why the
/// chain cannot be placed.
pub(crate) async fn first_setup<T: Transport>(
    ctx: &L4Ctx<T>,
    rest: &[L4Hop],
    config: LinkConfig,
) -> Result<Linked<T::Stream>, SetupFailure> {
    let started = tokio::time::Instant::now();
    let deadline = started + ctx.config.setup_timeout;
    let mut link = Link::new(config, rest[0].proto);
    loop {
        let mut asked = false;
        while let Some(out) = link.poll_output() {
            match out {
                LinkOutput::Setup { .. } => asked = true,
                LinkOutput::Ready { .. } => {}
                LinkOutput::Failed(e) => return Err(setup_failure(e)),
                other => tracing::debug!("unexpected before set-up: {other:?}"),
            }
        }
        if asked {
            let result = open_session(ctx, rest, deadline).await;
            let now = core_time(started);
            match result {
                Ok(session) => {
                    link.handle_input(now, LinkInput::SetupDone(Ok(placed(ctx, rest, &session))));
                    // Drain the `Ready`.
                    while link.poll_output().is_some() {}
                    return Ok(Linked { link, session, started });
                }
                Err(f) => link.handle_input(now, LinkInput::SetupDone(Err(setup_error(f)))),
            }
            continue;
        }
        match link.poll_timeout() {
            Some(at) => {
                let wait = Duration::from_micros(at.as_micros().saturating_sub(core_time(started).as_micros()));
                if tokio::time::Instant::now() + wait >= deadline {
                    let reason = format!("not placed within the set-up timeout ({:?})", ctx.config.setup_timeout);
                    return Err(SetupFailure { hop: 0, service: rest[0].service.clone(), status: 504, reason });
                }
                tokio::time::sleep(wait).await;
                link.handle_input(core_time(started), LinkInput::Tick);
            }
            None => {
                let reason = "the chain set-up stopped without an answer".to_string();
                return Err(SetupFailure { hop: 0, service: rest[0].service.clone(), status: 500, reason });
            }
        }
    }
}

/// Data in flight towards the next hop: bytes went down since bytes last came back.
#[derive(Default)]
struct Traffic {
    in_flight: Cell<bool>,
    /// The back pump is writing upstream (it must not be stopped now).
    writing_back: Cell<bool>,
}

#[derive(Debug)]
enum PumpEnd {
    /// The source ended and the end was passed to the sink.
    Ended,
    /// Reading the source failed.
    SourceFailed(String),
    /// Writing the sink failed.
    SinkFailed(String),
    /// Stopped for a repair.
    Stopped,
}

type PumpFuture = Pin<Box<dyn Future<Output = PumpEnd>>>;
type SetupFuture<'a, S> = Pin<Box<dyn Future<Output = Result<Session<S>, SetupFailure>> + 'a>>;
/// A probe's id and its RTT (`None`: no answer in time).
type ProbeFuture = Pin<Box<dyn Future<Output = (u64, Option<Duration>)>>>;

async fn pending_or<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The feed pump: the upstream side's source into the next hop's stream.
async fn feed_pump(src: Rc<Mutex<Rx>>, mut down: Tx, max: usize, traffic: Rc<Traffic>) -> PumpEnd {
    let mut buf = vec![0u8; 128 * 1024];
    let mut src = src.lock().await;
    loop {
        let n = match src.next(&mut buf, max).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                down.finish().await;
                return PumpEnd::Ended;
            }
            Err(e) => return PumpEnd::SourceFailed(e.to_string()),
        };
        traffic.in_flight.set(true);
        if let Err(e) = down.send(&buf[..n]).await {
            return PumpEnd::SinkFailed(e.to_string());
        }
        if let Err(e) = down.flush().await {
            return PumpEnd::SinkFailed(e.to_string());
        }
    }
}

/// The back pump: the next hop's stream to the upstream side; stops between chunks
/// when `stop` is set. The end of the next hop's stream is reported, not passed on
/// (the link machine decides).
async fn back_pump(mut down: Rx, dst: Rc<Mutex<Tx>>, traffic: Rc<Traffic>, mut stop: watch::Receiver<bool>) -> PumpEnd {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return PumpEnd::Stopped,
            r = down.next(&mut buf, MAX_DATAGRAM.max(128 * 1024)) => r,
        };
        let n = match read {
            Ok(Some(n)) => n,
            Ok(None) => return PumpEnd::Ended,
            Err(e) => return PumpEnd::SourceFailed(e.to_string()),
        };
        traffic.in_flight.set(false);
        traffic.writing_back.set(true);
        let mut dst = dst.lock().await;
        let written = match dst.send(&buf[..n]).await {
            Ok(()) => dst.flush().await,
            Err(e) => Err(e),
        };
        traffic.writing_back.set(false);
        if let Err(e) = written {
            return PumpEnd::SinkFailed(e.to_string());
        }
    }
}

impl<S: crate::transport::ByteStream> Linked<S> {
    /// Move data across the link until the session ends, repairing the link when
    /// the next hop fails. `feed`/`feed_max`: the upstream side's source and the most
    /// a chunk of it may carry; `back`: where the next hop's data goes.
    pub async fn relay<T: Transport<Stream = S>>(self, ctx: &L4Ctx<T>, rest: &[L4Hop], feed: Rx, back: Tx) -> LinkEnd {
        let Linked { mut link, session, started } = self;
        let proto = rest[0].proto;
        let feed_max = if matches!(proto, physarum_core::wire::L4Proto::Udp) { MAX_DATAGRAM } else { 128 * 1024 };
        let feed = Rc::new(Mutex::new(feed));
        let back = Rc::new(Mutex::new(back));
        let traffic = Rc::new(Traffic::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let Session { stream, instance, hash, place, .. } = session;
        let mut current: (PeerAddr, ContentHash) = (instance, hash);
        // The stream's place under the instance's limit, held while it is in use.
        let mut _place = Some(place);
        let mut feed_run: Option<PumpFuture>;
        let mut back_run: Option<PumpFuture>;
        let mut feed_done = false;
        let start_pumps = |stream: S, traffic: &Rc<Traffic>| -> (PumpFuture, PumpFuture) {
            let (down_rx, down_tx) = crate::relay::stream_ends(stream, proto);
            let f: PumpFuture = Box::pin(feed_pump(feed.clone(), down_tx, feed_max, traffic.clone()));
            let b: PumpFuture = Box::pin(back_pump(down_rx, back.clone(), traffic.clone(), stop_rx.clone()));
            (f, b)
        };
        {
            let (f, b) = start_pumps(stream, &traffic);
            feed_run = Some(f);
            back_run = Some(b);
        }
        let mut setup: Option<SetupFuture<'_, S>> = None;
        let mut probe: Option<ProbeFuture> = None;
        let mut placed_session: Option<Session<S>> = None;
        loop {
            while let Some(out) = link.poll_output() {
                match out {
                    LinkOutput::Setup { .. } => {
                        let deadline = tokio::time::Instant::now() + ctx.config.setup_timeout;
                        setup = Some(Box::pin(open_session(ctx, rest, deadline)));
                    }
                    LinkOutput::Probe { id, timeout, .. } => {
                        let transport = ctx.pool.transport().clone();
                        let peer = current.0.clone();
                        probe = Some(Box::pin(async move { (id, transport.probe(peer, timeout).await.ok()) }));
                    }
                    LinkOutput::Evict { peer, reason } => {
                        tracing::warn!(%peer, "L4 chain: next hop {} failed: {reason}", rest[0].service);
                        ctx.handle.route_failed(current.1.clone(), peer, reason);
                        feed_run = None;
                        probe = None;
                        // Let the back pump finish a write upstream first.
                        if let Some(mut b) = back_run.take() {
                            let _ = stop_tx.send(true);
                            if traffic.writing_back.get() {
                                let _ = tokio::time::timeout(BACK_STOP_WAIT, &mut b).await;
                            }
                            let _ = stop_tx.send(false);
                        }
                        _place = None;
                    }
                    LinkOutput::Ready { repaired, hops } => {
                        if let Some(s) = placed_session.take() {
                            if repaired {
                                let chosen: Vec<String> =
                                    hops.iter().map(|h| format!("{}={}", h.service, h.instance)).collect();
                                tracing::info!("L4 chain repaired: now {}", chosen.join(","));
                            }
                            let Session { stream, instance, hash, place, .. } = s;
                            current = (instance, hash);
                            _place = Some(place);
                            traffic.in_flight.set(false);
                            // A feed that had ended ends again at once, passing its end on.
                            let (f, b) = start_pumps(stream, &traffic);
                            feed_run = Some(f);
                            back_run = Some(b);
                        }
                    }
                    LinkOutput::EndUpstream => {
                        back.lock().await.finish().await;
                        if feed_done {
                            return LinkEnd::Done;
                        }
                    }
                    LinkOutput::Reset { reason } => return LinkEnd::Reset(reason),
                    LinkOutput::Failed(e) => return LinkEnd::Failed(setup_failure(e)),
                    LinkOutput::Teardown => return LinkEnd::Done,
                }
            }
            let wake = link.poll_timeout().map(|at| {
                let now = core_time(started);
                tokio::time::Instant::now() + Duration::from_micros(at.as_micros().saturating_sub(now.as_micros()))
            });
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Read when an event comes, not when the wait starts.
            let in_flight = || traffic.in_flight.get();
            tokio::select! {
                biased;
                end = pending_or(&mut back_run) => {
                    back_run = None;
                    let now = core_time(started);
                    match end {
                        PumpEnd::Ended if feed_done => {
                            back.lock().await.finish().await;
                            return LinkEnd::Done;
                        }
                        PumpEnd::Ended => link.handle_input(now, LinkInput::DownstreamEnded { in_flight: in_flight() }),
                        PumpEnd::SourceFailed(reason) => link.handle_input(now, LinkInput::Broken { reason, in_flight: in_flight() }),
                        PumpEnd::SinkFailed(_) => link.handle_input(now, LinkInput::UpstreamGone),
                        PumpEnd::Stopped => {}
                    }
                }
                end = pending_or(&mut feed_run) => {
                    feed_run = None;
                    let now = core_time(started);
                    match end {
                        PumpEnd::Ended => feed_done = true,
                        PumpEnd::SourceFailed(_) => link.handle_input(now, LinkInput::UpstreamGone),
                        PumpEnd::SinkFailed(reason) => link.handle_input(now, LinkInput::Broken { reason, in_flight: in_flight() }),
                        PumpEnd::Stopped => {}
                    }
                }
                result = pending_or(&mut setup) => {
                    setup = None;
                    let now = core_time(started);
                    match result {
                        Ok(s) => {
                            link.handle_input(now, LinkInput::SetupDone(Ok(placed(ctx, rest, &s))));
                            placed_session = Some(s);
                        }
                        Err(f) => link.handle_input(now, LinkInput::SetupDone(Err(setup_error(f)))),
                    }
                }
                (id, rtt) = pending_or(&mut probe) => {
                    probe = None;
                    link.handle_input(core_time(started), LinkInput::ProbeDone { id, rtt, in_flight: in_flight() });
                }
                _ = timer => link.handle_input(core_time(started), LinkInput::Tick),
            }
        }
    }
}
