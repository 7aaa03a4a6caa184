//! The Kademlia model against real libp2p-kad: the same small cluster — a bootstrap
//! and nine nodes joined through it, three of them providing one key — runs as real
//! `net-real` nodes on 127.0.0.1 (ports picked at run time) and as the model
//! (`physarum_net_sim::kad::SyncCluster`, the same peer ids, joined in the same
//! order). Compared: the providers each node finds, the Kademlia requests each
//! lookup sends (libp2p-kad's query statistics against the model's RPC count; libp2p
//! does not report hops, so the model's are only printed), and both again once the
//! bootstrap is gone: nodes that joined through it still find every provider.
//!
//! With ten nodes and k = 20 every node is among the k closest to any key, so the
//! key hashing (libp2p hashes a peer id's bytes, the model its text) does not change
//! who is asked or who holds a record; routing over many buckets is the model's own
//! tests' and the scale scenarios' job. The per-key provider cap, which decides which
//! allocators a client can see at scale, is compared store to store: libp2p-kad's
//! memory store and the model's are fed the same providers and must keep the same.

use libp2p::identity::Keypair;
use physarum_core::types::{DhtKey, PeerAddr, PeerId};
use physarum_net_real::{Backoff, FindCost, P2p, P2pOptions};
use physarum_net_sim::kad::{dht_key, KadConfig, Rpc, SyncCluster};
use physarum_runtime::Transport;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

const NODES: usize = 10;
/// Node 0 is the bootstrap; these provide the key.
const PROVIDERS: [usize; 3] = [2, 5, 8];
/// Requests of one lookup may differ by this many between libp2p and the model.
const TOLERANCE: u32 = 2;

fn options(bootstraps: Vec<libp2p::Multiaddr>) -> P2pOptions {
    let mut o = P2pOptions::new(Keypair::generate_ed25519());
    o.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a multiaddr")];
    o.bootstraps = bootstraps;
    o.backoff = Backoff { initial: Duration::from_millis(50), startup_attempts: 3, cap: Duration::from_secs(1) };
    o.handshake_timeout = Duration::from_secs(2);
    o
}

/// Poll `done` every 20 ms until it holds, failing the test at `deadline`.
async fn wait_for(what: &str, deadline: Instant, mut done: impl AsyncFnMut() -> bool) {
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peers(found: &[PeerAddr]) -> BTreeSet<PeerId> {
    found.iter().map(|p| p.peer.clone()).collect()
}

/// One lookup from `node` in both: the providers found and the requests sent.
struct Compared {
    node: usize,
    real: (BTreeSet<PeerId>, FindCost),
    model: (BTreeSet<PeerId>, u32, u32),
}

#[test]
fn libp2p_kad_and_the_model_find_the_same_providers_at_the_same_cost() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), compare()).await.expect("the differential test took over 90 s")
    });
}

async fn compare() {
    let key = DhtKey::Allocators;
    let find_timeout = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(60);

    // The real cluster: a bootstrap, then each node joined through it in turn
    // (`real[i]` is node i + 1).
    let (boot, boot_inbound) = P2p::start(options(vec![])).await.expect("the bootstrap starts");
    let (mut real, mut inbound) = (Vec::new(), Vec::new());
    for _ in 1..NODES {
        let (p, i) = P2p::start(options(boot.dial_addrs())).await.expect("a node joins");
        real.push(p);
        inbound.push(i);
    }
    wait_for("the bootstrap to see every node", deadline, async || boot.connected_peers().len() >= NODES - 1).await;
    let node = |i: usize| &real[i - 1];

    // The model: the same peer ids, joined in the same order through the same node.
    let mut model = SyncCluster::new(KadConfig::default());
    model.join(boot.peer_addr(), None);
    for p in &real {
        model.join(p.peer_addr(), Some(&boot.peer_addr()));
    }

    // The providers advertise in both.
    let want: BTreeSet<PeerId> = PROVIDERS.iter().map(|&i| node(i).peer_addr().peer).collect();
    for &i in &PROVIDERS {
        node(i).advertise(key.clone()).await.expect("advertise");
        model.advertise(&node(i).peer_addr().peer, dht_key(&key));
    }
    let finders: Vec<usize> = (1..NODES).filter(|i| !PROVIDERS.contains(i)).collect();
    // Records travel on their own in the real cluster: wait until every finder sees
    // them all once (this also fills the routing tables, as the same finds do in the model).
    for &i in &finders {
        wait_for("every provider to be found", deadline, async || {
            let (found, _) = node(i).find_providers_costed(key.clone(), find_timeout).await.unwrap_or_default();
            peers(&found) == want
        })
        .await;
        model.lookup(&node(i).peer_addr().peer, &Rpc::GetProviders { key: dht_key(&key) });
    }

    let measure = async |model: &mut SyncCluster| -> Vec<Compared> {
        let mut out = Vec::new();
        for &i in &finders {
            let (found, cost) = node(i).find_providers_costed(key.clone(), find_timeout).await.expect("a find");
            let m = model.lookup(&node(i).peer_addr().peer, &Rpc::GetProviders { key: dht_key(&key) });
            out.push(Compared { node: i, real: (peers(&found), cost), model: (peers(&m.providers), m.rpcs, m.hops) });
        }
        out
    };
    let check = |phase: &str, rows: &[Compared]| {
        eprintln!("{phase}: node | providers real/model | requests real (failed) / model | model hops");
        for r in rows {
            eprintln!(
                "  {:>2} | {}/{} | {} ({}) / {} | {}",
                r.node,
                r.real.0.len(),
                r.model.0.len(),
                r.real.1.requests,
                r.real.1.failures,
                r.model.1,
                r.model.2
            );
        }
        let total = |f: fn(&Compared) -> u32| rows.iter().map(f).sum::<u32>();
        let (a, b) = (total(|r| r.real.1.requests), total(|r| r.model.1));
        assert!(a.abs_diff(b) * 10 <= a.max(b), "{phase}: {a} requests in all with libp2p, {b} in the model");
        for r in rows {
            assert_eq!(r.real.0, want, "{phase}: node {} (libp2p) found {:?}", r.node, r.real.0);
            assert_eq!(r.model.0, want, "{phase}: node {} (model) found {:?}", r.node, r.model.0);
            let (a, b) = (r.real.1.requests, r.model.1);
            assert!(a.abs_diff(b) <= TOLERANCE, "{phase}: node {}: libp2p sent {a} requests, the model {b}", r.node);
        }
    };
    let joined = measure(&mut model).await;
    check("all up", &joined);

    // The bootstrap goes: every node that joined through it still finds every provider.
    let (boot_id, boot_peer, boot_addr) = (boot.peer_id(), boot.peer_addr().peer, boot.dial_addrs()[0].clone());
    drop((boot, boot_inbound));
    model.kill(&boot_peer);
    wait_for("every node to lose the bootstrap", deadline, async || {
        real.iter().all(|p| p.connected_peers().iter().all(|(peer, _)| *peer != boot_id))
    })
    .await;
    let lost = measure(&mut model).await;
    check("bootstrap lost", &lost);

    // A node that comes after the bootstrap is gone joins neither: libp2p gives up
    // with an error after its start-up attempts, the model's node knows no one.
    let late = P2p::start(options(vec![boot_addr])).await;
    assert!(late.is_err(), "a node joined through a bootstrap that is gone");
    let stranger = PeerAddr { peer: PeerId("late".into()), addrs: vec!["late:1".into()] };
    model.join(stranger.clone(), Some(&model.nodes[&boot_peer].me.clone()));
    let m = model.lookup(&stranger.peer, &Rpc::GetProviders { key: dht_key(&key) });
    assert!(m.providers.is_empty() && m.closest.is_empty(), "the model's late node found {:?}", m.providers);
}

#[test]
fn the_model_keeps_the_providers_libp2p_kad_keeps() {
    // The per-key provider cap decides which allocators a client can ever see at
    // scale: feed libp2p-kad's own memory store and the model's store the same
    // providers (more than the cap), refreshes and expiries, and compare what each keeps.
    use libp2p::kad::store::{MemoryStore, RecordStore};
    use libp2p::kad::ProviderRecord;
    use physarum_net_sim::kad::ProviderStore;
    let (record_key, model_key) = (physarum_net_real::record_key(&DhtKey::Allocators), dht_key(&DhtKey::Allocators));
    let mut real = MemoryStore::new(libp2p::PeerId::random());
    let cap = KadConfig::default().max_providers_per_key;
    let mut model = ProviderStore::new(cap, KadConfig::default().max_records);
    let peers: Vec<libp2p::PeerId> = (0..cap + 10).map(|_| libp2p::PeerId::random()).collect();
    let add = |real: &mut MemoryStore, model: &mut ProviderStore, p: &libp2p::PeerId| {
        real.add_provider(ProviderRecord::new(record_key.clone(), *p, vec![])).expect("stored");
        model.put(model_key, PeerId(p.to_string()), 0, 1_000_000);
    };
    let kept = |real: &MemoryStore, model: &ProviderStore| {
        let r: Vec<String> = real.providers(&record_key).iter().map(|x| x.provider.to_string()).collect();
        let m: Vec<String> = model.get(&model_key, 0).into_iter().map(|p| p.0).collect();
        (r, m)
    };
    for p in &peers {
        add(&mut real, &mut model, p);
    }
    // Kept providers advertise again, in another order.
    for p in peers.iter().rev() {
        add(&mut real, &mut model, p);
    }
    let (r, m) = kept(&real, &model);
    assert_eq!(r.len(), cap);
    assert_eq!(r, m, "libp2p-kad kept {r:?}, the model {m:?}");
    // One goes (its record expires or is removed): a newcomer takes its place in both.
    real.remove_provider(&record_key, &peers[3]);
    model.put(model_key, PeerId(peers[3].to_string()), 0, 0);
    add(&mut real, &mut model, &peers[cap + 5]);
    let (r, m) = kept(&real, &model);
    assert_eq!(r, m, "after a removal: libp2p-kad kept {r:?}, the model {m:?}");
    assert!(r.contains(&peers[cap + 5].to_string()));
}
