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

/// Peers ejected after a failure, each until a time and with why.
#[derive(Clone, Debug, Default)]
pub struct Ejections {
    until: BTreeMap<PeerId, (Instant, &'static str)>,
}

/// Why a peer that failed a request is ejected.
pub const FAILED_A_REQUEST: &str = "failed a request recently";

impl Ejections {
    /// Eject `peer` after a failed request, for the configured time.
    pub fn eject(&mut self, now: Instant, peer: &PeerId, config: &ResilienceConfig) {
        self.eject_for(now, peer, config.ejection, config.max_ejected, FAILED_A_REQUEST);
    }

    /// Eject `peer` for `duration` because it `why` (an ejection that ends later is kept);
    /// at most `max` are remembered.
    pub fn eject_for(&mut self, now: Instant, peer: &PeerId, duration: Duration, max: usize, why: &'static str) {
        self.prune(now);
        let until = now + duration;
        if self.until.get(peer).is_some_and(|(t, _)| *t > until) {
            return;
        }
        if !self.until.contains_key(peer) && self.until.len() >= max.max(1) {
            // Full of live ejections: forget the one that ends first.
            if let Some(first) = self.until.iter().min_by_key(|(_, (t, _))| *t).map(|(p, _)| p.clone()) {
                self.until.remove(&first);
            }
        }
        self.until.insert(peer.clone(), (until, why));
    }

    pub fn is_ejected(&self, now: Instant, peer: &PeerId) -> bool {
        self.why(now, peer).is_some()
    }

    /// Why `peer` is ejected now, if it is.
    pub fn why(&self, now: Instant, peer: &PeerId) -> Option<&'static str> {
        self.until.get(peer).filter(|(t, _)| *t > now).map(|(_, why)| *why)
    }

    /// End `peer`'s ejection now.
    pub fn lift(&mut self, peer: &PeerId) {
        self.until.remove(peer);
    }

    pub fn prune(&mut self, now: Instant) {
        self.until.retain(|_, (t, _)| *t > now);
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
    fn a_longer_ejection_is_not_cut_short_and_says_why() {
        let config = ResilienceConfig::default();
        let mut e = Ejections::default();
        let p = PeerId("p".into());
        e.eject_for(at(0), &p, Duration::from_secs(600), 8, "failed the trust check");
        e.eject(at(1), &p, &config);
        assert_eq!(e.why(at(1) + config.ejection, &p), Some("failed the trust check"));
        assert_eq!(e.why(at(0) + Duration::from_secs(600), &p), None);
        e.eject(at(0), &PeerId("q".into()), &config);
        assert_eq!(e.why(at(0), &PeerId("q".into())), Some(FAILED_A_REQUEST));
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
