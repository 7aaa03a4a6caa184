//! Provider records of one node: per key, the providers closest to the key (by XOR)
//! up to a cap, each until its expiry; a cap on records in total.

use super::key::Key;
use physarum_core::types::PeerId;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct ProviderStore {
    per_key: usize,
    max_records: usize,
    /// Providers of each key, closest to the key first, with their expiry (µs).
    records: BTreeMap<Key, Vec<(PeerId, u64)>>,
}

impl ProviderStore {
    pub fn new(per_key: usize, max_records: usize) -> Self {
        ProviderStore { per_key: per_key.max(1), max_records, records: BTreeMap::new() }
    }

    /// Store or refresh `provider` of `key` until `expires`. A new provider beyond the
    /// per-key cap replaces the farthest one if it is closer to the key, else is dropped.
    pub fn put(&mut self, key: Key, provider: PeerId, expires: u64) {
        if let Some(list) = self.records.get_mut(&key) {
            if let Some(slot) = list.iter_mut().find(|(p, _)| *p == provider) {
                slot.1 = slot.1.max(expires);
                return;
            }
        }
        if self.len() >= self.max_records {
            return;
        }
        let list = self.records.entry(key).or_default();
        let d = Key::of_peer(&provider).distance(&key);
        let at = list.iter().position(|(p, _)| d < Key::of_peer(p).distance(&key)).unwrap_or(list.len());
        if at >= self.per_key {
            return;
        }
        list.insert(at, (provider, expires));
        list.truncate(self.per_key);
    }

    /// Unexpired providers of `key` at `now`, closest to the key first.
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
