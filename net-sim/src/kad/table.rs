//! The routing table: 256 k-buckets by XOR distance from our own key.

use super::key::Key;
use physarum_core::types::{PeerAddr, PeerId};

/// Peers by bucket; each bucket holds at most `k`, oldest first.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    me: Key,
    k: usize,
    buckets: Vec<Vec<(Key, PeerAddr)>>,
}

impl RoutingTable {
    pub fn new(me: Key, k: usize) -> Self {
        RoutingTable { me, k: k.max(1), buckets: vec![Vec::new(); 256] }
    }

    /// Add `peer` (a full bucket keeps its entries: see the module notes), or update
    /// its addresses. Whether it is in.
    pub fn insert(&mut self, peer: PeerAddr) -> bool {
        let key = Key::of_peer(&peer.peer);
        let Some(b) = self.me.distance(&key).bucket() else { return false };
        let bucket = &mut self.buckets[b];
        if let Some(slot) = bucket.iter_mut().find(|(k, _)| *k == key) {
            if slot.1.addrs != peer.addrs {
                slot.1.addrs = peer.addrs;
            }
            return true;
        }
        if bucket.len() >= self.k {
            return false;
        }
        bucket.push((key, peer));
        true
    }

    pub fn remove(&mut self, peer: &PeerId) {
        let key = Key::of_peer(peer);
        if let Some(b) = self.me.distance(&key).bucket() {
            self.buckets[b].retain(|(k, _)| *k != key);
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.me.distance(key).bucket().is_some_and(|b| self.buckets[b].iter().any(|(k, _)| k == key))
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `n` known peers closest to `target`, closest first.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<PeerAddr> {
        let mut all: Vec<(super::key::Distance, &PeerAddr)> =
            self.buckets.iter().flatten().map(|(k, p)| (k.distance(target), p)).collect();
        all.sort_unstable_by_key(|a| a.0);
        all.into_iter().take(n).map(|(_, p)| p.clone()).collect()
    }

    /// Indices of the non-empty buckets (refresh looks up a key in each).
    pub fn filled_buckets(&self) -> Vec<usize> {
        (0..256).filter(|b| !self.buckets[*b].is_empty()).collect()
    }

    /// A key that falls into bucket `b` of this table, derived from `salt`.
    pub fn key_in_bucket(&self, b: usize, salt: u64) -> Key {
        let mut k = Key::hash(&salt.to_be_bytes()).0;
        // Same bits as `me` above bit `b`, bit `b` flipped, the rest random.
        let bit = 255 - b; // bit index from the most significant end
        for i in 0..bit {
            let (byte, mask) = (i / 8, 0x80u8 >> (i % 8));
            k[byte] = (k[byte] & !mask) | (self.me.0[byte] & mask);
        }
        let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
        k[byte] = (k[byte] & !mask) | (!self.me.0[byte] & mask);
        Key(k)
    }
}
