//! A cluster of model nodes whose RPCs are answered at once, in one thread, with no
//! time passing and nothing lost: the model's routing and records without the
//! event-driven engine around them. For tests of the model, and for comparing it
//! with libp2p-kad on a real cluster (`sim-tests/tests/kad_differential.rs`).

use super::{KadConfig, KadNode, Key, Lookup, LookupStep, Rpc};
use physarum_core::types::{PeerAddr, PeerId};
use std::collections::{BTreeMap, BTreeSet};

/// Records put at time 0 live this long: longer than any synchronous test.
const TTL_US: u64 = 3_600_000_000;

/// What one lookup found and cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupResult {
    /// The k closest peers that answered, closest first.
    pub closest: Vec<PeerAddr>,
    /// Providers the answers named (for `GetProviders`), each once, in the order found.
    pub providers: Vec<PeerAddr>,
    /// RPCs sent (to dead peers too).
    pub rpcs: u32,
    /// The longest chain of answers that led to the result.
    pub hops: u32,
}

#[derive(Clone, Debug, Default)]
pub struct SyncCluster {
    pub nodes: BTreeMap<PeerId, KadNode>,
    /// Peers that no longer answer.
    pub dead: BTreeSet<PeerId>,
    config: KadConfig,
}

impl SyncCluster {
    pub fn new(config: KadConfig) -> Self {
        SyncCluster { nodes: BTreeMap::new(), dead: BTreeSet::new(), config }
    }

    /// Add `me`; with `through`, it joins through that node (a `FIND_NODE` of its own
    /// key, as libp2p's bootstrap starts).
    pub fn join(&mut self, me: PeerAddr, through: Option<&PeerAddr>) {
        let mut node = KadNode::new(me.clone(), self.config.clone());
        if let Some(b) = through {
            node.saw(b, true);
        }
        let key = node.key;
        self.nodes.insert(me.peer.clone(), node);
        if through.is_some() {
            self.lookup(&me.peer, &Rpc::FindNode(key));
        }
    }

    /// `peer` stops answering.
    pub fn kill(&mut self, peer: &PeerId) {
        self.dead.insert(peer.clone());
    }

    /// Run one lookup from `from` to its end.
    pub fn lookup(&mut self, from: &PeerId, rpc: &Rpc) -> LookupResult {
        let target = match rpc {
            Rpc::FindNode(t) => *t,
            Rpc::GetProviders { key } | Rpc::AddProvider { key, .. } => *key,
        };
        let me = self.nodes[from].me.clone();
        let seeds = self.nodes[from].closest(&target, self.config.k);
        let mut l = Lookup::new(target, seeds, self.config.k, self.config.alpha);
        // Records this node holds itself count too (as libp2p's local store).
        let mut providers: Vec<PeerAddr> = match rpc {
            Rpc::GetProviders { key } => {
                let node = &self.nodes[from];
                node.store.get(key, 0).iter().filter_map(|p| node.addr_of(p).or_else(|| own(node, p))).collect()
            }
            _ => Vec::new(),
        };
        loop {
            match l.step() {
                LookupStep::Ask(peers) => {
                    for p in peers {
                        let answer = match self.nodes.get_mut(&p.peer).filter(|_| !self.dead.contains(&p.peer)) {
                            Some(node) => node.answer(0, TTL_US, &me, rpc.clone()),
                            None => {
                                l.failed(&p.peer);
                                self.node(from).failed(&p.peer);
                                continue;
                            }
                        };
                        let n = self.node(from);
                        n.saw(&p, true);
                        for c in answer.closer.iter().chain(&answer.providers) {
                            n.saw(c, false);
                        }
                        for a in answer.providers {
                            if !providers.iter().any(|x| x.peer == a.peer) {
                                providers.push(a);
                            }
                        }
                        l.answered(&p.peer, answer.closer);
                    }
                }
                LookupStep::Wait => unreachable!("answers are synchronous"),
                LookupStep::Done(closest) => return LookupResult { closest, providers, rpcs: l.rpcs, hops: l.hops },
            }
        }
    }

    /// `provider` advertises `key`: a lookup of the key, then `ADD_PROVIDER` to the k
    /// closest that answered (and the record in its own store). Returns the holders.
    pub fn advertise(&mut self, provider: &PeerId, key: Key) -> Vec<PeerId> {
        let me = self.nodes[provider].me.clone();
        let found = self.lookup(provider, &Rpc::FindNode(key));
        self.node(provider).store.put(key, me.peer.clone(), 0, TTL_US);
        let mut holders = vec![me.peer.clone()];
        for c in found.closest {
            if let Some(node) = self.nodes.get_mut(&c.peer).filter(|_| !self.dead.contains(&c.peer)) {
                node.answer(0, TTL_US, &me, Rpc::AddProvider { key, provider: me.clone() });
                holders.push(c.peer);
            }
        }
        holders
    }

    fn node(&mut self, peer: &PeerId) -> &mut KadNode {
        self.nodes.get_mut(peer).expect("a node of the cluster")
    }
}

fn own(node: &KadNode, p: &PeerId) -> Option<PeerAddr> {
    (*p == node.me.peer).then(|| node.me.clone())
}
