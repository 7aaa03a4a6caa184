//! Provider records of one node: per key, the first providers to arrive up to a cap
//! (as libp2p-kad's memory store keeps them), each until its expiry; a cap on
//! records in total.

use super::key::Key;
use physarum_core::types::PeerId;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct ProviderStore {
    per_key: usize,
    max_records: usize,
    /// Providers of each key, in the order they arrived, with their expiry (µs).
    records: BTreeMap<Key, Vec<(PeerId, u64)>>,
}

impl ProviderStore {
    pub fn new(per_key: usize, max_records: usize) -> Self {
        ProviderStore { per_key: per_key.max(1), max_records, records: BTreeMap::new() }
    }

    /// Store or refresh `provider` of `key` at `now` until `expires`. As libp2p-kad's
    /// memory store (0.49): a refresh replaces the record; a new provider of a key
    /// that already has `per_key` unexpired providers is ignored (first come, first
    /// kept: flooding a key with providers cannot push out those it has).
    pub fn put(&mut self, key: Key, provider: PeerId, now: u64, expires: u64) {
        let mut total = self.len();
        let list = self.records.entry(key).or_default();
        let before = list.len();
        list.retain(|(_, e)| *e > now);
        total -= before - list.len();
        if let Some(slot) = list.iter_mut().find(|(p, _)| *p == provider) {
            slot.1 = expires;
        } else if list.len() < self.per_key && total < self.max_records {
            list.push((provider, expires));
        } else if list.is_empty() {
            self.records.remove(&key);
        }
    }

    /// Unexpired providers of `key` at `now`, in the order they arrived.
    pub fn get(&self, key: &Key, now: u64) -> Vec<PeerId> {
        self.records
            .get(key)
            .map(|l| l.iter().filter(|(_, e)| *e > now).map(|(p, _)| p.clone()).collect())
            .unwrap_or_default()
    }

    /// Drop expired records.
    pub fn prune(&mut self, now: u64) {
        for l in self.records.values_mut() {
            l.retain(|(_, e)| *e > now);
        }
        self.records.retain(|_, l| !l.is_empty());
    }

    pub fn len(&self) -> usize {
        self.records.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
