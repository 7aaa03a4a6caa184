//! What a node's DHT client decides, whatever carries its bytes (libp2p in
//! production, the simulations' models): how it retries its bootstrap connections
//! (DESIGN.md §2), how long provider records live, and when a provider lookup has
//! found enough. Plain values and small state machines; the runtimes keep the clocks.

use crate::time::Instant;
use crate::types::DhtKey;
use std::time::Duration;

/// How long a provider record lives after its last advertisement (the core
/// re-advertises every `advertise_interval`, 30 s by default).
pub const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(120);

/// After the first providers of a lookup arrive, wait this long for more answers.
pub const FIND_GRACE: Duration = Duration::from_millis(100);

/// How long a lookup of `key` waits for more answers after its first providers.
/// Every registry serves the same operator-signed entries, so the first to answer
/// will do; instances and allocators are compared by RTT, so more of them are worth
/// [`FIND_GRACE`].
pub fn find_grace(key: &DhtKey) -> Duration {
    match key {
        DhtKey::Registry => Duration::ZERO,
        DhtKey::Service(_) | DhtKey::Allocators => FIND_GRACE,
    }
}

/// Bootstrap connection retries: 2, 4, 8, 16 s and 5 attempts at start, then a clear
/// error; after a connection drops, reconnect forever, at most `cap` apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First retry delay; it doubles after each failure.
    pub initial: Duration,
    /// Start-up attempts per bootstrap before giving up (the first dial included).
    pub startup_attempts: u32,
    /// Largest delay between reconnection attempts after a drop.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(2), startup_attempts: 5, cap: Duration::from_secs(512) }
    }
}

impl Backoff {
    /// Delay after the `failures`-th consecutive failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Try again after this long.
    After(Duration),
    /// Start-up attempts are spent: stop trying this bootstrap (until the node is up
    /// through another one, see [`BootstrapLink::revive`]).
    GiveUp,
}

/// One configured bootstrap's connection, as every runtime tracks it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootstrapLink {
    failures: u32,
    connected: bool,
    ever_connected: bool,
    gave_up: bool,
}

impl BootstrapLink {
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Consecutive failed attempts.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// An attempt failed. `node_up`: the node is already connected through another
    /// bootstrap, so this one is retried forever; otherwise start-up gives up after
    /// `startup_attempts` failures of a bootstrap that never answered.
    pub fn failed(&mut self, backoff: &Backoff, node_up: bool) -> Retry {
        self.failures = self.failures.saturating_add(1);
        if !node_up && !self.ever_connected && self.failures >= backoff.startup_attempts {
            self.gave_up = true;
            return Retry::GiveUp;
        }
        Retry::After(backoff.delay(self.failures))
    }

    /// The connection came up; whether it was down before (a new connection: the
    /// node advertises again).
    pub fn connected(&mut self) -> bool {
        self.failures = 0;
        self.gave_up = false;
        self.ever_connected = true;
        !std::mem::replace(&mut self.connected, true)
    }

    /// An established connection dropped: reconnect after the returned delay.
    pub fn lost(&mut self, backoff: &Backoff) -> Duration {
        self.connected = false;
        self.failures = 0;
        backoff.initial
    }

    /// The node came up through another bootstrap: a bootstrap that was given up on
    /// is retried from now on, after the returned delay.
    pub fn revive(&mut self, backoff: &Backoff) -> Option<Duration> {
        std::mem::replace(&mut self.gave_up, false).then(|| backoff.delay(self.failures))
    }
}

/// Whether start-up failed: every bootstrap was given up on (none configured is not
/// a failure: a bootstrap node itself).
pub fn startup_failed<'a>(links: impl IntoIterator<Item = &'a BootstrapLink>) -> bool {
    let mut any = false;
    for l in links {
        any = true;
        if !l.gave_up {
            return false;
        }
    }
    any
}

/// When a provider lookup ends: at its deadline; when the DHT query has run out of
/// peers to ask; or [`FIND_GRACE`] after the first providers arrived (no need to
/// wait for every answer once some are in hand).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindEnd {
    deadline: Instant,
    grace: Duration,
    settle_at: Option<Instant>,
}

impl FindEnd {
    pub fn new(now: Instant, timeout: Duration) -> Self {
        FindEnd { deadline: now + timeout, grace: FIND_GRACE, settle_at: None }
    }

    /// A lookup of `key`, with its grace ([`find_grace`]).
    pub fn for_key(now: Instant, timeout: Duration, key: &DhtKey) -> Self {
        FindEnd::new(now, timeout).with_grace(find_grace(key))
    }

    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Providers arrived at `now` (`count`: how many, possibly none).
    pub fn found(&mut self, now: Instant, count: usize) {
        if count > 0 && self.settle_at.is_none() {
            self.settle_at = Some((now + self.grace).min(self.deadline));
        }
    }

    /// When the lookup must end if nothing else ends it first.
    pub fn poll_timeout(&self) -> Instant {
        self.settle_at.unwrap_or(self.deadline).min(self.deadline)
    }

    /// Whether the lookup is over at `now` (`exhausted`: the query has no peer left to ask).
    pub fn is_over(&self, now: Instant, exhausted: bool) -> bool {
        exhausted || now >= self.poll_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_retries_2_4_8_16_then_gives_up() {
        let b = Backoff::default();
        let mut link = BootstrapLink::default();
        let delays: Vec<Retry> = (0..5).map(|_| link.failed(&b, false)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            delays,
            vec![Retry::After(s(2)), Retry::After(s(4)), Retry::After(s(8)), Retry::After(s(16)), Retry::GiveUp]
        );
        assert!(link.gave_up() && startup_failed([&link]));
        assert!(!startup_failed(std::iter::empty::<&BootstrapLink>()));
        // Up through another bootstrap: this one is retried again, forever.
        assert_eq!(link.revive(&b), Some(s(512).min(b.delay(5))));
        assert!(!startup_failed([&link]));
        for _ in 0..40 {
            assert!(matches!(link.failed(&b, true), Retry::After(d) if d <= b.cap));
        }
        assert_eq!(link.failed(&b, true), Retry::After(s(512)));
    }

    #[test]
    fn a_lost_connection_reconnects_forever_from_the_first_delay() {
        let b = Backoff::default();
        let mut link = BootstrapLink::default();
        assert!(link.connected());
        assert!(!link.connected(), "already up: not a new connection");
        assert_eq!(link.lost(&b), b.initial);
        for _ in 0..20 {
            // Never gives up once it has been connected, even while the node is down.
            assert!(matches!(link.failed(&b, false), Retry::After(_)));
        }
        assert!(link.connected());
        assert_eq!(link.failures(), 0);
    }

    #[test]
    fn a_find_ends_a_grace_after_the_first_providers_or_at_its_deadline() {
        let t = |ms: u64| Instant::from_micros(ms * 1000);
        let mut f = FindEnd::new(t(0), Duration::from_secs(2));
        assert_eq!(f.poll_timeout(), t(2000));
        f.found(t(10), 0);
        assert!(!f.is_over(t(500), false));
        f.found(t(30), 2);
        f.found(t(60), 1);
        assert_eq!(f.poll_timeout(), t(130));
        assert!(f.is_over(t(130), false) && !f.is_over(t(129), false));
        assert!(f.is_over(t(31), true));
        let mut late = FindEnd::new(t(0), Duration::from_millis(50));
        late.found(t(40), 1);
        assert_eq!(late.poll_timeout(), t(50));
    }

    #[test]
    fn a_registry_lookup_ends_with_its_first_providers_a_service_lookup_waits_for_more() {
        let t = |ms: u64| Instant::from_micros(ms * 1000);
        let mut registry = FindEnd::for_key(t(0), Duration::from_secs(2), &DhtKey::Registry);
        registry.found(t(30), 1);
        assert!(registry.is_over(t(30), false));
        let service = DhtKey::Service(crate::types::ContentHash("h".into()));
        let mut instances = FindEnd::for_key(t(0), Duration::from_secs(2), &service);
        instances.found(t(30), 1);
        assert_eq!(instances.poll_timeout(), t(30) + FIND_GRACE);
    }
}
