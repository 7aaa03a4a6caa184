//! Admission limits of the front end: how many requests a proxy handles at once, and
//! how many tunnel streams it has in use towards one instance.
//!
//! The per-instance limit keeps the streams of one libp2p connection below the
//! muxer's own limit ([`RuntimeConfig::max_streams_per_instance`] in use, plus at most
//! `max_idle_tunnels` idle ones): past the muxer's limit yamux ends the whole
//! connection, failing every request on it. A request over a limit waits in a short,
//! bounded queue; when the queue is full or the wait runs out it is answered 503 with
//! `Retry-After` — never dropped.

use crate::http::{text_response, ProxyBody};
use crate::node_loop::RuntimeConfig;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::Response;
use physarum_core::types::PeerId;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A place held under a limit; the place is given back when this is dropped.
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The wait queue was already full.
    QueueFull,
    /// No place came free within the queue wait.
    WaitedTooLong,
}

/// A concurrency limit with a bounded wait queue.
pub(crate) struct Gate {
    places: Arc<Semaphore>,
    limit: usize,
    waiting: Cell<usize>,
    max_waiting: usize,
}

impl Gate {
    pub(crate) fn new(limit: usize, max_waiting: usize) -> Gate {
        let limit = limit.max(1);
        Gate { places: Arc::new(Semaphore::new(limit)), limit, waiting: Cell::new(0), max_waiting }
    }

    /// Take a place, waiting at most `wait` (and only if fewer than `max_waiting`
    /// others are waiting already).
    pub(crate) async fn enter(&self, wait: Duration) -> Result<Admitted, Refusal> {
        if let Ok(permit) = self.places.clone().try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        if self.waiting.get() >= self.max_waiting {
            return Err(Refusal::QueueFull);
        }
        self.waiting.set(self.waiting.get() + 1);
        let acquired = tokio::time::timeout(wait, self.places.clone().acquire_owned()).await;
        self.waiting.set(self.waiting.get() - 1);
        match acquired {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed; a timeout is the only other way out.
            _ => Err(Refusal::WaitedTooLong),
        }
    }

    /// Places in use now.
    pub(crate) fn in_use(&self) -> usize {
        self.limit - self.places.available_permits()
    }

    fn is_unused(&self) -> bool {
        self.in_use() == 0 && self.waiting.get() == 0
    }
}

/// One [`Gate`] per instance peer. Gates nobody holds or waits on are pruned once
/// there are more than [`PeerGates::KEEP`], so the map follows the busy peers only.
pub(crate) struct PeerGates {
    gates: RefCell<BTreeMap<PeerId, Rc<Gate>>>,
    limit: usize,
    max_waiting: usize,
}

impl PeerGates {
    const KEEP: usize = 256;

    pub(crate) fn new(limit: usize, max_waiting: usize) -> PeerGates {
        PeerGates { gates: RefCell::new(BTreeMap::new()), limit, max_waiting }
    }

    pub(crate) fn gate(&self, peer: &PeerId) -> Rc<Gate> {
        let mut gates = self.gates.borrow_mut();
        if gates.len() > Self::KEEP {
            gates.retain(|p, g| p == peer || !g.is_unused());
        }
        gates.entry(peer.clone()).or_insert_with(|| Rc::new(Gate::new(self.limit, self.max_waiting))).clone()
    }

    /// Gates currently kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.gates.borrow().len()
    }
}

/// The front end's limits, built from the runtime config.
pub(crate) struct Limits {
    pub requests: Gate,
    pub streams: PeerGates,
    pub queue_wait: Duration,
    pub retry_after: Duration,
}

impl Limits {
    pub(crate) fn new(config: &RuntimeConfig) -> Limits {
        Limits {
            requests: Gate::new(config.max_concurrent_requests, config.max_queued_requests),
            streams: PeerGates::new(config.max_streams_per_instance, config.max_queued_per_instance),
            queue_wait: config.queue_wait,
            retry_after: config.retry_after,
        }
    }

    /// The answer to a request refused by a limit: 503 with `Retry-After`.
    pub(crate) fn overloaded(&self, what: &str, refusal: Refusal) -> Response<ProxyBody> {
        let why = match refusal {
            Refusal::QueueFull => "its wait queue is full",
            Refusal::WaitedTooLong => "no place came free in time",
        };
        let mut resp = text_response(503, format!("overloaded: {what} is at its limit and {why}; retry later"));
        let secs = self.retry_after.as_secs().max(1);
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(f)
    }

    #[test]
    fn a_full_gate_queues_briefly_then_refuses() {
        run(async {
            let gate = Rc::new(Gate::new(2, 1));
            let a = gate.enter(Duration::from_secs(1)).await.unwrap();
            let _b = gate.enter(Duration::from_secs(1)).await.unwrap();
            assert_eq!(gate.in_use(), 2);
            // One may wait; it gets the place that comes free.
            let g = gate.clone();
            let waiter = tokio::task::LocalSet::new();
            let got = waiter.run_until(async move {
                let w = tokio::task::spawn_local(async move { g.enter(Duration::from_secs(1)).await.is_ok() });
                tokio::task::yield_now().await;
                // A second waiter finds the queue full at once.
                assert_eq!(gate.enter(Duration::from_secs(1)).await.err(), Some(Refusal::QueueFull));
                drop(a);
                w.await.unwrap()
            });
            assert!(got.await);
        });
    }

    #[test]
    fn a_waiter_is_refused_when_nothing_frees_in_time() {
        run(async {
            let gate = Gate::new(1, 8);
            let _a = gate.enter(Duration::ZERO).await.unwrap();
            assert_eq!(gate.enter(Duration::from_millis(100)).await.err(), Some(Refusal::WaitedTooLong));
            assert_eq!(gate.waiting.get(), 0);
        });
    }

    #[test]
    fn unused_peer_gates_are_pruned() {
        run(async {
            let gates = PeerGates::new(1, 1);
            let busy = gates.gate(&PeerId("busy".into()));
            let _held = busy.enter(Duration::ZERO).await.unwrap();
            for i in 0..1000 {
                let _ = gates.gate(&PeerId(format!("p{i}")));
            }
            assert!(gates.len() <= PeerGates::KEEP + 2, "{} gates kept", gates.len());
            assert!(gates.gates.borrow().contains_key(&PeerId("busy".into())));
        });
    }
}
