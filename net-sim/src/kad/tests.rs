use super::*;

fn addr(i: usize) -> PeerAddr {
    PeerAddr::new(format!("n{i}"), vec![format!("h{i}:7000")])
}

/// `n` nodes joined one after another through node 0 (FIND_NODE of their own key).
fn network(n: usize) -> SyncCluster {
    let mut c = SyncCluster::new(KadConfig::default());
    for i in 0..n {
        c.join(addr(i), (i > 0).then(|| addr(0)).as_ref());
    }
    c
}

fn true_closest(n: usize, target: &Key, k: usize) -> Vec<PeerId> {
    let mut all: Vec<(Distance, PeerId)> =
        (0..n).map(|i| (Key::of_peer(&addr(i).peer).distance(target), addr(i).peer)).collect();
    all.sort();
    all.into_iter().take(k).map(|(_, p)| p).collect()
}

#[test]
fn buckets_follow_the_leading_bit() {
    let a = Key([0u8; 32]);
    let mut b = [0u8; 32];
    b[0] = 0x80;
    assert_eq!(a.distance(&Key(b)).bucket(), Some(255));
    b[0] = 0;
    b[31] = 1;
    assert_eq!(a.distance(&Key(b)).bucket(), Some(0));
    assert_eq!(a.distance(&a).bucket(), None);
    let t = RoutingTable::new(Key::hash(b"me"), 20);
    for bucket in [0, 7, 100, 255] {
        let k = t.key_in_bucket(bucket, 42);
        assert_eq!(Key::hash(b"me").distance(&k).bucket(), Some(bucket));
    }
}

#[test]
fn a_full_bucket_keeps_its_peers_and_a_failed_one_frees_its_slot() {
    let me = Key::hash(b"me");
    let mut t = RoutingTable::new(me, 2);
    // Peers of the top bucket (half of all keys fall in it).
    let top: Vec<PeerAddr> = (0..100)
        .map(|i| PeerAddr::new(format!("p{i}"), vec![format!("h{i}:1")]))
        .filter(|p| me.distance(&Key::of_peer(&p.peer)).bucket() == Some(255))
        .take(3)
        .collect();
    assert!(t.insert(top[0].clone()) && t.insert(top[1].clone()));
    assert!(!t.insert(top[2].clone()), "bucket full");
    t.remove(&top[0].peer);
    assert!(t.insert(top[2].clone()));
    assert_eq!(t.len(), 2);
}

#[test]
fn lookups_find_the_true_k_closest_in_few_hops() {
    for n in [50, 400] {
        let mut nodes = network(n);
        let target = dht_key(&DhtKey::Allocators);
        let from = addr(n - 1).peer;
        let l = nodes.lookup(&from, &Rpc::FindNode(target));
        let got: Vec<PeerId> = l.closest.into_iter().map(|p| p.peer).collect();
        let mut want = true_closest(n, &target, 20);
        want.retain(|p| *p != from);
        let found = want.iter().filter(|p| got.contains(p)).count();
        assert!(found >= want.len() - 1, "n={n}: found {found} of the {} true closest", want.len());
        // log2(400) ≈ 8.6: hops stay a handful, RPCs a few dozen.
        assert!(l.hops <= 6, "n={n}: {} hops", l.hops);
        assert!(l.rpcs <= 80, "n={n}: {} rpcs", l.rpcs);
    }
}

#[test]
fn providers_are_stored_on_the_k_closest_and_found_around_dead_nodes() {
    let n = 200;
    let mut nodes = network(n);
    let key = dht_key(&DhtKey::Allocators);
    let provider = addr(7);
    let closest = nodes.lookup(&provider.peer, &Rpc::FindNode(key)).closest;
    assert_eq!(closest.len(), 20);
    for c in &closest {
        nodes.nodes.get_mut(&c.peer).unwrap().answer(
            0,
            1_000_000,
            &provider,
            Rpc::AddProvider { key, provider: provider.clone() },
        );
    }
    // Half of the record holders die: a lookup from elsewhere still finds the provider.
    for p in closest.iter().step_by(2) {
        nodes.kill(&p.peer);
    }
    let providers = nodes.lookup(&addr(150).peer, &Rpc::GetProviders { key }).providers;
    assert!(providers.contains(&provider), "{providers:?}");
    // All of them dead: nothing found (no single point holds the records).
    for p in &closest {
        nodes.kill(&p.peer);
    }
    let providers = nodes.lookup(&addr(151).peer, &Rpc::GetProviders { key }).providers;
    assert!(providers.is_empty());
}

#[test]
fn the_store_keeps_the_first_providers_until_they_expire() {
    let key = dht_key(&DhtKey::Allocators);
    let mut s = ProviderStore::new(3, 100);
    for i in 0..10 {
        s.put(key, addr(i).peer, 0, 1000);
    }
    // As libp2p-kad's memory store: a full key ignores newcomers, whoever they are.
    let first: Vec<PeerId> = (0..3).map(|i| addr(i).peer).collect();
    assert_eq!(s.get(&key, 0), first);
    // A refresh extends; an expired record is not returned and is pruned.
    s.put(key, first[0].clone(), 0, 5000);
    assert_eq!(s.get(&key, 2000), vec![first[0].clone()]);
    // Expired records make room: a newcomer is kept again.
    s.put(key, addr(9).peer, 2000, 6000);
    assert_eq!(s.get(&key, 2000), vec![first[0].clone(), addr(9).peer]);
    s.prune(7000);
    assert!(s.is_empty());
    let mut tiny = ProviderStore::new(20, 2);
    for i in 0..5 {
        tiny.put(key, addr(i).peer, 0, 1000);
    }
    assert_eq!(tiny.len(), 2, "the total cap holds");
}
