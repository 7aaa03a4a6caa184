//! The client side's answers to failing instances: which requests may be retried
//! (RFC 9110 §9.2.2 idempotent methods), how many retries the proxy may spend (a
//! retry budget, as Linkerd's: retries stay within a share of recent requests, with
//! a small floor so a quiet proxy can still retry), how long one try may wait for a
//! response head, and which peers are ejected for a while after they failed (as
//! Envoy's outlier detection: an ejected peer is not picked again until its
//! ejection ends, even when the DHT still lists it).

use crate::perf::Requirements;
use crate::time::Instant;
use crate::types::PeerId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The header a client sets (to `true` or `1`) to mark a request idempotent whatever its method.
pub const IDEMPOTENT_HEADER: &str = "x-physarum-idempotent";

/// Whether a request with `method` (and the value of [`IDEMPOTENT_HEADER`], if any)
/// may be sent twice with the effect of once.
pub fn is_idempotent(method: &str, marked: Option<&str>) -> bool {
    let by_method = matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE");
    let by_mark = marked.is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1");
    by_method || by_mark
}

/// Knobs of retries, tries and ejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResilienceConfig {
    /// Retries may be at most this many per thousand requests of the window.
    pub retry_permille: u32,
    /// ... but this many retries per window are always allowed.
    pub min_retries: u32,
    /// The window the budget counts over.
    pub budget_window: Duration,
    /// One try waits for a response head this many times the service's hard RTT ...
    pub try_timeout_per_hard_rtt: u32,
    /// ... but at least this long (and never past the request's deadline).
    pub min_try_timeout: Duration,
    /// A peer that failed a request is not picked again for this long.
    pub ejection: Duration,
    /// Ejections remembered at most (the oldest go first).
    pub max_ejected: usize,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            retry_permille: 200,
            min_retries: 10,
            budget_window: Duration::from_secs(10),
            try_timeout_per_hard_rtt: 10,
            min_try_timeout: Duration::from_secs(2),
            ejection: Duration::from_secs(30),
            max_ejected: 1024,
        }
    }
}

impl ResilienceConfig {
    /// How long one try may wait for its response head, for a service with `requirements`.
    pub fn try_timeout(&self, requirements: &Requirements) -> Duration {
        let hard = requirements.hard.rtt.unwrap_or(Duration::from_secs(1));
        hard.saturating_mul(self.try_timeout_per_hard_rtt).max(self.min_try_timeout)
    }
}

/// Requests and retries of the last window, counted per second.
#[derive(Clone, Debug, Default)]
pub struct RetryBudget {
    /// (second since start, requests, retries), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
}

impl RetryBudget {
    fn bucket(&mut self, now: Instant, window: Duration) -> &mut (u64, u32, u32) {
        let second = now.as_micros() / 1_000_000;
        let window = window.as_secs().max(1);
        while self.buckets.front().is_some_and(|b| b.0 + window <= second) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.0 != second) {
            self.buckets.push_back((second, 0, 0));
        }
        self.buckets.back_mut().expect("just pushed")
    }

    /// A first try of a request was made.
    pub fn record_request(&mut self, now: Instant, config: &ResilienceConfig) {
        self.bucket(now, config.budget_window).1 += 1;
    }

    /// May a retry be made now? If so it is counted.
    pub fn try_spend(&mut self, now: Instant, config: &ResilienceConfig) -> bool {
        self.bucket(now, config.budget_window);
        let (requests, retries) = self.buckets.iter().fold((0u64, 0u64), |(a, b), x| (a + x.1 as u64, b + x.2 as u64));
        let allowed = (requests * config.retry_permille as u64 / 1000).max(config.min_retries as u64);
        if retries >= allowed {
            return false;
        }
        self.bucket(now, config.budget_window).2 += 1;
        true
    }
}

/// Peers ejected after a failure, each until a time.
#[derive(Clone, Debug, Default)]
pub struct Ejections {
    until: BTreeMap<PeerId, Instant>,
}

impl Ejections {
    pub fn eject(&mut self, now: Instant, peer: &PeerId, config: &ResilienceConfig) {
        self.prune(now);
        if self.until.len() >= config.max_ejected.max(1) {
            // Full of live ejections: forget the one that ends first.
            if let Some(first) = self.until.iter().min_by_key(|(_, t)| **t).map(|(p, _)| p.clone()) {
                self.until.remove(&first);
            }
        }
        self.until.insert(peer.clone(), now + config.ejection);
    }

    pub fn is_ejected(&self, now: Instant, peer: &PeerId) -> bool {
        self.until.get(peer).is_some_and(|t| *t > now)
    }

    pub fn prune(&mut self, now: Instant) {
        self.until.retain(|_, t| *t > now);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::PerfLimits;

    fn at(ms: u64) -> Instant {
        Instant::from_micros(ms * 1000)
    }

    #[test]
    fn idempotent_methods_and_the_marker() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"] {
            assert!(is_idempotent(m, None), "{m}");
        }
        assert!(!is_idempotent("POST", None));
        assert!(!is_idempotent("PATCH", Some("no")));
        assert!(is_idempotent("POST", Some("true")));
        assert!(is_idempotent("POST", Some(" 1 ")));
    }

    #[test]
    fn retries_stay_within_a_fifth_of_requests_beyond_the_floor() {
        let config = ResilienceConfig::default();
        let mut b = RetryBudget::default();
        for _ in 0..1000 {
            b.record_request(at(0), &config);
        }
        let granted = (0..1000).filter(|_| b.try_spend(at(500), &config)).count();
        assert_eq!(granted, 200);
        // A quiet proxy still has its floor.
        let mut quiet = RetryBudget::default();
        let granted = (0..100).filter(|_| quiet.try_spend(at(0), &config)).count();
        assert_eq!(granted, config.min_retries as usize);
        // The window moves on: old retries stop counting.
        assert!(quiet.try_spend(at(20_000), &config));
    }

    #[test]
    fn ejections_end_and_stay_bounded() {
        let config = ResilienceConfig { max_ejected: 3, ..ResilienceConfig::default() };
        let mut e = Ejections::default();
        for i in 0..10 {
            e.eject(at(i), &PeerId(format!("p{i}")), &config);
        }
        assert_eq!(e.len(), 3);
        assert!(e.is_ejected(at(10), &PeerId("p9".into())));
        assert!(!e.is_ejected(at(10), &PeerId("p0".into())));
        assert!(!e.is_ejected(at(10) + config.ejection, &PeerId("p9".into())));
    }

    #[test]
    fn the_try_timeout_follows_the_hard_limit() {
        let config = ResilienceConfig::default();
        let reqs = |ms| Requirements {
            soft: PerfLimits::rtt(Duration::from_millis(ms)),
            hard: PerfLimits::rtt(Duration::from_millis(ms)),
        };
        assert_eq!(config.try_timeout(&reqs(1000)), Duration::from_secs(10));
        assert_eq!(config.try_timeout(&reqs(50)), config.min_try_timeout);
    }
}
