//! Property tests of the peer cache: random inserts, removes, probe answers (good,
//! soft, hard, lost, late, unknown tokens) and time steps; invariants after every step.

use physarum_core::config::PeerCacheConfig;
use physarum_core::peer_cache::{Level, PeerCache, PeerCacheOutput};
use physarum_core::perf::{Class, PerfSample, Requirements};
use physarum_core::time::Instant;
use physarum_core::types::{ContentHash, PeerAddr, PeerId};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

type Key = (ContentHash, PeerId);

const SERVICES: u8 = 3;
const PEERS: u8 = 6;
const GRACE: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn service(i: u8) -> ContentHash {
    ContentHash(format!("svc{i}"))
}

/// Service 0: soft 50 / hard 100 ms. Service 1: soft 20 / hard 1500 ms (probes outlive
/// the 1 s interval). Service 2: no limits (1 s default timeout).
fn requirements(s: &ContentHash) -> Requirements {
    match s.0.as_str() {
        "svc0" => Requirements::rtt(ms(50), ms(100)),
        "svc1" => Requirements::rtt(ms(20), ms(1500)),
        _ => Requirements::default(),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert {
        svc: u8,
        peer: u8,
        rtt_ms: u64,
    },
    Remove {
        svc: u8,
        peer: u8,
    },
    /// Answer the `pick`-th outstanding probe (by token order); `None` is lost.
    Answer {
        pick: usize,
        rtt_ms: Option<u64>,
    },
    /// A token the cache never issued.
    Unknown {
        token: u64,
        rtt_ms: u64,
    },
    /// Answer again the `pick`-th probe already answered, expired or dropped with its entry.
    Stale {
        pick: usize,
        rtt_ms: u64,
    },
    /// Answer every outstanding probe with the same RTT (steady conditions).
    AnswerAll {
        rtt_ms: u64,
    },
    /// Let time pass; call `handle_timeout` only when `fire`.
    Advance {
        ms: u64,
        fire: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SERVICES, 0..PEERS, 0u64..200).prop_map(|(svc, peer, rtt_ms)| Op::Insert { svc, peer, rtt_ms }),
        1 => (0..SERVICES, 0..PEERS).prop_map(|(svc, peer)| Op::Remove { svc, peer }),
        6 => (any::<usize>(), prop::option::weighted(0.85, 0u64..1700))
            .prop_map(|(pick, rtt_ms)| Op::Answer { pick, rtt_ms }),
        2 => (0u64..200).prop_map(|rtt_ms| Op::AnswerAll { rtt_ms }),
        1 => (1_000_000u64.., 0u64..200).prop_map(|(token, rtt_ms)| Op::Unknown { token, rtt_ms }),
        2 => (any::<usize>(), 0u64..200).prop_map(|(pick, rtt_ms)| Op::Stale { pick, rtt_ms }),
        4 => (0u64..1600, prop::bool::weighted(0.9)).prop_map(|(ms, fire)| Op::Advance { ms, fire }),
    ]
}

struct Harness {
    cache: PeerCache,
    now: Instant,
    outputs: Vec<PeerCacheOutput>,
    /// Probes issued and not yet answered, expired or dropped: token → (entry, deadline).
    outstanding: BTreeMap<u64, (Key, Instant)>,
    /// Probes answered, expired, or dropped with their entry.
    retired: Vec<u64>,
    /// Entries whose last probe was over the hard limit, or that lost
    /// `lost_probes_to_evict` probes in a row.
    bad: BTreeSet<Key>,
    /// Probes lost in a row per entry, and how many evict.
    missed: BTreeMap<Key, u32>,
    evict_after: u32,
    /// Model of the soft-violation runs: entry → when the run began, or when it last
    /// asked for better.
    soft_since: BTreeMap<Key, Instant>,
}

impl Harness {
    fn new(config: PeerCacheConfig) -> Self {
        Harness {
            evict_after: config.lost_probes_to_evict.max(1),
            missed: BTreeMap::new(),
            cache: PeerCache::new(config, GRACE),
            now: Instant::ZERO,
            outputs: Vec::new(),
            outstanding: BTreeMap::new(),
            retired: Vec::new(),
            bad: BTreeSet::new(),
            soft_since: BTreeMap::new(),
        }
    }

    fn collect(&mut self) -> Result<(), TestCaseError> {
        while let Some(o) = self.cache.poll_output() {
            match &o {
                PeerCacheOutput::Probe { token, peer, timeout } => {
                    let target = self.cache.probe_target(*token).map(|(s, p)| (s.clone(), p.clone()));
                    prop_assert!(target.is_some(), "probe {token} has no target");
                    if let Some(key) = target {
                        prop_assert_eq!(&key.1, &peer.peer);
                        prop_assert_eq!(*timeout, requirements(&key.0).probe_timeout());
                        prop_assert!(!self.outstanding.contains_key(token), "token {} reused", token);
                        self.outstanding.insert(*token, (key, self.now + *timeout));
                    }
                }
                PeerCacheOutput::Evicted { service, peer, .. } => {
                    let key = (service.clone(), peer.clone());
                    let dropped: Vec<u64> =
                        self.outstanding.iter().filter(|(_, (k, _))| *k == key).map(|(t, _)| *t).collect();
                    for t in dropped {
                        self.outstanding.remove(&t);
                        self.retired.push(t);
                    }
                    self.soft_since.remove(&key);
                    self.missed.remove(&key);
                }
                PeerCacheOutput::SeekBetter { service, peer, .. } => {
                    prop_assert!(self.cache.get(service, peer).is_some(), "SeekBetter for an absent entry");
                    let key = (service.clone(), peer.clone());
                    let since = self.soft_since.get(&key).copied();
                    prop_assert!(
                        since.is_some_and(|t| t + GRACE <= self.now),
                        "SeekBetter for {:?} at {:?}, soft since {:?}",
                        key,
                        self.now,
                        since
                    );
                    self.soft_since.insert(key, self.now);
                }
            }
            self.outputs.push(o);
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Insert { svc, peer, rtt_ms } => {
                let s = service(svc);
                let p = PeerAddr::new(format!("p{peer}"), vec![format!("/ip4/10.0.0.{peer}/tcp/4001")]);
                let key = (s.clone(), p.peer.clone());
                self.bad.remove(&key);
                if self.cache.get(&key.0, &key.1).is_none() {
                    self.missed.remove(&key);
                }
                self.cache.insert(self.now, &s, requirements(&s), p, ms(rtt_ms));
            }
            Op::Remove { svc, peer } => {
                let s = service(svc);
                let p = PeerId(format!("p{peer}"));
                let present = self.cache.get(&s, &p).is_some();
                prop_assert_eq!(self.cache.remove(&s, &p, "removed"), present);
                if present {
                    prop_assert!(self.cache.get(&s, &p).is_none());
                }
            }
            Op::Answer { pick, rtt_ms } => {
                if self.outstanding.is_empty() {
                    return Ok(());
                }
                let idx = pick % self.outstanding.len();
                if let Some(&token) = self.outstanding.keys().nth(idx) {
                    self.answer(token, rtt_ms.map(ms));
                }
            }
            Op::AnswerAll { rtt_ms } => {
                let tokens: Vec<u64> = self.outstanding.keys().copied().collect();
                for token in tokens {
                    self.answer(token, Some(ms(rtt_ms)));
                    self.collect()?;
                }
            }
            Op::Unknown { token, rtt_ms } => self.answer_unknown(token, rtt_ms)?,
            Op::Stale { pick, rtt_ms } => {
                if !self.retired.is_empty() {
                    let token = self.retired[pick % self.retired.len()];
                    self.answer_unknown(token, rtt_ms)?;
                }
            }
            Op::Advance { ms: d, fire } => {
                self.now += ms(d);
                if fire {
                    let now = self.now;
                    let lost: Vec<Key> =
                        self.outstanding.values().filter(|(_, d)| *d <= now).map(|(k, _)| k.clone()).collect();
                    for key in lost {
                        self.lost(key);
                    }
                    let expired: Vec<u64> =
                        self.outstanding.iter().filter(|(_, (_, d))| *d <= now).map(|(t, _)| *t).collect();
                    for t in expired {
                        self.outstanding.remove(&t);
                        self.retired.push(t);
                    }
                    self.cache.handle_timeout(self.now);
                    self.collect()?;
                    for (key, since) in &self.soft_since {
                        if self.cache.get(&key.0, &key.1).is_some() {
                            prop_assert!(*since + GRACE > self.now, "{:?} soft since {:?}: no SeekBetter", key, since);
                        }
                    }
                    let next = self.cache.poll_timeout();
                    prop_assert!(next.is_none_or(|t| t > self.now), "timer {:?} not past now {:?}", next, self.now);
                }
            }
        }
        self.collect()?;
        self.check()
    }

    /// Answer an outstanding probe, updating the model first.
    fn answer(&mut self, token: u64, rtt: Option<Duration>) {
        let Some((key, deadline)) = self.outstanding.remove(&token) else {
            return;
        };
        self.retired.push(token);
        let late = self.now > deadline;
        let class = requirements(&key.0).classify(rtt.map(PerfSample::rtt).as_ref());
        if late || rtt.is_none() {
            self.lost(key);
            self.cache.probe_result(self.now, token, rtt);
            return;
        }
        self.missed.remove(&key);
        match class {
            Class::HardViolated => {
                self.bad.insert(key.clone());
                self.soft_since.remove(&key);
            }
            Class::SoftViolated => {
                self.soft_since.entry(key).or_insert(self.now);
            }
            Class::Good => {
                self.soft_since.remove(&key);
            }
        }
        self.cache.probe_result(self.now, token, rtt);
    }

    /// A probe of `key` was lost: evicted after enough in a row, else its soft run goes on.
    fn lost(&mut self, key: Key) {
        let n = self.missed.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n >= self.evict_after {
            self.bad.insert(key.clone());
            self.soft_since.remove(&key);
        }
    }

    /// A token with no outstanding probe: nothing may change.
    fn answer_unknown(&mut self, token: u64, rtt_ms: u64) -> Result<(), TestCaseError> {
        prop_assert!(self.cache.probe_target(token).is_none(), "token {} is still outstanding", token);
        let before: Vec<_> = self.cache.entries().cloned().collect();
        let timer = self.cache.poll_timeout();
        self.cache.probe_result(self.now, token, Some(ms(rtt_ms)));
        prop_assert!(self.cache.poll_output().is_none(), "an unknown token produced output");
        let after: Vec<_> = self.cache.entries().cloned().collect();
        prop_assert_eq!(before, after, "an unknown token changed the cache");
        prop_assert_eq!(timer, self.cache.poll_timeout());
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let entries: Vec<_> = self.cache.entries().cloned().collect();
        prop_assert_eq!(entries.len(), self.cache.len());
        let mut seen = BTreeSet::new();
        for w in entries.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            prop_assert!(a.level <= b.level, "levels out of order: {:?}", entries);
            if a.level == b.level {
                prop_assert!(
                    (a.rtt, &a.peer.peer) <= (b.rtt, &b.peer.peer),
                    "level {:?} not sorted by rtt: {:?}",
                    a.level,
                    entries
                );
            }
        }
        for e in &entries {
            let key = (e.service.clone(), e.peer.peer.clone());
            prop_assert!(seen.insert(key.clone()), "{:?} cached twice: {:?}", key, entries);
            prop_assert!(e.reliability <= 100);
            prop_assert!(e.level != Level::Leaving, "level 2 is flushed at the end of every round");
            prop_assert!(!self.bad.contains(&key), "{:?} violated its hard limit but is cached", key);
        }
        for i in 0..SERVICES {
            let s = service(i);
            let want = entries.iter().find(|e| e.service == s);
            prop_assert_eq!(self.cache.lookup(&s), want, "lookup({}) is not the best of level 0, then 1", s);
            if let Some(v) = self.cache.lookup(&s) {
                prop_assert!(!self.bad.contains(&(s.clone(), v.peer.peer.clone())));
            }
        }
        if !entries.is_empty() {
            prop_assert!(self.cache.poll_timeout().is_some(), "a non-empty cache must keep probing");
        }
        Ok(())
    }
}

fn run(config: &PeerCacheConfig, ops: &[Op]) -> Result<Vec<PeerCacheOutput>, TestCaseError> {
    let mut h = Harness::new(config.clone());
    for op in ops {
        h.step(op)?;
    }
    Ok(h.outputs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn peer_cache_invariants_hold(ops in prop::collection::vec(op(), 0..120)) {
        let config = PeerCacheConfig::default();
        let first = run(&config, &ops)?;
        let second = run(&config, &ops)?;
        prop_assert_eq!(first, second, "same inputs, different outputs");
    }

    /// A low promotion bar and big steps, so that promotions, demotions and drops to
    /// level 2 happen within short sequences.
    #[test]
    fn peer_cache_invariants_hold_with_eager_levels(ops in prop::collection::vec(op(), 0..120)) {
        let config = PeerCacheConfig {
            initial_reliability: 50,
            reward: 20,
            soft_penalty: 15,
            promote_above: 60,
            demote_below: 70,
            drop_below: 30,
            ..PeerCacheConfig::default()
        };
        let first = run(&config, &ops)?;
        let second = run(&config, &ops)?;
        prop_assert_eq!(first, second, "same inputs, different outputs");
    }

    /// The original's rules: one lost probe evicts, soft answers cost 10.
    #[test]
    fn peer_cache_invariants_hold_with_the_original_rules(ops in prop::collection::vec(op(), 0..120)) {
        let config = PeerCacheConfig::original();
        let first = run(&config, &ops)?;
        let second = run(&config, &ops)?;
        prop_assert_eq!(first, second, "same inputs, different outputs");
    }

    /// A small penalty, so that soft violations last long enough to ask for better.
    #[test]
    fn peer_cache_invariants_hold_with_lenient_penalty(ops in prop::collection::vec(op(), 0..200)) {
        let config =
            PeerCacheConfig { soft_penalty: 2, promote_above: 60, demote_below: 55, ..PeerCacheConfig::default() };
        let first = run(&config, &ops)?;
        let second = run(&config, &ops)?;
        prop_assert_eq!(first, second, "same inputs, different outputs");
    }
}
