//! A deterministic model of Kademlia as production runs it (libp2p-kad in server
//! mode on every daemon), for the event-driven simulation ([`crate::des`]). It is a
//! model for tests, not a DHT for production.
//!
//! What it keeps: 256-bit keys (SHA-256 of peer ids and DHT keys) and XOR distance;
//! a routing table of k-buckets; α-parallel iterative `FIND_NODE` / `GET_PROVIDERS`
//! lookups whose RPCs each time out on their own ([`lookup`]); `ADD_PROVIDER` to the
//! k closest nodes that answered a lookup of the key; provider records that expire
//! after production's TTL unless re-advertised, at most a number per key (the first to
//! arrive kept, newcomers to a full key ignored, as libp2p-kad 0.49's memory store
//! does) and in total ([`store`]); an
//! address book apart from the records (a record names a peer; the addresses come
//! from the book of whoever answers).
//!
//! What it simplifies: a full bucket keeps its entries and drops the newcomer (libp2p
//! keeps a pending entry that replaces the oldest when that one is found
//! disconnected; here an entry that failed an RPC is removed at once, which frees its
//! slot); every node is reachable at the address it was first seen at; records are
//! not signed (as in libp2p-kad).

pub mod key;
pub mod lookup;
pub mod store;
pub mod sync;
pub mod table;

pub use key::{Distance, Key};
pub use lookup::{Lookup, LookupStep};
pub use store::ProviderStore;
pub use sync::{LookupResult, SyncCluster};
pub use table::RoutingTable;

use physarum_core::types::{DhtKey, PeerAddr, PeerId};
use std::collections::BTreeMap;

/// Model parameters; the defaults are libp2p-kad's (k = 20, α = 3, 20 providers per
/// key) with production's record TTL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KadConfig {
    /// Bucket size and replication factor.
    pub k: usize,
    /// RPCs one lookup keeps in flight.
    pub alpha: usize,
    /// Providers kept per key by one node.
    pub max_providers_per_key: usize,
    /// Provider records one node keeps in total.
    pub max_records: usize,
    /// Peers one address book remembers.
    pub max_book: usize,
}

impl Default for KadConfig {
    fn default() -> Self {
        KadConfig { k: 20, alpha: 3, max_providers_per_key: 20, max_records: 1024, max_book: 4096 }
    }
}

/// The 256-bit key a DHT key is stored under.
pub fn dht_key(key: &DhtKey) -> Key {
    match key {
        DhtKey::Service(h) => Key::hash(format!("service:{h}").as_bytes()),
        DhtKey::Allocators => Key::hash(b"allocators"),
        DhtKey::Registry => Key::hash(b"registry"),
    }
}

/// An RPC of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rpc {
    FindNode(Key),
    GetProviders { key: Key },
    AddProvider { key: Key, provider: PeerAddr },
}

/// An RPC's answer: closer peers (with their addresses) and, for `GetProviders`, the
/// providers the answering node holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RpcAnswer {
    pub closer: Vec<PeerAddr>,
    pub providers: Vec<PeerAddr>,
}

/// One node's DHT state: routing table, provider store, address book.
#[derive(Clone, Debug)]
pub struct KadNode {
    pub me: PeerAddr,
    pub key: Key,
    pub table: RoutingTable,
    pub store: ProviderStore,
    book: BTreeMap<PeerId, Vec<String>>,
    config: KadConfig,
}

impl KadNode {
    pub fn new(me: PeerAddr, config: KadConfig) -> Self {
        let key = Key::of_peer(&me.peer);
        KadNode {
            table: RoutingTable::new(key, config.k),
            store: ProviderStore::new(config.max_providers_per_key, config.max_records),
            book: BTreeMap::new(),
            me,
            key,
            config,
        }
    }

    pub fn config(&self) -> &KadConfig {
        &self.config
    }

    /// We heard from (or about) `peer`: remember its addresses; `alive`: it answered
    /// us or asked us something, so it may go into the routing table.
    pub fn saw(&mut self, peer: &PeerAddr, alive: bool) {
        if peer.peer == self.me.peer || peer.addrs.is_empty() {
            return;
        }
        if !self.book.contains_key(&peer.peer) && self.book.len() >= self.config.max_book {
            // Forget someone not in the routing table to make room.
            let victim = self.book.keys().find(|p| !self.table.contains(&Key::of_peer(p))).cloned();
            match victim {
                Some(v) => {
                    self.book.remove(&v);
                }
                None => return,
            }
        }
        match self.book.get_mut(&peer.peer) {
            Some(addrs) if *addrs == peer.addrs => {}
            Some(addrs) => addrs.clone_from(&peer.addrs),
            None => {
                self.book.insert(peer.peer.clone(), peer.addrs.clone());
            }
        }
        if alive {
            self.table.insert(peer.clone());
        }
    }

    /// `peer` failed to answer an RPC: out of the routing table.
    pub fn failed(&mut self, peer: &PeerId) {
        self.table.remove(peer);
    }

    /// `peer` with the addresses our book has for it.
    pub fn addr_of(&self, peer: &PeerId) -> Option<PeerAddr> {
        self.book.get(peer).map(|a| PeerAddr { peer: peer.clone(), addrs: a.clone() })
    }

    /// The `n` closest peers to `target` in the routing table, with addresses.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<PeerAddr> {
        self.table.closest(target, n)
    }

    /// Answer an RPC from `from` at `now_us` (microseconds; records expire by it).
    pub fn answer(&mut self, now_us: u64, ttl_us: u64, from: &PeerAddr, rpc: Rpc) -> RpcAnswer {
        self.saw(from, true);
        let k = self.config.k;
        let closer_than = |me: &Self, target: &Key| -> Vec<PeerAddr> {
            me.closest(target, k + 1).into_iter().filter(|p| p.peer != from.peer).take(k).collect()
        };
        match rpc {
            Rpc::FindNode(target) => RpcAnswer { closer: closer_than(self, &target), providers: Vec::new() },
            Rpc::GetProviders { key } => {
                let providers =
                    self.store.get(&key, now_us).into_iter().filter_map(|p| self.provider_addr(p)).collect();
                RpcAnswer { closer: closer_than(self, &key), providers }
            }
            Rpc::AddProvider { key, provider } => {
                self.saw(&provider, false);
                self.store.put(key, provider.peer, now_us, now_us + ttl_us);
                RpcAnswer::default()
            }
        }
    }

    fn provider_addr(&self, p: PeerId) -> Option<PeerAddr> {
        if p == self.me.peer {
            return Some(self.me.clone());
        }
        self.addr_of(&p)
    }
}

#[cfg(test)]
mod tests;
