//! The three-level peer cache (DESIGN.md §2).
//!
//! Entries are keyed by (service, peer). Each has a level, a reliability score r in
//! `0..=100`, the last measured RTT, the peer's addresses and the service's
//! requirements.
//!
//! - A new entry enters level 1 ([`Level::Performant`]) with r = `initial_reliability`.
//! - Every `probe_interval`, while the cache is not empty, a *round* starts: one
//!   [`PeerCacheOutput::Probe`] per entry, with a timeout equal to the entry's hard RTT.
//!   Each answer is classified: over hard → evicted at once; lost → r −=
//!   `loss_penalty`, and evicted once `lost_probes_to_evict` were lost in a row (the
//!   original: 1, ours: 2, see [`PeerCacheConfig`] for why); over soft → r −=
//!   `soft_penalty` (the original: 10; ours: 0, an answer counts as alive and the soft
//!   violation is judged by the grace alone); otherwise r += `reward` (cap 100). The
//!   RTT is recorded and the sample goes to a [`PerfEvaluator`], whose `SeekBetter`
//!   verdicts surface as [`PeerCacheOutput::SeekBetter`].
//! - When every probe of the round has been answered or has expired, levels are
//!   updated: level 0 with r < `demote_below` → level 1 (r reset); level 1 with
//!   r > `promote_above` → level 0 (r kept); level 1 with r < `drop_below` → level 2
//!   (r reset); level 2 is emptied. Each entry moves at most once per pass, so an entry
//!   demoted 0 → 1 is not promoted back in the same pass. Only entries that took part
//!   in the round are moved; an entry inserted during a round waits for the next.
//! - Rounds never overlap: when probes outlive the interval (hard RTT > interval), the
//!   next round starts as soon as the current one completes.
//!
//! Within a level entries are ordered by (RTT, peer id), so ties break
//! deterministically. [`PeerCache::lookup`] returns the first entry of the service in
//! level 0, else in level 1, considering every entry of the level (it is an index
//! lookup, O(log n), not a partial scan as in the original).

use crate::config::PeerCacheConfig;
use crate::perf::{Class, PerfEvaluator, PerfInput, PerfSample, Requirements, Verdict};
use crate::time::{earliest, Instant};
use crate::types::{ContentHash, PeerAddr, PeerId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Cache levels: lookups prefer `Reliable`, then `Performant`; `Leaving` is never returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Level 0: performant and reliable.
    Reliable = 0,
    /// Level 1: performant, not yet proven.
    Performant = 1,
    /// Level 2: on its way out.
    Leaving = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCacheOutput {
    /// Measure `peer`; report with [`PeerCache::probe_result`] quoting `token`.
    Probe { token: u64, peer: PeerAddr, timeout: Duration },
    /// An entry left the cache (hard violation, lost probe, unreliable, removed).
    Evicted { service: ContentHash, peer: PeerId, reason: String },
    /// The entry has violated its soft limit for longer than the grace.
    SeekBetter { service: ContentHash, peer: PeerId, rtt: Duration },
}

/// A read-only view of one entry, for callers and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryView {
    pub service: ContentHash,
    pub peer: PeerAddr,
    pub level: Level,
    pub reliability: u8,
    pub rtt: Duration,
}

/// Highest reliability score.
const MAX_RELIABILITY: u8 = 100;

/// Shortest probe interval used, so that a zero interval in a configuration cannot
/// start rounds at the same instant forever.
const MIN_PROBE_INTERVAL: Duration = Duration::from_micros(1);

/// Reason given for entries flushed from level 2.
pub const REASON_UNRELIABLE: &str = "unreliable";
/// Reason given for entries whose probe got no answer in time.
pub const REASON_PROBE_LOST: &str = "probe lost";

type Key = (ContentHash, PeerId);

struct Entry {
    view: EntryView,
    requirements: Requirements,
    /// Probes lost in a row.
    missed: u32,
}

/// Position of an entry among its service's entries: level, then RTT, then peer id.
type Slot = (Level, Duration, PeerId);

/// All entries of one service, with an ordered index for lookups.
#[derive(Default)]
struct ServiceEntries {
    by_peer: BTreeMap<PeerId, Entry>,
    order: BTreeSet<Slot>,
}

fn slot_of(e: &Entry) -> Slot {
    (e.view.level, e.view.rtt, e.view.peer.peer.clone())
}

struct Pending {
    key: Key,
    deadline: Instant,
}

/// The probe round in progress.
struct Round {
    /// Entries that take part in the round (present when it started).
    members: BTreeSet<Key>,
}

pub struct PeerCache {
    config: PeerCacheConfig,
    services: BTreeMap<ContentHash, ServiceEntries>,
    len: usize,
    evaluator: PerfEvaluator<Key>,
    /// Outstanding probes by token. Never empty while `round` is `Some`.
    pending: BTreeMap<u64, Pending>,
    round: Option<Round>,
    /// When the next round is due; `None` while the cache is empty.
    next_round: Option<Instant>,
    next_token: u64,
    out: VecDeque<PeerCacheOutput>,
}

impl PeerCache {
    pub fn new(config: PeerCacheConfig, soft_grace: Duration) -> Self {
        let mut config = config;
        config.probe_interval = config.probe_interval.max(MIN_PROBE_INTERVAL);
        PeerCache {
            config,
            services: BTreeMap::new(),
            len: 0,
            evaluator: PerfEvaluator::new(soft_grace),
            pending: BTreeMap::new(),
            round: None,
            next_round: None,
            next_token: 0,
            out: VecDeque::new(),
        }
    }

    /// Add `peer` as an instance of `service`, measured at `rtt`. A new entry enters
    /// level 1 with the initial reliability; an entry already cached only has its
    /// addresses, RTT and requirements updated (level and reliability are kept).
    pub fn insert(
        &mut self,
        now: Instant,
        service: &ContentHash,
        requirements: Requirements,
        peer: PeerAddr,
        rtt: Duration,
    ) {
        let was_empty = self.len == 0;
        let svc = self.services.entry(service.clone()).or_default();
        if let Some(entry) = svc.by_peer.get_mut(&peer.peer) {
            svc.order.remove(&slot_of(entry));
            entry.view.peer = peer;
            entry.view.rtt = rtt;
            entry.requirements = requirements;
            svc.order.insert(slot_of(entry));
            return;
        }
        let entry = Entry {
            view: EntryView {
                service: service.clone(),
                peer,
                level: Level::Performant,
                reliability: self.config.initial_reliability.min(MAX_RELIABILITY),
                rtt,
            },
            requirements,
            missed: 0,
        };
        svc.order.insert(slot_of(&entry));
        svc.by_peer.insert(entry.view.peer.peer.clone(), entry);
        self.len += 1;
        if was_empty && self.round.is_none() {
            self.next_round = Some(now + self.config.probe_interval);
        }
    }

    /// The best cached instance of `service`: the fastest of level 0, else the fastest
    /// of level 1. Level 2 is never returned.
    pub fn lookup(&self, service: &ContentHash) -> Option<&EntryView> {
        let svc = self.services.get(service)?;
        let (level, _, peer) = svc.order.iter().next()?;
        if *level == Level::Leaving {
            return None;
        }
        svc.by_peer.get(peer).map(|e| &e.view)
    }

    /// Remove the entry if cached (any level), emitting `Evicted` with `reason`.
    /// Returns whether it was cached.
    pub fn remove(&mut self, service: &ContentHash, peer: &PeerId, reason: &str) -> bool {
        let removed = self.evict(service, peer, reason);
        if removed {
            self.maybe_complete_round();
        }
        removed
    }

    /// The answer to probe `token`: its RTT, or `None` when lost. Unknown tokens, and
    /// tokens whose probe already expired, are ignored. An answer reported after the
    /// probe's deadline counts as lost.
    pub fn probe_result(&mut self, now: Instant, token: u64, rtt: Option<Duration>) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let rtt = if now > p.deadline { None } else { rtt };
        self.apply_sample(now, p.key, rtt);
        self.maybe_complete_round();
    }

    /// Time passed: expire overdue probes (they count as lost), complete the round
    /// when it is over, start the next round when due, and let the evaluator ask for
    /// better instances.
    pub fn handle_timeout(&mut self, now: Instant) {
        // At most two passes: starting a round sets `next_round` past `now`.
        loop {
            self.expire_probes(now);
            if self.round.is_none() && self.next_round.is_some_and(|t| t <= now) {
                if self.len == 0 {
                    self.next_round = None;
                } else {
                    self.start_round(now);
                    continue;
                }
            }
            break;
        }
        self.evaluator.handle_timeout(now);
        self.drain_evaluator();
    }

    pub fn poll_output(&mut self) -> Option<PeerCacheOutput> {
        self.out.pop_front()
    }

    /// When [`PeerCache::handle_timeout`] should next be called: the earliest
    /// outstanding probe deadline while a round runs, else the next round (if the
    /// cache is not empty), or a soft-violation grace running out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let probes = if self.round.is_some() {
            self.pending.values().map(|p| p.deadline).min()
        } else if self.len > 0 {
            self.next_round
        } else {
            None
        };
        earliest(probes, self.evaluator.poll_timeout())
    }

    /// Every entry: level 0, then 1, then 2; each level by RTT, then peer id, then service.
    pub fn entries(&self) -> impl Iterator<Item = &EntryView> + '_ {
        let mut all: Vec<&EntryView> =
            self.services.values().flat_map(|s| s.by_peer.values()).map(|e| &e.view).collect();
        all.sort_by(|a, b| (a.level, a.rtt, &a.peer.peer, &a.service).cmp(&(b.level, b.rtt, &b.peer.peer, &b.service)));
        all.into_iter()
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry for (`service`, `peer`), if cached.
    pub fn get(&self, service: &ContentHash, peer: &PeerId) -> Option<&EntryView> {
        self.services.get(service)?.by_peer.get(peer).map(|e| &e.view)
    }

    /// The level of (`service`, `peer`), if cached.
    pub fn level_of(&self, service: &ContentHash, peer: &PeerId) -> Option<Level> {
        self.get(service, peer).map(|v| v.level)
    }

    /// The entry an outstanding probe measures.
    pub fn probe_target(&self, token: u64) -> Option<(&ContentHash, &PeerId)> {
        self.pending.get(&token).map(|p| (&p.key.0, &p.key.1))
    }

    /// Whether a probe round is in progress.
    pub fn round_in_progress(&self) -> bool {
        self.round.is_some()
    }

    fn start_round(&mut self, now: Instant) {
        self.next_round = Some(now + self.config.probe_interval);
        let mut probes: Vec<(Key, PeerAddr, Duration)> = self
            .entries()
            .map(|v| {
                let timeout = self.requirements_of(&v.service, &v.peer.peer).map(|r| r.probe_timeout());
                ((v.service.clone(), v.peer.peer.clone()), v.peer.clone(), timeout.unwrap_or_default())
            })
            .collect();
        if probes.is_empty() {
            return;
        }
        let mut members = BTreeSet::new();
        for (key, peer, timeout) in probes.drain(..) {
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1);
            self.pending.insert(token, Pending { key: key.clone(), deadline: now + timeout });
            members.insert(key);
            self.out.push_back(PeerCacheOutput::Probe { token, peer, timeout });
        }
        self.round = Some(Round { members });
    }

    fn requirements_of(&self, service: &ContentHash, peer: &PeerId) -> Option<Requirements> {
        self.services.get(service)?.by_peer.get(peer).map(|e| e.requirements)
    }

    fn expire_probes(&mut self, now: Instant) {
        let overdue: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
        for token in overdue {
            if let Some(p) = self.pending.remove(&token) {
                self.apply_sample(now, p.key, None);
            }
        }
        self.maybe_complete_round();
    }

    /// Score one probe result (`None`: lost) against the entry's requirements.
    fn apply_sample(&mut self, now: Instant, key: Key, rtt: Option<Duration>) {
        let (service, peer) = &key;
        let Some(requirements) = self.requirements_of(service, peer) else {
            return;
        };
        let Some(rtt) = rtt else {
            return self.probe_lost(service, peer);
        };
        let sample = PerfSample::rtt(rtt);
        let class = requirements.classify(Some(&sample));
        if class == Class::HardViolated {
            let reason = format!(
                "hard requirement violated: rtt {} ms over {} ms",
                rtt.as_millis(),
                requirements.hard.rtt.unwrap_or_default().as_millis()
            );
            self.evict(service, peer, &reason);
            return;
        }
        let (reward, soft_penalty) = (self.config.reward, self.config.soft_penalty);
        self.modify(service, peer, |e| {
            let r = e.view.reliability;
            e.view.reliability = if class == Class::SoftViolated && soft_penalty > 0 {
                r.saturating_sub(soft_penalty)
            } else {
                r.saturating_add(reward).min(MAX_RELIABILITY)
            };
            e.view.rtt = rtt;
            e.missed = 0;
        });
        self.evaluator.handle_input(now, PerfInput::Sample { key, requirements, sample: Some(sample) });
        self.drain_evaluator();
    }

    /// A probe got no answer in time: evicted once `lost_probes_to_evict` were lost in
    /// a row, else it costs reliability (the soft-violation run, if any, goes on).
    fn probe_lost(&mut self, service: &ContentHash, peer: &PeerId) {
        let limit = self.config.lost_probes_to_evict.max(1);
        let penalty = self.config.loss_penalty;
        let mut missed = 0;
        self.modify(service, peer, |e| {
            e.missed = e.missed.saturating_add(1);
            e.view.reliability = e.view.reliability.saturating_sub(penalty);
            missed = e.missed;
        });
        if missed >= limit {
            let reason = match limit {
                1 => REASON_PROBE_LOST.to_string(),
                n => format!("{REASON_PROBE_LOST} ({n} in a row)"),
            };
            self.evict(service, peer, &reason);
        }
    }

    fn drain_evaluator(&mut self) {
        while let Some(v) = self.evaluator.poll_output() {
            match v {
                // Hard violations are evicted by the cache itself.
                Verdict::Abandon(_) => {}
                Verdict::SeekBetter((service, peer)) => {
                    if let Some(view) = self.get(&service, &peer) {
                        let rtt = view.rtt;
                        self.out.push_back(PeerCacheOutput::SeekBetter { service, peer, rtt });
                    }
                }
            }
        }
    }

    /// Change an entry, keeping the ordered index in step.
    fn modify(&mut self, service: &ContentHash, peer: &PeerId, f: impl FnOnce(&mut Entry)) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let Some(entry) = svc.by_peer.get_mut(peer) else {
            return;
        };
        svc.order.remove(&slot_of(entry));
        f(entry);
        svc.order.insert(slot_of(entry));
    }

    /// Remove an entry and everything tied to it; emits `Evicted`. Does not complete
    /// the round (callers do, once they are done).
    fn evict(&mut self, service: &ContentHash, peer: &PeerId, reason: &str) -> bool {
        let Some(svc) = self.services.get_mut(service) else {
            return false;
        };
        let Some(entry) = svc.by_peer.remove(peer) else {
            return false;
        };
        svc.order.remove(&slot_of(&entry));
        if svc.by_peer.is_empty() {
            self.services.remove(service);
        }
        self.len = self.len.saturating_sub(1);
        if self.len == 0 && self.round.is_none() {
            self.next_round = None;
        }
        let key = (service.clone(), peer.clone());
        self.pending.retain(|_, p| p.key != key);
        self.evaluator.handle_input(Instant::ZERO, PerfInput::Forget(key));
        self.out.push_back(PeerCacheOutput::Evicted {
            service: service.clone(),
            peer: peer.clone(),
            reason: reason.to_string(),
        });
        true
    }

    fn maybe_complete_round(&mut self) {
        if self.round.is_none() || !self.pending.is_empty() {
            return;
        }
        let Some(round) = self.round.take() else {
            return;
        };
        if self.len == 0 {
            self.next_round = None;
        }
        let c = &self.config;
        let (initial, demote_below, promote_above, drop_below) =
            (c.initial_reliability.min(MAX_RELIABILITY), c.demote_below, c.promote_above, c.drop_below);
        let mut leaving = Vec::new();
        for (service, peer) in &round.members {
            let Some(view) = self.get(service, peer) else {
                continue;
            };
            // Decided on the state before the pass: each entry moves at most once.
            let (level, r) = (view.level, view.reliability);
            let moved = match level {
                Level::Reliable if r < demote_below => Some((Level::Performant, initial)),
                Level::Performant if r > promote_above => Some((Level::Reliable, r)),
                Level::Performant if r < drop_below => Some((Level::Leaving, initial)),
                _ => None,
            };
            if let Some((level, r)) = moved {
                self.modify(service, peer, |e| {
                    e.view.level = level;
                    e.view.reliability = r;
                });
                if level == Level::Leaving {
                    leaving.push((service, peer));
                }
            }
        }
        for (service, peer) in leaving {
            self.evict(service, peer, REASON_UNRELIABLE);
        }
        if self.len == 0 {
            self.next_round = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::DEFAULT_PROBE_TIMEOUT;

    const GRACE: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn at(n: u64) -> Instant {
        Instant::from_micros(n * 1000)
    }
    fn secs(n: u64) -> Instant {
        at(n * 1000)
    }
    fn svc(s: &str) -> ContentHash {
        ContentHash(s.to_string())
    }
    fn pid(p: &str) -> PeerId {
        PeerId(p.to_string())
    }
    fn addr(p: &str) -> PeerAddr {
        PeerAddr::new(p, vec![format!("/dns/{p}/tcp/4001")])
    }
    /// soft 50 ms, hard 100 ms.
    fn req() -> Requirements {
        Requirements::rtt(ms(50), ms(100))
    }
    /// The original's rules: a lost probe evicts, a soft answer costs 10.
    fn cache() -> PeerCache {
        PeerCache::new(PeerCacheConfig::original(), GRACE)
    }
    fn drain(c: &mut PeerCache) -> Vec<PeerCacheOutput> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }
    /// (token, peer, timeout) of every probe in `outs`.
    fn probes(outs: &[PeerCacheOutput]) -> Vec<(u64, PeerId, Duration)> {
        outs.iter()
            .filter_map(|o| match o {
                PeerCacheOutput::Probe { token, peer, timeout } => Some((*token, peer.peer.clone(), *timeout)),
                _ => None,
            })
            .collect()
    }
    fn evicted(outs: &[PeerCacheOutput]) -> Vec<(ContentHash, PeerId, String)> {
        outs.iter()
            .filter_map(|o| match o {
                PeerCacheOutput::Evicted { service, peer, reason } => {
                    Some((service.clone(), peer.clone(), reason.clone()))
                }
                _ => None,
            })
            .collect()
    }
    fn seek_better(outs: &[PeerCacheOutput]) -> Vec<(ContentHash, PeerId, Duration)> {
        outs.iter()
            .filter_map(|o| match o {
                PeerCacheOutput::SeekBetter { service, peer, rtt } => Some((service.clone(), peer.clone(), *rtt)),
                _ => None,
            })
            .collect()
    }
    fn peers_in_order(c: &PeerCache) -> Vec<(Level, String)> {
        c.entries().map(|v| (v.level, v.peer.peer.0.clone())).collect()
    }

    /// Start the round due at `now` and answer every probe at once with `rtt_of(peer)`.
    fn round(c: &mut PeerCache, now: Instant, rtt_of: impl Fn(&PeerId) -> Option<Duration>) -> Vec<PeerCacheOutput> {
        c.handle_timeout(now);
        let mut outs = drain(c);
        for (token, peer, _) in probes(&outs) {
            c.probe_result(now, token, rtt_of(&peer));
        }
        outs.extend(drain(c));
        outs
    }

    #[derive(Clone, Copy, Debug)]
    enum O {
        Good,
        Soft,
        Hard,
        Lost,
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Exp {
        At(Level, u8),
        /// Evicted in this round, with a reason containing the text.
        Gone(&'static str),
    }

    struct Case {
        name: &'static str,
        config: PeerCacheConfig,
        /// (outcome, rounds in a row, expected state after the last of them)
        steps: Vec<(O, u32, Exp)>,
    }

    #[test]
    fn reliability_and_levels_follow_the_original_constants() {
        use Level::{Performant as L1, Reliable as L0};
        let d = PeerCacheConfig::original;
        let cases = vec![
            Case {
                name: "+1 per good round; promotion only above 90 (41 rounds); cap 100",
                config: d(),
                steps: vec![
                    (O::Good, 1, Exp::At(L1, 51)),
                    (O::Good, 39, Exp::At(L1, 90)),
                    (O::Good, 1, Exp::At(L0, 91)),
                    (O::Good, 9, Exp::At(L0, 100)),
                    (O::Good, 5, Exp::At(L0, 100)),
                ],
            },
            Case {
                name: "-10 per soft round in level 1; 10 stays; below 10 goes to level 2 and is flushed",
                config: d(),
                steps: vec![
                    (O::Soft, 1, Exp::At(L1, 40)),
                    (O::Good, 1, Exp::At(L1, 41)),
                    (O::Soft, 1, Exp::At(L1, 31)),
                    (O::Soft, 2, Exp::At(L1, 11)),
                    (O::Soft, 1, Exp::Gone(REASON_UNRELIABLE)),
                ],
            },
            Case {
                name: "exactly 10 is kept, 0 is dropped",
                config: d(),
                steps: vec![(O::Soft, 4, Exp::At(L1, 10)), (O::Soft, 1, Exp::Gone(REASON_UNRELIABLE))],
            },
            Case {
                name: "level 0 keeps r = 90, demotes below 90 with r reset to 50",
                config: d(),
                steps: vec![
                    (O::Good, 41, Exp::At(L0, 91)),
                    (O::Good, 9, Exp::At(L0, 100)),
                    (O::Soft, 1, Exp::At(L0, 90)),
                    (O::Soft, 1, Exp::At(L1, 50)),
                    (O::Good, 1, Exp::At(L1, 51)),
                    (O::Good, 40, Exp::At(L0, 91)),
                ],
            },
            Case {
                name: "hard violation evicts at once, even from level 0",
                config: d(),
                steps: vec![(O::Good, 41, Exp::At(L0, 91)), (O::Hard, 1, Exp::Gone("hard"))],
            },
            Case {
                name: "hard violation evicts a new entry",
                config: d(),
                steps: vec![(O::Hard, 1, Exp::Gone("hard"))],
            },
            Case {
                name: "lost probe evicts at once",
                config: d(),
                steps: vec![(O::Good, 3, Exp::At(L1, 53)), (O::Lost, 1, Exp::Gone(REASON_PROBE_LOST))],
            },
            Case {
                name: "floor 0 (no drop level configured, penalty 30)",
                config: PeerCacheConfig { drop_below: 0, soft_penalty: 30, ..d() },
                steps: vec![(O::Soft, 1, Exp::At(L1, 20)), (O::Soft, 1, Exp::At(L1, 0)), (O::Soft, 1, Exp::At(L1, 0))],
            },
            Case {
                name: "cap 100 with a large reward",
                config: PeerCacheConfig { reward: 200, ..d() },
                steps: vec![(O::Good, 1, Exp::At(L0, 100)), (O::Good, 1, Exp::At(L0, 100))],
            },
            Case {
                name: "an entry demoted 0 -> 1 is not promoted back in the same pass",
                config: PeerCacheConfig { initial_reliability: 95, ..d() },
                steps: vec![
                    (O::Good, 1, Exp::At(L0, 96)),
                    (O::Soft, 1, Exp::At(L1, 95)),
                    (O::Good, 1, Exp::At(L0, 96)),
                ],
            },
            Case {
                name: "defaults: one lost probe costs 10 and keeps the entry; two in a row evict",
                config: PeerCacheConfig::default(),
                steps: vec![
                    (O::Good, 3, Exp::At(L1, 53)),
                    (O::Lost, 1, Exp::At(L1, 43)),
                    (O::Good, 1, Exp::At(L1, 44)),
                    (O::Lost, 1, Exp::At(L1, 34)),
                    (O::Lost, 1, Exp::Gone(REASON_PROBE_LOST)),
                ],
            },
            Case {
                name: "defaults: soft answers count as alive (+1), so only the grace acts on them",
                config: PeerCacheConfig::default(),
                steps: vec![(O::Soft, 45, Exp::At(L0, 95)), (O::Hard, 1, Exp::Gone("hard"))],
            },
            Case {
                name: "defaults: scattered losses (1 in 5) never evict a live peer",
                config: PeerCacheConfig::default(),
                steps: vec![
                    (O::Good, 4, Exp::At(L1, 54)),
                    (O::Lost, 1, Exp::At(L1, 44)),
                    (O::Good, 4, Exp::At(L1, 48)),
                    (O::Lost, 1, Exp::At(L1, 38)),
                    (O::Good, 4, Exp::At(L1, 42)),
                ],
            },
        ];
        for case in cases {
            let mut c = PeerCache::new(case.config.clone(), GRACE);
            let (s, p) = (svc("svc"), pid("p"));
            c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
            assert_eq!(c.level_of(&s, &p), Some(L1), "{}: insertion", case.name);
            assert_eq!(c.get(&s, &p).map(|v| v.reliability), Some(50.max(case.config.initial_reliability).min(100)));
            let mut k = 0u64;
            let mut gone = false;
            for (i, (outcome, times, exp)) in case.steps.iter().enumerate() {
                assert!(!gone, "{}: steps after eviction", case.name);
                for rep in 0..*times {
                    k += 1;
                    let now = secs(k);
                    assert_eq!(c.poll_timeout(), Some(now), "{}: round {k} due", case.name);
                    c.handle_timeout(now);
                    let mut outs = drain(&mut c);
                    let ps = probes(&outs);
                    assert_eq!(ps.len(), 1, "{}: round {k} probes", case.name);
                    let (token, _, timeout) = ps[0].clone();
                    assert_eq!(timeout, ms(100));
                    let answer_at = now + ms(5);
                    match outcome {
                        O::Good => c.probe_result(answer_at, token, Some(ms(20))),
                        O::Soft => c.probe_result(answer_at, token, Some(ms(70))),
                        O::Hard => c.probe_result(answer_at, token, Some(ms(150))),
                        O::Lost => {
                            assert_eq!(c.poll_timeout(), Some(now + ms(100)));
                            c.handle_timeout(now + ms(100));
                        }
                    }
                    outs.extend(drain(&mut c));
                    let last = rep + 1 == *times;
                    match exp {
                        Exp::Gone(why) if last => {
                            let ev = evicted(&outs);
                            assert_eq!(ev.len(), 1, "{}: step {i} round {k}: {outs:?}", case.name);
                            assert!(ev[0].2.contains(why), "{}: reason {:?}", case.name, ev[0].2);
                            assert!(c.get(&s, &p).is_none() && c.lookup(&s).is_none() && c.is_empty());
                            assert_eq!(c.poll_timeout(), None, "{}: empty cache has no timer", case.name);
                            gone = true;
                        }
                        _ => {
                            assert!(evicted(&outs).is_empty(), "{}: step {i} round {k}: {outs:?}", case.name);
                        }
                    }
                    if let (Exp::At(level, r), true) = (exp, last) {
                        let v = c.get(&s, &p).cloned();
                        assert_eq!(
                            v.map(|v| (v.level, v.reliability)),
                            Some((*level, *r)),
                            "{}: step {i} after round {k}",
                            case.name
                        );
                        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.clone()), Some(p.clone()));
                    }
                }
            }
        }
    }

    #[test]
    fn reinsert_updates_addrs_rtt_requirements_but_keeps_level_and_reliability() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        for k in 1..=3 {
            round(&mut c, secs(k), |_| Some(ms(10)));
        }
        assert_eq!(c.get(&s, &pid("p")).map(|v| (v.level, v.reliability)), Some((Level::Performant, 53)));
        let moved = PeerAddr::new("p", vec!["/ip4/10.0.0.9/tcp/1".into()]);
        c.insert(secs(3), &s, Requirements::rtt(ms(5), ms(300)), moved.clone(), ms(40));
        let v = c.get(&s, &pid("p")).cloned();
        assert_eq!(
            v,
            Some(EntryView { service: s.clone(), peer: moved, level: Level::Performant, reliability: 53, rtt: ms(40) })
        );
        assert_eq!(c.len(), 1);
        // The new requirements apply: 40 ms is now a soft violation, timeout is 300 ms.
        let outs = round(&mut c, secs(4), |_| Some(ms(40)));
        assert_eq!(probes(&outs)[0].2, ms(300));
        assert_eq!(c.get(&s, &pid("p")).map(|v| v.reliability), Some(43));
    }

    #[test]
    fn lookup_prefers_level_0_over_a_faster_level_1_entry() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("slow"), ms(30));
        for k in 1..=41 {
            round(&mut c, secs(k), |_| Some(ms(30)));
        }
        assert_eq!(c.level_of(&s, &pid("slow")), Some(Level::Reliable));
        c.insert(secs(41), &s, req(), addr("fast"), ms(5));
        assert_eq!(c.level_of(&s, &pid("fast")), Some(Level::Performant));
        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.0.as_str()), Some("slow"));
        assert_eq!(peers_in_order(&c), vec![(Level::Reliable, "slow".into()), (Level::Performant, "fast".into())]);
        assert!(c.remove(&s, &pid("slow"), "request failed"));
        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.0.as_str()), Some("fast"));
    }

    #[test]
    fn levels_are_sorted_by_rtt_with_ties_broken_by_peer_id() {
        let mut c = cache();
        let s = svc("a");
        for (p, rtt) in [("p3", 20), ("p1", 10), ("p0", 30), ("p2", 10)] {
            c.insert(Instant::ZERO, &s, req(), addr(p), ms(rtt));
        }
        let order: Vec<String> = c.entries().map(|v| v.peer.peer.0.clone()).collect();
        assert_eq!(order, ["p1", "p2", "p3", "p0"]);
        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.0.as_str()), Some("p1"));
        // Probe RTTs re-sort the level.
        round(&mut c, secs(1), |p| Some(ms(if p.0 == "p0" { 1 } else { 40 })));
        let order: Vec<String> = c.entries().map(|v| v.peer.peer.0.clone()).collect();
        assert_eq!(order, ["p0", "p1", "p2", "p3"]);
        assert_eq!(c.lookup(&s).map(|v| (v.peer.peer.0.as_str(), v.rtt)), Some(("p0", ms(1))));
        // Re-inserting with a new RTT re-sorts too.
        c.insert(secs(1), &s, req(), addr("p3"), ms(0));
        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.0.as_str()), Some("p3"));
    }

    #[test]
    fn services_are_isolated() {
        let mut c = cache();
        let (a, b) = (svc("a"), svc("b"));
        c.insert(Instant::ZERO, &a, req(), addr("pa"), ms(40));
        c.insert(Instant::ZERO, &b, req(), addr("pb"), ms(1));
        c.insert(Instant::ZERO, &b, req(), addr("both"), ms(2));
        c.insert(Instant::ZERO, &a, req(), addr("both"), ms(50));
        assert_eq!(c.lookup(&a).map(|v| v.peer.peer.0.as_str()), Some("pa"));
        assert_eq!(c.lookup(&b).map(|v| v.peer.peer.0.as_str()), Some("pb"));
        assert_eq!(c.lookup(&svc("c")), None);
        assert_eq!(c.len(), 4);
        assert!(!c.remove(&a, &pid("pb"), "x"));
        assert!(drain(&mut c).is_empty());
        assert!(c.remove(&a, &pid("pa"), "x"));
        assert_eq!(c.lookup(&a).map(|v| v.peer.peer.0.as_str()), Some("both"));
        assert!(c.remove(&a, &pid("both"), "x"));
        assert_eq!(c.lookup(&a), None);
        assert_eq!(c.level_of(&b, &pid("both")), Some(Level::Performant));
        // A probe of one (service, peer) does not touch the same peer under another service.
        c.insert(Instant::ZERO, &a, req(), addr("both"), ms(50));
        let outs = round(&mut c, secs(1), |_| Some(ms(10)));
        assert_eq!(probes(&outs).len(), 3);
        assert_eq!(c.get(&a, &pid("both")).map(|v| v.reliability), Some(51));
        assert_eq!(c.get(&b, &pid("both")).map(|v| v.reliability), Some(51));
    }

    #[test]
    fn lookup_and_remove_consider_the_whole_level() {
        let mut c = cache();
        let (x, y) = (svc("x"), svc("y"));
        for i in 1..=4 {
            c.insert(Instant::ZERO, &x, req(), addr(&format!("x{i}")), ms(i));
        }
        c.insert(Instant::ZERO, &y, req(), addr("y5"), ms(5));
        for i in 6..=20 {
            c.insert(Instant::ZERO, &x, req(), addr(&format!("x{i}")), ms(i));
        }
        let pos = c.entries().position(|v| v.service == y);
        assert_eq!(pos, Some(4), "the matching entry is the 5th of its level");
        assert_eq!(c.lookup(&y).map(|v| v.peer.peer.0.as_str()), Some("y5"));
        assert!(c.remove(&y, &pid("y5"), "gone"));
        assert_eq!(c.lookup(&y), None);
        // The 20th entry of the level can be removed too.
        assert!(c.remove(&x, &pid("x20"), "gone"));
        assert_eq!(c.len(), 18);
    }

    #[test]
    fn remove_emits_evicted_with_the_reason() {
        let mut c = cache();
        let s = svc("a");
        assert!(!c.remove(&s, &pid("p"), "nothing"));
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        assert!(c.remove(&s, &pid("p"), "request failed"));
        assert_eq!(
            drain(&mut c),
            vec![PeerCacheOutput::Evicted { service: s.clone(), peer: pid("p"), reason: "request failed".into() }]
        );
        assert!(!c.remove(&s, &pid("p"), "again"));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn probes_every_interval_while_not_empty() {
        let mut c = cache();
        let s = svc("a");
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(secs(5));
        assert!(drain(&mut c).is_empty());
        c.insert(at(200), &s, req(), addr("p"), ms(10));
        assert_eq!(c.poll_timeout(), Some(at(1200)));
        c.handle_timeout(at(1199));
        assert!(drain(&mut c).is_empty());
        c.handle_timeout(at(1200));
        let outs = drain(&mut c);
        let ps = probes(&outs);
        assert_eq!(ps.len(), 1);
        assert_eq!(c.probe_target(ps[0].0), Some((&s, &pid("p"))));
        assert!(c.round_in_progress());
        assert_eq!(c.poll_timeout(), Some(at(1300)), "the probe deadline");
        c.probe_result(at(1210), ps[0].0, Some(ms(10)));
        assert!(!c.round_in_progress());
        assert_eq!(c.poll_timeout(), Some(at(2200)), "the next round");
        let outs = round(&mut c, at(2200), |_| Some(ms(10)));
        let ps2 = probes(&outs);
        assert_eq!(ps2.len(), 1);
        assert_ne!(ps2[0].0, ps[0].0, "tokens are unique");
        assert!(c.remove(&s, &pid("p"), "x"));
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(secs(10));
        assert!(probes(&drain(&mut c)).is_empty());
    }

    #[test]
    fn probe_timeout_is_the_hard_rtt() {
        let mut c = cache();
        c.insert(Instant::ZERO, &svc("a"), req(), addr("a"), ms(10));
        c.insert(Instant::ZERO, &svc("b"), Requirements::rtt(ms(100), ms(250)), addr("b"), ms(10));
        c.insert(Instant::ZERO, &svc("c"), Requirements::default(), addr("c"), ms(10));
        c.handle_timeout(secs(1));
        let mut ps: Vec<(String, Duration)> = probes(&drain(&mut c)).into_iter().map(|(_, p, t)| (p.0, t)).collect();
        ps.sort();
        assert_eq!(ps, vec![("a".into(), ms(100)), ("b".into(), ms(250)), ("c".into(), DEFAULT_PROBE_TIMEOUT)]);
        assert_eq!(c.poll_timeout(), Some(secs(1) + ms(100)));
    }

    #[test]
    fn an_unanswered_probe_evicts_at_its_deadline_and_late_answers_are_ignored() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        c.insert(Instant::ZERO, &s, req(), addr("q"), ms(20));
        c.handle_timeout(secs(1));
        let ps = probes(&drain(&mut c));
        let tok = |name: &str| ps.iter().find(|(_, p, _)| p.0 == name).map(|(t, _, _)| *t).unwrap_or(u64::MAX);
        c.probe_result(secs(1) + ms(20), tok("q"), Some(ms(20)));
        c.handle_timeout(secs(1) + ms(99));
        assert!(drain(&mut c).is_empty());
        assert!(c.get(&s, &pid("p")).is_some());
        c.handle_timeout(secs(1) + ms(100));
        let ev = evicted(&drain(&mut c));
        assert_eq!(ev, vec![(s.clone(), pid("p"), REASON_PROBE_LOST.to_string())]);
        assert_eq!(c.lookup(&s).map(|v| v.peer.peer.0.as_str()), Some("q"));
        // A late answer changes nothing.
        c.probe_result(secs(1) + ms(150), tok("p"), Some(ms(10)));
        c.probe_result(secs(1) + ms(150), 9999, Some(ms(10)));
        assert!(drain(&mut c).is_empty());
        assert!(c.get(&s, &pid("p")).is_none());
        assert_eq!(c.get(&s, &pid("q")).map(|v| v.reliability), Some(51));
        // An answer reported after the deadline, before the timer fired, is lost too.
        c.handle_timeout(secs(2));
        let ps = probes(&drain(&mut c));
        c.probe_result(secs(2) + ms(101), ps[0].0, Some(ms(10)));
        assert_eq!(evicted(&drain(&mut c)), vec![(s.clone(), pid("q"), REASON_PROBE_LOST.to_string())]);
        // A token answered twice counts once.
        c.insert(secs(2), &s, req(), addr("r"), ms(10));
        c.handle_timeout(secs(3) + ms(101));
        let ps = probes(&drain(&mut c));
        c.probe_result(secs(3) + ms(110), ps[0].0, Some(ms(10)));
        c.probe_result(secs(3) + ms(111), ps[0].0, Some(ms(10)));
        assert_eq!(c.get(&s, &pid("r")).map(|v| v.reliability), Some(51));
    }

    #[test]
    fn an_entry_inserted_during_a_round_is_not_part_of_it() {
        let config = PeerCacheConfig { initial_reliability: 95, ..PeerCacheConfig::original() };
        let mut c = PeerCache::new(config, GRACE);
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("old"), ms(10));
        c.handle_timeout(secs(1));
        let ps = probes(&drain(&mut c));
        assert_eq!(ps.len(), 1);
        c.insert(secs(1) + ms(1), &s, req(), addr("new"), ms(10));
        c.probe_result(secs(1) + ms(10), ps[0].0, Some(ms(10)));
        assert!(!c.round_in_progress());
        // r 95 > 90 would promote "new" had it taken part.
        assert_eq!(c.get(&s, &pid("old")).map(|v| (v.level, v.reliability)), Some((Level::Reliable, 96)));
        assert_eq!(c.get(&s, &pid("new")).map(|v| (v.level, v.reliability)), Some((Level::Performant, 95)));
        let outs = round(&mut c, secs(2), |_| Some(ms(10)));
        assert_eq!(probes(&outs).len(), 2);
        assert_eq!(c.get(&s, &pid("new")).map(|v| (v.level, v.reliability)), Some((Level::Reliable, 96)));
    }

    #[test]
    fn rounds_do_not_overlap_when_probes_outlive_the_interval() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, Requirements::rtt(ms(1000), ms(2500)), addr("p"), ms(10));
        c.handle_timeout(secs(1));
        let ps = probes(&drain(&mut c));
        assert_eq!(ps[0].2, ms(2500));
        c.handle_timeout(secs(2));
        c.handle_timeout(secs(3));
        assert!(drain(&mut c).is_empty(), "no second round while the first runs");
        assert_eq!(c.poll_timeout(), Some(secs(1) + ms(2500)));
        c.probe_result(secs(3) + ms(200), ps[0].0, Some(ms(2200)));
        assert_eq!(c.get(&s, &pid("p")).map(|v| (v.reliability, v.rtt)), Some((40, ms(2200))));
        assert!(c.poll_timeout().is_some_and(|t| t <= secs(3) + ms(200)), "the next round is overdue");
        c.handle_timeout(secs(3) + ms(200));
        assert_eq!(probes(&drain(&mut c)).len(), 1);
        assert!(c.poll_timeout().is_some_and(|t| t > secs(3) + ms(200)));
    }

    #[test]
    fn removing_the_last_outstanding_entry_completes_the_round() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        c.insert(Instant::ZERO, &s, req(), addr("q"), ms(10));
        c.handle_timeout(secs(1));
        let ps = probes(&drain(&mut c));
        let p_tok = ps.iter().find(|(_, p, _)| p.0 == "p").map(|(t, _, _)| *t).unwrap_or(u64::MAX);
        c.probe_result(secs(1), p_tok, Some(ms(10)));
        assert!(c.round_in_progress());
        assert!(c.remove(&s, &pid("q"), "request failed"));
        assert!(!c.round_in_progress());
        assert_eq!(c.poll_timeout(), Some(secs(2)));
    }

    #[test]
    fn a_probe_of_a_removed_entry_does_not_touch_its_reinsertion() {
        let mut c = cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        c.insert(Instant::ZERO, &s, req(), addr("q"), ms(10));
        c.handle_timeout(secs(1));
        let ps = probes(&drain(&mut c));
        let tok = |name: &str| ps.iter().find(|(_, p, _)| p.0 == name).map(|(t, _, _)| *t).unwrap_or(u64::MAX);
        assert!(c.remove(&s, &pid("p"), "request failed"));
        assert_eq!(c.probe_target(tok("p")), None);
        c.insert(secs(1) + ms(1), &s, req(), addr("p"), ms(10));
        c.probe_result(secs(1) + ms(2), tok("p"), Some(ms(70)));
        assert_eq!(c.get(&s, &pid("p")).map(|v| v.reliability), Some(50), "the old probe is ignored");
        // Its deadline passing does not evict the new entry either (q's does evict q).
        drain(&mut c);
        c.handle_timeout(secs(1) + ms(100));
        assert_eq!(evicted(&drain(&mut c)), vec![(s.clone(), pid("q"), REASON_PROBE_LOST.to_string())]);
        assert!(c.get(&s, &pid("p")).is_some());
        assert!(!c.round_in_progress());
    }

    #[test]
    fn zero_interval_and_zero_hard_rtt_do_not_spin() {
        let config = PeerCacheConfig { probe_interval: Duration::ZERO, ..PeerCacheConfig::original() };
        let mut c = PeerCache::new(config, Duration::ZERO);
        let s = svc("a");
        c.insert(secs(1), &s, Requirements::rtt(ms(0), ms(0)), addr("p"), ms(0));
        let t = c.poll_timeout();
        assert!(t.is_some_and(|t| t > secs(1)));
        let now = t.unwrap_or(secs(2));
        c.handle_timeout(now);
        let outs = drain(&mut c);
        assert_eq!(probes(&outs).len(), 1);
        assert_eq!(evicted(&outs).len(), 1, "a zero timeout expires at once: {outs:?}");
        assert_eq!(c.poll_timeout(), None);
    }

    /// The shipped defaults: soft answers cost no reliability, so only the grace acts
    /// on them (with the original's −10, 5 soft rounds flush an entry first).
    fn soft_cache() -> PeerCache {
        PeerCache::new(PeerCacheConfig::default(), GRACE)
    }

    #[test]
    fn seek_better_after_soft_violations_persist_for_the_grace() {
        let mut c = soft_cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        for k in 1..=10 {
            let outs = round(&mut c, secs(k), |_| Some(ms(70)));
            assert!(seek_better(&outs).is_empty(), "round {k}: {outs:?}");
        }
        assert_eq!(c.poll_timeout(), Some(secs(11)));
        c.handle_timeout(Instant::from_micros(11_000_000 - 1));
        assert!(seek_better(&drain(&mut c)).is_empty(), "not before the grace");
        let outs = round(&mut c, secs(11), |_| Some(ms(70)));
        assert_eq!(seek_better(&outs), vec![(s.clone(), pid("p"), ms(70))]);
        // Asked once per grace while it persists.
        for k in 12..=20 {
            assert!(seek_better(&round(&mut c, secs(k), |_| Some(ms(70)))).is_empty());
        }
        assert_eq!(seek_better(&round(&mut c, secs(21), |_| Some(ms(70)))).len(), 1);
    }

    #[test]
    fn a_good_sample_resets_the_grace() {
        let mut c = soft_cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        let mut asked = Vec::new();
        for k in 1..=20 {
            let rtt = if k == 6 { ms(10) } else { ms(70) };
            if !seek_better(&round(&mut c, secs(k), |_| Some(rtt))).is_empty() {
                asked.push(k);
            }
        }
        assert_eq!(asked, vec![17], "the run restarts at 7 s, so the grace ends at 17 s");
    }

    #[test]
    fn removal_forgets_the_soft_run() {
        let mut c = soft_cache();
        let s = svc("a");
        c.insert(Instant::ZERO, &s, req(), addr("p"), ms(10));
        for k in 1..=9 {
            round(&mut c, secs(k), |_| Some(ms(70)));
        }
        assert!(c.remove(&s, &pid("p"), "x"));
        c.insert(secs(9), &s, req(), addr("p"), ms(10));
        drain(&mut c);
        let outs = round(&mut c, secs(10), |_| Some(ms(70)));
        assert!(seek_better(&outs).is_empty());
        assert_eq!(c.poll_timeout(), Some(secs(11)), "the next round, not the old grace");
        let outs = round(&mut c, secs(11), |_| Some(ms(70)));
        assert!(seek_better(&outs).is_empty(), "the old run (from 1 s) is forgotten");
    }
}
