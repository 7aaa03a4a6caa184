//! An iterative lookup (libp2p-kad's closest-peers iterator, simplified): ask the α
//! closest peers not yet asked, learn closer ones from their answers, until the k
//! closest peers known have all answered (or failed), no one is left to ask, or the
//! caller ends it. The caller sends the RPCs and enforces each one's timeout.

use super::key::{Distance, Key};
use physarum_core::types::{PeerAddr, PeerId};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NotAsked,
    Waiting,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
pub struct Lookup {
    target: Key,
    k: usize,
    alpha: usize,
    /// Known peers by distance to the target: address, state, and the hop it was learnt at.
    peers: BTreeMap<Distance, (PeerAddr, State, u32)>,
    /// RPCs sent so far (the lookup's message cost, answers not counted).
    pub rpcs: u32,
    /// The most RPCs on one chain of answers: the lookup's hop count.
    pub hops: u32,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupStep {
    /// Send the RPC to these peers (each then answers or fails).
    Ask(Vec<PeerAddr>),
    /// Wait for answers in flight.
    Wait,
    /// The lookup is over: the k closest peers that answered, closest first.
    Done(Vec<PeerAddr>),
}

impl Lookup {
    pub fn new(target: Key, seeds: Vec<PeerAddr>, k: usize, alpha: usize) -> Self {
        let mut l = Lookup { target, k: k.max(1), alpha: alpha.max(1), peers: BTreeMap::new(), rpcs: 0, hops: 0 };
        for s in seeds {
            l.learn(s, 0);
        }
        l
    }

    pub fn target(&self) -> Key {
        self.target
    }

    fn learn(&mut self, p: PeerAddr, hop: u32) {
        let d = Key::of_peer(&p.peer).distance(&self.target);
        self.peers.entry(d).or_insert((p, State::NotAsked, hop));
    }

    fn slot(&mut self, peer: &PeerId) -> Option<&mut (PeerAddr, State, u32)> {
        self.peers.get_mut(&Key::of_peer(peer).distance(&self.target))
    }

    /// `peer` answered with `closer` peers.
    pub fn answered(&mut self, peer: &PeerId, closer: Vec<PeerAddr>) {
        let hop = match self.slot(peer) {
            Some(s) if s.1 == State::Waiting => {
                s.1 = State::Answered;
                s.2 + 1
            }
            _ => return,
        };
        self.hops = self.hops.max(hop);
        for c in closer {
            self.learn(c, hop);
        }
    }

    /// `peer` did not answer in time (or could not be reached).
    pub fn failed(&mut self, peer: &PeerId) {
        if let Some(s) = self.slot(peer) {
            if s.1 == State::Waiting {
                s.1 = State::Failed;
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.peers.values().filter(|(_, s, _)| *s == State::Waiting).count()
    }

    /// The next step; RPCs it asks for count as sent.
    pub fn step(&mut self) -> LookupStep {
        let mut waiting = 0;
        let mut to_ask = Vec::new();
        let mut live_seen = 0;
        let mut all_answered = true;
        for (p, s, _) in self.peers.values() {
            if live_seen >= self.k {
                break;
            }
            match s {
                State::Failed => continue,
                State::Answered => {}
                State::Waiting => {
                    waiting += 1;
                    all_answered = false;
                }
                State::NotAsked => {
                    all_answered = false;
                    to_ask.push(p.peer.clone());
                }
            }
            live_seen += 1;
        }
        if all_answered {
            let done = self
                .peers
                .values()
                .filter(|(_, s, _)| *s == State::Answered)
                .take(self.k)
                .map(|(p, _, _)| p.clone())
                .collect();
            return LookupStep::Done(done);
        }
        let room = self.alpha.saturating_sub(waiting);
        let mut asked = Vec::new();
        for peer in to_ask.into_iter().take(room) {
            if let Some(s) = self.slot(&peer) {
                s.1 = State::Waiting;
                asked.push(s.0.clone());
            }
        }
        self.rpcs += asked.len() as u32;
        if asked.is_empty() {
            LookupStep::Wait
        } else {
            LookupStep::Ask(asked)
        }
    }
}
