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

impl<K: Ord + Clone> PerfEvaluator<K> {
    pub fn new(grace: Duration) -> Self {
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
