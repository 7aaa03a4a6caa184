//! Performance requirements and the evaluator that judges measurements against them.
//!
//! The rule (from the PhysarumSM paper): a hard violation, or a lost probe, means
//! abandon the instance at once; a soft violation is tolerated until it has lasted a
//! grace period, then the client should look for something better. Good samples
//! reset the grace.
//!
//! Indicators are fields of [`PerfSample`] and [`PerfLimits`]; today only RTT. A new
//! indicator (bandwidth, loss) is a new field on both and one more comparison in
//! [`PerfLimits::admits`]; callers keep working with `classify`.

use crate::time::Instant;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// One measurement of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfSample {
    pub rtt: Duration,
}

impl PerfSample {
    pub fn rtt(rtt: Duration) -> Self {
        PerfSample { rtt }
    }
}

/// Upper limits on each indicator; `None` means no limit on that indicator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfLimits {
    pub rtt: Option<Duration>,
}

impl PerfLimits {
    pub fn rtt(rtt: Duration) -> Self {
        PerfLimits { rtt: Some(rtt) }
    }

    /// Whether `sample` stays within every limit set.
    pub fn admits(&self, sample: &PerfSample) -> bool {
        self.rtt.is_none_or(|max| sample.rtt <= max)
    }

    /// These limits, with each unset indicator taken from `defaults`.
    pub fn or(self, defaults: PerfLimits) -> PerfLimits {
        PerfLimits { rtt: self.rtt.or(defaults.rtt) }
    }
}

/// A service's soft and hard requirements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    pub soft: PerfLimits,
    pub hard: PerfLimits,
}

/// How a measurement compares with a service's requirements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Good,
    SoftViolated,
    /// Over the hard limit, or no answer at all.
    HardViolated,
}

/// Probe timeout used when a service sets no hard RTT.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Requirements {
    pub fn rtt(soft: Duration, hard: Duration) -> Self {
        Requirements { soft: PerfLimits::rtt(soft), hard: PerfLimits::rtt(hard) }
    }

    /// These requirements with unset indicators taken from `defaults` (conf.json's `Perf`).
    pub fn or(self, defaults: Requirements) -> Requirements {
        Requirements { soft: self.soft.or(defaults.soft), hard: self.hard.or(defaults.hard) }
    }

    /// Classify a probe result; `None` is a lost probe.
    pub fn classify(&self, sample: Option<&PerfSample>) -> Class {
        match sample {
            None => Class::HardViolated,
            Some(s) if !self.hard.admits(s) => Class::HardViolated,
            Some(s) if !self.soft.admits(s) => Class::SoftViolated,
            Some(_) => Class::Good,
        }
    }

    /// How long to wait for a probe: an answer later than the hard limit is a violation anyway.
    pub fn probe_timeout(&self) -> Duration {
        self.hard.rtt.unwrap_or(DEFAULT_PROBE_TIMEOUT)
    }
}

/// What the evaluator advises about one tracked peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<K> {
    /// Hard limit violated or probe lost: stop using it now.
    Abandon(K),
    /// Soft limit violated for longer than the grace: look for something better.
    SeekBetter(K),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PerfInput<K> {
    /// A probe result for `key`; `sample: None` means the probe was lost.
    Sample { key: K, requirements: Requirements, sample: Option<PerfSample> },
    /// Stop tracking `key`.
    Forget(K),
}

#[derive(Clone, Debug)]
struct Tracked {
    /// Start of the current run of soft violations.
    soft_since: Option<Instant>,
}

/// Tracks soft-violation runs per key and turns samples into verdicts.
#[derive(Clone, Debug)]
pub struct PerfEvaluator<K: Ord + Clone> {
    grace: Duration,
    tracked: BTreeMap<K, Tracked>,
    out: VecDeque<Verdict<K>>,
}

/// Default grace before a persistent soft violation asks for a better instance.
pub const DEFAULT_SOFT_GRACE: Duration = Duration::from_secs(10);

/// Shortest grace the evaluator uses (see [`PerfEvaluator::new`]).
const MIN_GRACE: Duration = Duration::from_micros(1);

impl<K: Ord + Clone> PerfEvaluator<K> {
    /// A zero `grace` is taken as 1 µs: with no grace at all a persistent violation
    /// would be due again at the very instant it was reported, and a runtime following
    /// [`PerfEvaluator::poll_timeout`] would call `handle_timeout` at that instant forever.
    pub fn new(grace: Duration) -> Self {
        let grace = grace.max(MIN_GRACE);
        PerfEvaluator { grace, tracked: BTreeMap::new(), out: VecDeque::new() }
    }

    pub fn handle_input(&mut self, now: Instant, input: PerfInput<K>) {
        match input {
            PerfInput::Forget(key) => {
                self.tracked.remove(&key);
            }
            PerfInput::Sample { key, requirements, sample } => {
                match requirements.classify(sample.as_ref()) {
                    Class::HardViolated => {
                        self.tracked.remove(&key);
                        self.out.push_back(Verdict::Abandon(key));
                    }
                    Class::SoftViolated => {
                        let t = self.tracked.entry(key).or_insert(Tracked { soft_since: None });
                        t.soft_since.get_or_insert(now);
                    }
                    Class::Good => {
                        self.tracked.insert(key, Tracked { soft_since: None });
                    }
                }
                self.expire(now);
            }
        }
    }

    /// Time passed: emit `SeekBetter` for runs that outlasted the grace. Each run
    /// asks again every further grace period while it lasts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        for (key, t) in self.tracked.iter_mut() {
            if let Some(since) = t.soft_since {
                if since + self.grace <= now {
                    t.soft_since = Some(now);
                    self.out.push_back(Verdict::SeekBetter(key.clone()));
                }
            }
        }
    }

    pub fn poll_output(&mut self) -> Option<Verdict<K>> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tracked.values().filter_map(|t| t.soft_since).min().map(|since| since + self.grace)
    }

    pub fn is_tracking(&self, key: &K) -> bool {
        self.tracked.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn at(n: u64) -> Instant {
        Instant::from_micros(n * 1000)
    }
    fn sample(n: u64) -> Option<PerfSample> {
        Some(PerfSample::rtt(ms(n)))
    }
    fn req() -> Requirements {
        Requirements::rtt(ms(50), ms(100))
    }
    fn drain(e: &mut PerfEvaluator<u32>) -> Vec<Verdict<u32>> {
        std::iter::from_fn(|| e.poll_output()).collect()
    }
    fn feed(e: &mut PerfEvaluator<u32>, now: Instant, key: u32, s: Option<PerfSample>) {
        e.handle_input(now, PerfInput::Sample { key, requirements: req(), sample: s });
    }

    #[test]
    fn classify_against_soft_and_hard_limits() {
        let r = req();
        let cases = [
            (sample(0), Class::Good),
            (sample(50), Class::Good),
            (Some(PerfSample { rtt: ms(50) + Duration::from_micros(1) }), Class::SoftViolated),
            (sample(100), Class::SoftViolated),
            (Some(PerfSample { rtt: ms(100) + Duration::from_micros(1) }), Class::HardViolated),
            (sample(5000), Class::HardViolated),
            (None, Class::HardViolated),
        ];
        for (s, want) in cases {
            assert_eq!(r.classify(s.as_ref()), want, "{s:?}");
        }
        // No limits: everything answered is good, a lost probe is still a hard violation.
        let none = Requirements::default();
        assert_eq!(none.classify(sample(1_000_000).as_ref()), Class::Good);
        assert_eq!(none.classify(None), Class::HardViolated);
        // Only a hard limit.
        let hard_only = Requirements { soft: PerfLimits::default(), hard: PerfLimits::rtt(ms(100)) };
        assert_eq!(hard_only.classify(sample(99).as_ref()), Class::Good);
        assert_eq!(hard_only.classify(sample(101).as_ref()), Class::HardViolated);
    }

    #[test]
    fn or_fills_only_unset_limits() {
        let defaults = Requirements::rtt(ms(50), ms(100));
        assert_eq!(Requirements::default().or(defaults), defaults);
        assert_eq!(Requirements::rtt(ms(10), ms(20)).or(defaults), Requirements::rtt(ms(10), ms(20)));
        let soft_only = Requirements { soft: PerfLimits::rtt(ms(5)), hard: PerfLimits::default() };
        assert_eq!(soft_only.or(defaults), Requirements::rtt(ms(5), ms(100)));
        assert_eq!(PerfLimits::default().or(PerfLimits::default()), PerfLimits::default());
        assert_eq!(PerfLimits::default().or(PerfLimits::rtt(ms(7))), PerfLimits::rtt(ms(7)));
        assert_eq!(PerfLimits::rtt(ms(3)).or(PerfLimits::rtt(ms(7))), PerfLimits::rtt(ms(3)));
    }

    #[test]
    fn probe_timeout_is_the_hard_limit_or_the_default() {
        assert_eq!(req().probe_timeout(), ms(100));
        assert_eq!(Requirements::default().probe_timeout(), DEFAULT_PROBE_TIMEOUT);
        let soft_only = Requirements { soft: PerfLimits::rtt(ms(5)), hard: PerfLimits::default() };
        assert_eq!(soft_only.probe_timeout(), DEFAULT_PROBE_TIMEOUT);
    }

    #[test]
    fn soft_violation_asks_for_better_after_the_grace_and_not_before() {
        let mut e = PerfEvaluator::new(ms(10_000));
        feed(&mut e, at(1000), 7, sample(70));
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.poll_timeout(), Some(at(11_000)));
        feed(&mut e, at(5000), 7, sample(70));
        assert_eq!(e.poll_timeout(), Some(at(11_000)), "a continuing run keeps its start");
        e.handle_timeout(Instant::from_micros(11_000_000 - 1));
        assert!(drain(&mut e).is_empty());
        e.handle_timeout(at(11_000));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(7)]);
        // Asked again one grace later while it lasts, not at once.
        assert_eq!(e.poll_timeout(), Some(at(21_000)));
        e.handle_timeout(at(11_000));
        assert!(drain(&mut e).is_empty());
        feed(&mut e, at(21_000), 7, sample(70));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(7)]);
    }

    #[test]
    fn a_good_sample_resets_the_run() {
        let mut e = PerfEvaluator::new(ms(10_000));
        feed(&mut e, at(0), 1, sample(70));
        feed(&mut e, at(9000), 1, sample(10));
        assert!(e.is_tracking(&1));
        assert_eq!(e.poll_timeout(), None);
        e.handle_timeout(at(10_000));
        assert!(drain(&mut e).is_empty());
        feed(&mut e, at(12_000), 1, sample(70));
        assert_eq!(e.poll_timeout(), Some(at(22_000)));
        e.handle_timeout(at(21_999));
        assert!(drain(&mut e).is_empty());
        e.handle_timeout(at(22_000));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(1)]);
    }

    #[test]
    fn hard_violation_or_lost_probe_abandons_at_once() {
        let mut e = PerfEvaluator::new(ms(10_000));
        feed(&mut e, at(0), 1, sample(70));
        feed(&mut e, at(1), 1, sample(101));
        assert_eq!(drain(&mut e), vec![Verdict::Abandon(1)]);
        assert!(!e.is_tracking(&1));
        assert_eq!(e.poll_timeout(), None, "the soft run ended with the abandon");
        feed(&mut e, at(2), 2, None);
        assert_eq!(drain(&mut e), vec![Verdict::Abandon(2)]);
        assert!(!e.is_tracking(&2));
    }

    #[test]
    fn forget_stops_tracking() {
        let mut e = PerfEvaluator::new(ms(10_000));
        feed(&mut e, at(0), 1, sample(70));
        feed(&mut e, at(0), 2, sample(80));
        e.handle_input(at(1), PerfInput::Forget(1));
        assert!(!e.is_tracking(&1) && e.is_tracking(&2));
        e.handle_input(at(1), PerfInput::Forget(99));
        e.handle_timeout(at(10_000));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(2)]);
    }

    #[test]
    fn poll_timeout_is_the_earliest_grace_end() {
        let mut e = PerfEvaluator::new(ms(10_000));
        assert_eq!(e.poll_timeout(), None);
        feed(&mut e, at(3000), 1, sample(70));
        feed(&mut e, at(1000), 2, sample(70));
        feed(&mut e, at(2000), 3, sample(10));
        assert_eq!(e.poll_timeout(), Some(at(11_000)));
        e.handle_timeout(at(11_000));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(2)]);
        assert_eq!(e.poll_timeout(), Some(at(13_000)));
    }

    #[test]
    fn zero_grace_does_not_ask_forever_at_one_instant() {
        let mut e = PerfEvaluator::new(Duration::ZERO);
        feed(&mut e, at(1000), 1, sample(70));
        let mut asked = drain(&mut e).len();
        for _ in 0..10 {
            match e.poll_timeout() {
                Some(t) if t <= at(1000) => e.handle_timeout(at(1000)),
                _ => break,
            }
            asked += drain(&mut e).len();
        }
        assert!(e.poll_timeout().is_some_and(|t| t > at(1000)), "the timer moves past now");
        assert!(asked <= 1, "asked {asked} times at one instant");
        e.handle_timeout(at(1001));
        assert_eq!(drain(&mut e), vec![Verdict::SeekBetter(1)]);
    }
}
