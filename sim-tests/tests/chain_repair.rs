//! L4 chains under faults, simulated: the core's chain `Link` machines of the client
//! and of every hop, driven over a modelled network of hosts (up or crashed, links
//! partitioned or not). A middle hop's host crashes, or is cut off from the hop
//! before it; the chain must be complete again within a bound, repaired by the hop
//! before the failed one, while the client's link (its socket) survives.
//!
//! What the model simplifies: a set-up takes a fixed time (placing an existing
//! instance, or allocating on the first live reachable host with a longer delay); a
//! host crash or a partition gives no error on the stream (only probes find it, as
//! with a powered-off machine); bytes are not modelled (the chain carries UDP, so
//! nothing is in flight in the TCP sense). The real streams, sidecars and repair
//! run in the end-to-end tests (`bins/tests/l4.rs`).

use physarum_core::chain::{Link, LinkConfig, LinkInput, LinkOutput, Placed, SetupError};
use physarum_core::time::Instant;
use physarum_core::types::PeerId;
use physarum_core::wire::{HopChoice, L4Proto};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const HARD: Duration = Duration::from_millis(300);
const RTT: Duration = Duration::from_millis(5);
const PLACE: Duration = Duration::from_millis(20);
const ALLOCATE: Duration = Duration::from_millis(400);
/// How long after a fault the chain must be whole again: a probe interval, the
/// hard limit, the overdue slack, and set-ups down the rest of the chain.
const REPAIR_BOUND: Duration = Duration::from_secs(4);

/// Who owns a link: the client, or an instance (a hop).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Client,
    Hop(PeerId),
}

struct Slot {
    host: usize,
    /// Index of the service this link leads to.
    next: usize,
    link: Link,
    /// The instance the link leads to (once set up).
    peer: Option<PeerId>,
    /// A set-up in progress: the chosen instance, and when its answer comes (once
    /// the chosen hop's own link is up, for a middle hop).
    setup: Option<(PeerId, Option<Instant>)>,
    probe: Option<(u64, Instant, Option<Duration>)>,
    ended: Option<String>,
}

struct World {
    now: Instant,
    services: Vec<String>,
    hosts_up: Vec<bool>,
    cut: BTreeSet<(usize, usize)>,
    /// Instance → (service index, host).
    instances: BTreeMap<PeerId, (usize, usize)>,
    next_instance: u64,
    slots: BTreeMap<Owner, Slot>,
    trace: Vec<String>,
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

impl World {
    fn new(services: usize, hosts: usize) -> World {
        let mut w = World {
            now: Instant::ZERO,
            services: (1..=services).map(|i| format!("s{i}")).collect(),
            hosts_up: vec![true; hosts],
            cut: BTreeSet::new(),
            instances: BTreeMap::new(),
            next_instance: 0,
            slots: BTreeMap::new(),
            trace: Vec::new(),
        };
        w.add_slot(Owner::Client, 0, 0);
        w
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.hosts_up[a] && self.hosts_up[b] && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn add_slot(&mut self, owner: Owner, host: usize, next: usize) {
        let link = Link::new(LinkConfig::default(), L4Proto::Udp);
        let slot = Slot { host, next, link, peer: None, setup: None, probe: None, ended: None };
        self.slots.insert(owner.clone(), slot);
        self.pump(&owner);
    }

    /// Find or allocate an instance of service `next` reachable from `host`: an
    /// existing one first (in instance order), else a new one on the live,
    /// reachable host with the fewest instances (the client's host 0 hosts none).
    fn place(&mut self, host: usize, next: usize) -> Option<(PeerId, Duration)> {
        let found = self.instances.iter().find(|(_, (s, h))| *s == next && self.reachable(host, *h));
        if let Some((peer, _)) = found {
            return Some((peer.clone(), PLACE));
        }
        let load = |h: usize| self.instances.values().filter(|(_, on)| *on == h).count();
        let target = (1..self.hosts_up.len()).filter(|h| self.reachable(host, *h)).min_by_key(|h| (load(*h), *h))?;
        self.next_instance += 1;
        let peer = PeerId(format!("{}#{}@h{target}", self.services[next], self.next_instance));
        self.instances.insert(peer.clone(), (next, target));
        Some((peer, ALLOCATE))
    }

    /// Run the owner's link outputs.
    fn pump(&mut self, owner: &Owner) {
        loop {
            let Some(slot) = self.slots.get_mut(owner) else { return };
            let Some(out) = slot.link.poll_output() else { return };
            let (host, next) = (slot.host, slot.next);
            self.trace.push(format!("{:?} {owner:?} {out:?}", self.now));
            match out {
                LinkOutput::Setup { .. } => match self.place(host, next) {
                    Some((peer, delay)) => {
                        let more = next + 1 < self.services.len();
                        let at = self.now + delay;
                        let slot = self.slots.get_mut(owner).unwrap();
                        // A middle hop answers once its own link is up.
                        slot.setup = Some((peer.clone(), (!more).then_some(at)));
                        if more {
                            let peer_host = self.instances[&peer].1;
                            self.add_slot(Owner::Hop(peer), peer_host, next + 1);
                        }
                    }
                    None => {
                        let e = SetupError {
                            hop: 0,
                            service: self.services[next].clone(),
                            status: 502,
                            reason: "no host".into(),
                        };
                        let now = self.now;
                        let slot = self.slots.get_mut(owner).unwrap();
                        slot.link.handle_input(now, LinkInput::SetupDone(Err(e)));
                    }
                },
                LinkOutput::Probe { id, peer, timeout } => {
                    let answers = self.instances.get(&peer).is_some_and(|(_, h)| self.reachable(host, *h));
                    let (at, rtt) = if answers { (self.now + RTT, Some(RTT)) } else { (self.now + timeout, None) };
                    self.slots.get_mut(owner).unwrap().probe = Some((id, at, rtt));
                }
                LinkOutput::Evict { .. } => {
                    let slot = self.slots.get_mut(owner).unwrap();
                    // The replaced hop's own link goes with it (its upstream left).
                    if let Some(old) = slot.peer.take() {
                        self.drop_subtree(&Owner::Hop(old));
                    }
                }
                LinkOutput::Ready { .. } => {
                    let slot = self.slots.get_mut(owner).unwrap();
                    let peer = slot.setup.take().map(|(p, _)| p);
                    slot.peer = peer;
                    self.answer_parent(owner, Ok(()));
                }
                LinkOutput::Failed(e) => {
                    self.slots.get_mut(owner).unwrap().ended = Some(format!("failed: {}", e.reason));
                    self.answer_parent(owner, Err(e));
                }
                LinkOutput::Reset { reason } => self.slots.get_mut(owner).unwrap().ended = Some(reason),
                LinkOutput::Teardown => self.slots.get_mut(owner).unwrap().ended = Some("teardown".into()),
                LinkOutput::EndUpstream => {}
            }
        }
    }

    /// A hop's first set-up ended: the link that chose it gets its answer now.
    fn answer_parent(&mut self, owner: &Owner, result: Result<(), SetupError>) {
        let Owner::Hop(me) = owner else { return };
        let now = self.now;
        let parent = self.slots.iter_mut().find(|(_, s)| matches!(&s.setup, Some((p, None)) if p == me));
        let Some((_, parent)) = parent else { return };
        match result {
            Ok(()) => parent.setup = Some((me.clone(), Some(now + PLACE))),
            Err(e) => {
                parent.setup = None;
                let e = SetupError { hop: e.hop + 1, ..e };
                parent.link.handle_input(now, LinkInput::SetupDone(Err(e)));
            }
        }
    }

    fn drop_subtree(&mut self, owner: &Owner) {
        if let Some(slot) = self.slots.remove(owner) {
            if let Some(p) = slot.peer.or(slot.setup.map(|(p, _)| p)) {
                self.drop_subtree(&Owner::Hop(p));
            }
        }
    }

    fn next_event(&self) -> Option<Instant> {
        self.slots
            .values()
            .flat_map(|s| {
                [
                    s.link.poll_timeout(),
                    s.setup.as_ref().and_then(|(_, at)| *at),
                    s.probe.as_ref().map(|(_, at, _)| *at),
                ]
            })
            .flatten()
            .min()
    }

    /// Advance to `until`, handling every event on the way.
    fn run_until(&mut self, until: Instant) {
        while let Some(at) = self.next_event().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            let owners: Vec<Owner> = self.slots.keys().cloned().collect();
            for owner in owners {
                let now = self.now;
                let Some(slot) = self.slots.get_mut(&owner) else { continue };
                if let Some((peer, Some(at))) = slot.setup.clone() {
                    if at <= now {
                        slot.setup = Some((peer.clone(), None));
                        let hops = vec![HopChoice { service: String::new(), instance: peer.clone() }];
                        let placed = Placed { peer, hops, hard: HARD };
                        slot.link.handle_input(now, LinkInput::SetupDone(Ok(placed)));
                    }
                }
                if let Some((id, at, rtt)) = slot.probe {
                    if at <= now {
                        slot.probe = None;
                        slot.link.handle_input(now, LinkInput::ProbeDone { id, rtt, in_flight: false });
                    }
                }
                if slot.link.poll_timeout().is_some_and(|t| t <= now) {
                    slot.link.handle_input(now, LinkInput::Tick);
                }
                self.pump(&owner);
            }
        }
        self.now = self.now.max(until);
    }

    fn crash(&mut self, host: usize) {
        self.trace.push(format!("{:?} crash h{host}", self.now));
        self.hosts_up[host] = false;
        self.instances.retain(|_, (_, h)| *h != host);
        // What ran there is gone; links towards it notice by their probes.
        let dead: Vec<Owner> = self.slots.iter().filter(|(_, s)| s.host == host).map(|(o, _)| o.clone()).collect();
        for o in dead {
            self.slots.remove(&o);
        }
    }

    fn partition(&mut self, a: usize, b: usize) {
        self.trace.push(format!("{:?} partition h{a} h{b}", self.now));
        self.cut.insert((a.min(b), a.max(b)));
    }

    /// The chain from the client: each hop's instance, if the whole chain is up.
    fn chain(&self) -> Option<Vec<PeerId>> {
        let mut owner = Owner::Client;
        let mut host = 0;
        let mut hops = Vec::new();
        for _ in 0..self.services.len() {
            let slot = self.slots.get(&owner)?;
            let peer = slot.peer.clone().filter(|_| slot.link.is_up())?;
            let (_, peer_host) = *self.instances.get(&peer)?;
            if !self.reachable(host, peer_host) {
                return None;
            }
            hops.push(peer.clone());
            host = peer_host;
            owner = Owner::Hop(peer);
        }
        Some(hops)
    }

    fn host_of(&self, peer: &PeerId) -> usize {
        self.instances[peer].1
    }

    fn client(&self) -> &Slot {
        &self.slots[&Owner::Client]
    }
}

fn at(secs: f64) -> Instant {
    Instant::ZERO + Duration::from_secs_f64(secs)
}

/// Run until the chain is whole, at most `bound` after `from`; the time it took.
fn whole_within(w: &mut World, from: Instant, bound: Duration) -> Duration {
    let mut t = from;
    while t <= from + bound {
        w.run_until(t);
        if w.chain().is_some() {
            return Duration::from_micros(t.as_micros() - from.as_micros());
        }
        t += ms(10);
    }
    panic!("the chain is not whole {bound:?} after the fault:\n{}", w.trace.join("\n"));
}

#[test]
fn a_crashed_middle_hop_is_replaced_and_the_client_link_survives() {
    let mut w = World::new(3, 6);
    whole_within(&mut w, Instant::ZERO, ms(3000));
    let before = w.chain().unwrap();
    let middle_host = w.host_of(&before[1]);
    w.run_until(at(5.0));
    w.crash(middle_host);
    let took = whole_within(&mut w, at(5.0), REPAIR_BOUND);
    let after = w.chain().unwrap();
    assert_eq!(after[0], before[0], "the first hop was kept");
    assert_ne!(after[1], before[1], "the middle hop was replaced");
    assert!(after.iter().all(|p| w.host_of(p) != middle_host));
    // Repaired by the first hop's link; the client's link never failed.
    assert_eq!(w.client().link.repairs(), 0);
    assert!(w.client().ended.is_none() && w.client().link.is_up());
    assert_eq!(w.slots[&Owner::Hop(before[0].clone())].link.repairs(), 1);
    eprintln!("crash of the middle hop's host: chain whole again after {took:?}");
    // And it stays whole.
    w.run_until(at(20.0));
    assert!(w.chain().is_some());
}

#[test]
fn a_partitioned_middle_hop_is_replaced_by_one_the_hop_before_reaches() {
    let mut w = World::new(3, 6);
    whole_within(&mut w, Instant::ZERO, ms(3000));
    let before = w.chain().unwrap();
    let (first_host, middle_host) = (w.host_of(&before[0]), w.host_of(&before[1]));
    w.run_until(at(5.0));
    w.partition(first_host, middle_host);
    whole_within(&mut w, at(5.0), REPAIR_BOUND);
    let after = w.chain().unwrap();
    assert_eq!(after[0], before[0]);
    assert_ne!(w.host_of(&after[1]), middle_host, "the new middle hop is reachable from the first");
    assert_eq!(w.client().link.repairs(), 0);
    assert!(w.client().ended.is_none());
}

#[test]
fn random_faults_on_middle_hops_are_repaired_and_the_run_is_deterministic() {
    for seed in 0..20u64 {
        let run = |seed: u64| {
            let mut w = World::new(4, 12);
            whole_within(&mut w, Instant::ZERO, ms(3000));
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut t = 2.0;
            for _ in 0..3 {
                t += 3.0 + next(3000) as f64 / 1000.0;
                w.run_until(at(t));
                let chain = w.chain().expect("whole before the fault");
                // A middle hop: not the first (the client's) and not the last.
                let i = 1 + next(chain.len() as u64 - 2) as usize;
                let victim = w.host_of(&chain[i]);
                match next(2) {
                    0 => w.crash(victim),
                    _ => w.partition(w.host_of(&chain[i - 1]), victim),
                }
                whole_within(&mut w, at(t), REPAIR_BOUND);
                assert!(w.client().ended.is_none() && w.client().link.repairs() == 0, "seed {seed}");
            }
            w.trace
        };
        let trace = run(seed);
        assert_eq!(trace, run(seed), "seed {seed}: the same seed gave another run");
    }
}
