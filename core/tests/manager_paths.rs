//! The find-or-allocate paths of DESIGN.md §2, driven through the composite `Node`
//! against a scripted network (tests/world).

mod world;

use physarum_core::io::{Event, Input, Outcome, Output};
use physarum_core::types::{DhtKey, PeerId};
use physarum_core::wire::Request;
use std::time::Duration;
use world::*;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn status(w: &World, req: physarum_core::types::ReqId) -> (u16, String) {
    match w.outcome(req) {
        Some(Outcome::Fail { status, reason }) => (*status, reason.clone()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn found_instance_is_used_without_allocation() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "far", ms(40));
    w.add_instance(&svc, "near", ms(5));
    w.add_allocator("alloc", ms(1), AllocatorBehaviour::Refuse("must not be asked".into()));
    let req = w.request("svc", secs(5));
    w.run_for(secs(2));
    assert_eq!(w.routed_to(req).as_deref(), Some("near"), "the closest instance wins");
    assert_eq!(w.allocate_requests(), 0);
}

#[test]
fn cached_peer_serves_later_requests_without_discovery() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    let finds = w.finds_of(&DhtKey::Service(svc.hash.clone()));
    let second = w.request("svc", secs(5));
    assert_eq!(w.routed_to(second).as_deref(), Some("i1"), "answered at once, from the cache");
    assert_eq!(w.finds_of(&DhtKey::Service(svc.hash.clone())), finds, "no new lookup");
    assert!(w.events().iter().any(|e| matches!(e, Event::CacheHit { .. })));
}

#[test]
fn absent_service_is_allocated_on_the_closest_allocator_and_dialled_directly() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    let new = AllocatorBehaviour::Start { instance: peer("new"), rtt: ms(3), in_dht: false };
    w.add_allocator("far-alloc", ms(30), AllocatorBehaviour::Refuse("must not be asked first".into()));
    w.add_allocator("near-alloc", ms(2), new);
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("new"), "routed without waiting for the DHT to list it");
    assert_eq!(w.allocate_requests(), 1);
    assert!(w.events().iter().any(|e| matches!(e, Event::Allocated { allocator, .. } if allocator.0 == "near-alloc")));
}

#[test]
fn refused_allocation_moves_on_to_the_next_allocator() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_allocator("full", ms(1), AllocatorBehaviour::Refuse("no capacity".into()));
    w.add_allocator("spare", ms(9), AllocatorBehaviour::Start { instance: peer("i"), rtt: ms(9), in_dht: false });
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("i"));
    assert_eq!(w.allocate_requests(), 2);
}

#[test]
fn unreachable_new_instance_is_refound_in_the_dht_with_backoff() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_allocator("a", ms(2), AllocatorBehaviour::Start { instance: peer("slowboot"), rtt: ms(4), in_dht: true });
    // The instance cannot be dialled for its first 700 ms (still booting).
    w.reachable_from.insert(PeerId("slowboot".into()), w.now + ms(700));
    let req = w.request("svc", secs(10));
    w.run_for(secs(5));
    assert_eq!(w.routed_to(req).as_deref(), Some("slowboot"));
    assert_eq!(w.allocate_requests(), 1, "found again, not allocated again");
}

#[test]
fn soft_violating_instance_triggers_allocation_of_a_closer_one() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "slow", ms(80)); // over soft, under hard
    w.add_allocator("near", ms(5), AllocatorBehaviour::Start { instance: peer("close"), rtt: ms(5), in_dht: false });
    w.add_allocator(
        "farther",
        ms(90),
        AllocatorBehaviour::Refuse("must not be asked: farther than the instance".into()),
    );
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    // The slow instance serves at once; the closer one replaces it when it is up.
    assert_eq!(w.routed_to(req).as_deref(), Some("slow"));
    assert!(w
        .events()
        .iter()
        .any(|e| matches!(e, Event::Switched { from, to, .. } if from.0 == "slow" && to.0 == "close")));
    assert_eq!(w.allocate_requests(), 1, "only allocators closer than the slow instance are asked");
    let later = w.request("svc", secs(5));
    assert_eq!(w.routed_to(later).as_deref(), Some("close"));
}

#[test]
fn soft_violating_instance_is_kept_when_no_allocator_is_closer() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "slow", ms(80));
    w.add_allocator("farther", ms(90), AllocatorBehaviour::Refuse("must not be asked".into()));
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("slow"));
    assert_eq!(w.allocate_requests(), 0);
}

#[test]
fn instances_over_the_hard_limit_are_never_selected() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "too-slow", ms(150));
    w.add_allocator("a", ms(3), AllocatorBehaviour::Start { instance: peer("fresh"), rtt: ms(3), in_dht: false });
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("fresh"));
}

#[test]
fn nothing_found_or_allocatable_is_503_after_three_attempts() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    let req = w.request("svc", secs(30));
    w.run_for(secs(30));
    let (code, reason) = status(&w, req);
    assert_eq!(code, 503);
    assert!(reason.contains("svc"), "{reason}");
    assert_eq!(w.finds_of(&DhtKey::Service(svc.hash.clone())), 3, "three attempts");
}

#[test]
fn unknown_service_is_404_with_the_reason() {
    let mut w = World::new([]);
    let req = w.request("nope", secs(5));
    w.run_for(secs(1));
    let (code, reason) = status(&w, req);
    assert_eq!(code, 404);
    assert!(reason.contains("nope") && reason.contains("registry"), "{reason}");
}

#[test]
fn unreachable_registry_is_503() {
    let mut w = World::new([&service("svc", 50, 100)]);
    w.rtt.remove(&PeerId(REGISTRY.into()));
    let req = w.request("svc", secs(10));
    w.run_for(secs(10));
    let (code, reason) = status(&w, req);
    assert_eq!(code, 503);
    assert!(reason.contains("registry"), "{reason}");
}

#[test]
fn deadline_is_504_and_never_late() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    // An allocator that takes forever: its instance never becomes reachable.
    w.add_allocator("a", ms(2), AllocatorBehaviour::Start { instance: peer("ghost"), rtt: ms(3), in_dht: false });
    w.reachable_from.insert(PeerId("ghost".into()), w.now + secs(3600));
    let req = w.request("svc", ms(1500));
    w.run_for(secs(10));
    let (code, _) = status(&w, req);
    assert_eq!(code, 504);
    let (answered_at, _) = w.responses[&req];
    assert_eq!(answered_at, w.deadlines[&req], "answered exactly at the deadline");
}

#[test]
fn concurrent_requests_share_one_discovery_and_one_allocation() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_allocator("a", ms(2), AllocatorBehaviour::Start { instance: peer("i"), rtt: ms(3), in_dht: false });
    let reqs: Vec<_> = (0..100).map(|_| w.request("svc", secs(5))).collect();
    w.run_for(secs(3));
    for r in reqs {
        assert_eq!(w.routed_to(r).as_deref(), Some("i"));
    }
    assert_eq!(w.allocate_requests(), 1);
    assert_eq!(w.finds_of(&DhtKey::Service(svc.hash.clone())), 1);
    // One registry query for all of them (later ones are the once-a-second refresh of a name in use).
    let first_second = w.log.iter().filter(|(t, o)| {
        *t < physarum_core::time::Instant::ZERO + secs(1)
            && matches!(o, Output::SendRequest { request: Request::RegistryGet { .. }, .. })
    });
    assert_eq!(first_second.count(), 1);
}

#[test]
fn failed_route_evicts_the_peer() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(ms(500));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    w.input(Input::RouteFailed { service: svc.hash.clone(), peer: PeerId("i1".into()), reason: "reset".into() });
    // The instance is gone from the DHT too; a new one is allocated.
    w.providers.remove(&DhtKey::Service(svc.hash.clone()));
    w.rtt.remove(&PeerId("i1".into()));
    w.add_allocator("a", ms(2), AllocatorBehaviour::Start { instance: peer("i2"), rtt: ms(3), in_dht: false });
    let second = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(second).as_deref(), Some("i2"));
}

#[test]
fn a_cached_peer_whose_probes_go_unanswered_is_evicted_at_the_second_lost_probe() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(ms(500));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    w.rtt.insert(PeerId("i1".into()), ms(300)); // over hard: probes time out at 100 ms
    w.run_for(ms(1500));
    assert!(!w.events().iter().any(|e| matches!(e, Event::Evicted { .. })), "not at the first lost probe");
    w.run_for(ms(1000));
    assert!(w.events().iter().any(|e| matches!(e, Event::Evicted { peer, .. } if peer.0 == "i1")));
    assert!(w.node.manager().peer_cache().lookup(&svc.hash).is_none());
}

#[test]
fn soft_violation_with_the_original_constants_moves_on_once_the_cache_drops_the_peer() {
    // r falls by 10 per soft-violating probe: 50 → 0 in five rounds, then level 2 is
    // flushed. The next request rediscovers and picks the faster instance.
    let svc = service("svc", 50, 100);
    let mut config = physarum_core::config::NodeConfig::new(
        PeerId("client".into()),
        physarum_core::perf::Requirements::rtt(ms(100), ms(1000)),
    );
    config.peer_cache = physarum_core::config::PeerCacheConfig::original();
    let mut w = World::with_config(config, [&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(ms(500));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    w.rtt.insert(PeerId("i1".into()), ms(70));
    w.add_instance(&svc, "i2", ms(4));
    w.run_for(secs(4));
    let still = w.request("svc", secs(5));
    assert_eq!(w.routed_to(still).as_deref(), Some("i1"), "tolerated for a while");
    w.run_for(secs(3));
    assert!(w
        .events()
        .iter()
        .any(|e| matches!(e, Event::Evicted { peer, reason, .. } if peer.0 == "i1" && reason == "unreliable")));
    let later = w.request("svc", secs(5));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(later).as_deref(), Some("i2"));
}

#[test]
fn persistent_soft_violation_switches_to_a_better_instance_after_the_grace() {
    let svc = service("svc", 50, 100);
    let mut config = physarum_core::config::NodeConfig::new(
        PeerId("client".into()),
        physarum_core::perf::Requirements::rtt(ms(100), ms(1000)),
    );
    config.manager.soft_grace = secs(3); // shorter than the cache's own flush (≥ 5 s)
    let mut w = World::with_config(config, [&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(ms(500));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    w.rtt.insert(PeerId("i1".into()), ms(70));
    w.add_instance(&svc, "i2", ms(4));
    let slow_since = w.now;
    w.run_for(secs(2));
    assert!(!w.events().iter().any(|e| matches!(e, Event::Switched { .. })), "no switch before the grace");
    w.run_for(secs(3));
    let switched_at = w
        .log
        .iter()
        .find(|(_, o)| matches!(o, Output::Event(Event::Switched { from, to, .. }) if from.0 == "i1" && to.0 == "i2"))
        .map(|(t, _)| *t)
        .expect("switched to i2");
    let after = switched_at.saturating_since(slow_since);
    assert!(after >= secs(3) && after <= secs(5), "switched {after:?} after the soft limit was crossed");
    let later = w.request("svc", secs(5));
    assert_eq!(w.routed_to(later).as_deref(), Some("i2"), "served from the cache by the new instance");
}

#[test]
fn a_failed_instance_is_ejected_and_the_retry_goes_elsewhere() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "hung", ms(2));
    w.add_instance(&svc, "other", ms(20));
    w.add_allocator("alloc", ms(1), AllocatorBehaviour::Start { instance: peer("hung"), rtt: ms(2), in_dht: true });
    let first = w.request("svc", secs(5));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("hung"));
    w.input(Input::RouteFailed { service: svc.hash.clone(), peer: PeerId("hung".into()), reason: "stalled".into() });
    // The DHT still lists the failed instance, and an allocator offers it again: neither is taken.
    let again = w.retry("svc", secs(5));
    w.run_for(secs(2));
    assert_eq!(w.routed_to(again).as_deref(), Some("other"));
    assert!(w.events().iter().any(|e| matches!(e, Event::Retried { .. })));
    assert!(w.events().iter().any(|e| matches!(e, Event::Evicted { peer, .. } if peer.0 == "hung")));
    // Once `other` fails too, the last allocator can only offer `hung`. Ejection must
    // not become an outage (Envoy's panic routing): a fresh probe decides, and `hung`
    // answers it, so it serves again.
    w.input(Input::RouteFailed { service: svc.hash.clone(), peer: PeerId("other".into()), reason: "reset".into() });
    let third = w.retry("svc", secs(5));
    w.run_for(secs(6));
    assert_eq!(w.routed_to(third).as_deref(), Some("hung"), "{:?}", w.outcome(third));
    // When it fails again and no longer answers probes, its offer is not taken: 503.
    w.input(Input::RouteFailed { service: svc.hash.clone(), peer: PeerId("hung".into()), reason: "stalled".into() });
    let now = w.now;
    w.cut_from.insert(PeerId("hung".into()), now);
    let fourth = w.request("svc", secs(5));
    w.run_for(secs(6));
    let (code, reason) = status(&w, fourth);
    assert_eq!(code, 503, "{reason}");
    assert!(reason.contains("hung no longer answers"), "{reason}");
}

#[test]
fn retries_stay_within_the_budget() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i", ms(2));
    let first = w.request("svc", secs(5));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("i"));
    // With one request in the window, only the floor of retries is allowed.
    let floor = physarum_core::resilience::ResilienceConfig::default().min_retries as usize;
    let retries: Vec<_> = (0..floor + 5).map(|_| w.retry("svc", secs(5))).collect();
    w.run_for(secs(1));
    let refused: Vec<_> = retries
        .iter()
        .filter(|r| matches!(w.outcome(**r), Some(Outcome::Fail { status: 503, reason }) if reason.contains("retry budget")))
        .collect();
    assert_eq!(refused.len(), 5, "{:?}", retries.iter().map(|r| w.outcome(*r)).collect::<Vec<_>>());
    assert_eq!(w.events().iter().filter(|e| matches!(e, Event::RetryRefused { .. })).count(), 5);
}

#[test]
fn an_untrusted_instance_is_evicted_never_probed_again_and_refused_from_allocators() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "rogue", ms(1));
    w.add_instance(&svc, "good", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("rogue"), "the fastest answer wins the discovery");
    // The runtime found no valid credentials on its tunnel.
    let reason = "no instance certificate".to_string();
    w.input(Input::Untrusted { service: svc.hash.clone(), peer: PeerId("rogue".into()), reason });
    let probes_before = w.count(|o| matches!(o, Output::Probe { peer, .. } if peer.peer.0 == "rogue"));
    let second = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(second).as_deref(), Some("good"));
    let probes_after = w.count(|o| matches!(o, Output::Probe { peer, .. } if peer.peer.0 == "rogue"));
    assert_eq!(probes_after, probes_before, "the untrusted peer is not probed again");
    assert!(w.events().iter().any(|e| matches!(e, Event::Untrusted { peer, .. } if peer.0 == "rogue")));

    // An allocator that hands back the untrusted peer is treated as a refusal.
    let mut w = World::new([&svc]);
    w.input(Input::Untrusted { service: svc.hash.clone(), peer: PeerId("rogue".into()), reason: "x".into() });
    w.add_allocator(
        "bad-alloc",
        ms(1),
        AllocatorBehaviour::Start { instance: peer("rogue"), rtt: ms(1), in_dht: false },
    );
    w.add_allocator("alloc", ms(4), AllocatorBehaviour::Start { instance: peer("fresh"), rtt: ms(4), in_dht: false });
    let req = w.request("svc", secs(5));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("fresh"));
    assert!(w.events().iter().any(|e| matches!(e, Event::AllocationRefused { allocator, reason, .. }
        if allocator.0 == "bad-alloc" && reason.contains("failed the trust check"))));
}

#[test]
fn a_rogue_registry_is_skipped_and_its_forged_entry_never_used() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_rogue_registry("rogue-registry");
    w.add_instance(&svc, "i1", ms(5));
    let req = w.request("svc", secs(5));
    w.run_for(secs(2));
    assert_eq!(w.routed_to(req).as_deref(), Some("i1"), "resolved through the real registry");
    let asked_rogue = w.count(|o| matches!(o, Output::SendRequest { peer, .. } if peer.peer.0 == "rogue-registry"));
    assert_eq!(asked_rogue, 1, "asked first, then skipped");

    // With only the rogue registry there is no resolution at all, and the reason says why.
    let mut w = World::new([&svc]);
    w.providers.insert(DhtKey::Registry, vec![]);
    w.add_rogue_registry("rogue-registry");
    let req = w.request("svc", secs(5));
    w.run_for(secs(2));
    let (code, reason) = status(&w, req);
    assert_eq!(code, 503);
    assert!(reason.contains("not a configured operator"), "{reason}");
    assert_eq!(
        w.count(|o| matches!(o, Output::Probe { .. } | Output::FindProviders { key: DhtKey::Service(_), .. })),
        0
    );
}

/// A client with the shipped defaults except for `change`.
fn world_with(
    services: &[&physarum_core::types::ServiceInfo],
    change: impl FnOnce(&mut physarum_core::config::NodeConfig),
) -> World {
    let mut config = physarum_core::config::NodeConfig::new(
        PeerId("client".into()),
        physarum_core::perf::Requirements::rtt(ms(100), ms(1000)),
    );
    change(&mut config);
    World::with_config(config, services.iter().copied())
}

#[test]
fn a_lost_allocate_is_sent_again_well_within_its_deadline() {
    // No instance yet; the first start request to the allocator is lost.
    let svc = service("svc", 50, 200);
    let mut w = World::new([&svc]);
    w.add_allocator("near", ms(5), AllocatorBehaviour::Start { instance: peer("fresh"), rtt: ms(5), in_dht: false });
    w.lose_allocates = 1;
    let req = w.request("svc", secs(30));
    w.run_for(secs(3));
    assert_eq!(w.routed_to(req).as_deref(), Some("fresh"));
    let took = w.answered_at(req).map(|t| t.saturating_since(physarum_core::Instant::ZERO)).unwrap_or_default();
    let limit = physarum_core::config::ManagerConfig::default().control_retry * 3;
    assert!(took < limit, "a lost start request cost {took:?}, over {limit:?}");
    assert_eq!(w.allocate_requests(), 2, "sent again once");
}

#[test]
fn a_lost_probe_in_a_discovery_round_is_sent_again_within_the_round() {
    let svc = service("svc", 50, 200);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    w.add_allocator("near", ms(5), AllocatorBehaviour::Refuse("must not be needed".into()));
    w.lose_next.insert(PeerId("i1".into()), 1);
    let req = w.request("svc", secs(5));
    w.run_for(secs(2));
    assert_eq!(w.routed_to(req).as_deref(), Some("i1"), "found in the same round");
    assert_eq!(w.allocate_requests(), 0);
    let took = w.answered_at(req).map(|t| t.saturating_since(physarum_core::Instant::ZERO)).unwrap_or_default();
    assert!(took < ms(500), "took {took:?}");
}

#[test]
fn requests_use_the_instance_in_hand_while_a_better_one_is_allocated() {
    // "slow" is over the soft limit but usable; the closer allocator never answers.
    let svc = service("svc", 50, 200);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "slow", ms(80));
    w.add_allocator("near", ms(5), AllocatorBehaviour::Silent);
    let first = w.request("svc", secs(30));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("slow"), "served while the allocation is under way");
    let took = w.answered_at(first).map(|t| t.saturating_since(physarum_core::Instant::ZERO)).unwrap_or_default();
    assert!(took < ms(300), "the first request waited {took:?}");
    assert!(w.allocate_requests() >= 1, "a closer instance is being asked for");
    let second = w.request("svc", secs(30));
    assert_eq!(w.routed_to(second).as_deref(), Some("slow"), "later requests too, from the cache");
    // The allocation times out; the slow instance is kept.
    w.run_for(secs(12));
    assert!(w.node.manager().peer_cache().lookup(&svc.hash).is_some_and(|e| e.peer.peer.0 == "slow"));
}

#[test]
fn allocators_over_the_hard_limit_are_never_asked() {
    let svc = service("svc", 50, 200);
    let mut w = World::new([&svc]);
    w.add_allocator(
        "far",
        ms(300),
        AllocatorBehaviour::Start { instance: peer("useless"), rtt: ms(300), in_dht: false },
    );
    w.add_allocator("near", ms(20), AllocatorBehaviour::Refuse("full".into()));
    let req = w.request("svc", secs(20));
    w.run_for(secs(15));
    let asked_far = w.count(
        |o| matches!(o, Output::SendRequest { peer, request: Request::Allocate { .. }, .. } if peer.peer.0 == "far"),
    );
    assert_eq!(asked_far, 0, "an allocator over the hard limit was asked to start an instance");
    assert!(w.allocate_requests() >= 1, "the one within the limit was asked");
    assert_eq!(status(&w, req).0, 503);
}

#[test]
fn a_fallback_is_probed_again_before_it_is_chosen() {
    // "slow" serves while the allocator is asked; its link is cut at 2 s; the
    // allocation times out at 10 s: "slow" must not be chosen then on its old probe.
    let svc = service("svc", 50, 200);
    let mut w = world_with(&[&svc], |c| c.manager.attempts = 1);
    w.add_instance(&svc, "slow", ms(80));
    w.add_allocator("near", ms(5), AllocatorBehaviour::Silent);
    let first = w.request("svc", secs(30));
    w.run_for(secs(1));
    assert_eq!(w.routed_to(first).as_deref(), Some("slow"));
    let cut = physarum_core::Instant::ZERO + secs(2);
    w.cut_from.insert(PeerId("slow".into()), cut);
    w.run_for(secs(14));
    let late: Vec<_> = w.selections().into_iter().filter(|(t, who)| *t >= cut && who == "slow").collect();
    assert!(late.is_empty(), "chosen after its link was cut: {late:?}");
    assert!(w.node.manager().peer_cache().lookup(&svc.hash).is_none());
}

#[test]
fn a_single_lost_probe_keeps_the_peer_and_the_original_rule_evicts_it() {
    for (config, evicted) in [
        (physarum_core::config::PeerCacheConfig::default(), false),
        (physarum_core::config::PeerCacheConfig::original(), true),
    ] {
        let svc = service("svc", 50, 200);
        let mut w = world_with(&[&svc], |c| c.peer_cache = config.clone());
        w.add_instance(&svc, "i1", ms(5));
        let first = w.request("svc", secs(5));
        w.run_for(ms(500));
        assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
        w.lose_next.insert(PeerId("i1".into()), 1);
        w.run_for(secs(3));
        let gone = w.events().iter().any(|e| matches!(e, Event::Evicted { peer, .. } if peer.0 == "i1"));
        assert_eq!(gone, evicted, "{config:?}");
    }
}

#[test]
fn with_the_shipped_defaults_a_persistent_soft_violation_moves_within_grace_plus_one_second() {
    let svc = service("svc", 50, 200);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    let first = w.request("svc", secs(5));
    w.run_for(ms(500));
    assert_eq!(w.routed_to(first).as_deref(), Some("i1"));
    w.rtt.insert(PeerId("i1".into()), ms(70));
    w.add_instance(&svc, "i2", ms(4));
    let slow_since = w.now;
    let grace = physarum_core::config::ManagerConfig::default().soft_grace;
    w.run_for(grace - ms(500));
    assert!(
        !w.events().iter().any(|e| matches!(e, Event::Switched { .. } | Event::Evicted { .. })),
        "kept during the grace"
    );
    let during = w.request("svc", secs(5));
    assert_eq!(w.routed_to(during).as_deref(), Some("i1"));
    w.run_for(secs(3));
    let switched_at = w
        .log
        .iter()
        .find(|(_, o)| matches!(o, Output::Event(Event::Switched { from, to, .. }) if from.0 == "i1" && to.0 == "i2"))
        .map(|(t, _)| *t)
        .expect("switched to i2");
    let after = switched_at.saturating_since(slow_since);
    assert!(after >= grace && after <= grace + secs(1), "switched {after:?} after the soft limit was crossed");
}
