//! How clients learn registry changes and ride out registry failures, through the
//! composite `Node` against a scripted network (tests/world): changes and removals
//! reach a client within about the refresh interval, a failed registry replica is
//! the one skipped, and cached entries keep serving while no registry answers.

mod world;

use physarum_core::io::{Outcome, Output};
use physarum_core::types::{ContentHash, DhtKey, PeerId};
use physarum_core::wire::Request;
use std::time::Duration;
use world::*;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn registry_gets_to(w: &World, name: &str) -> usize {
    w.count(
        |o| matches!(o, Output::SendRequest { peer, request: Request::RegistryGet { .. }, .. } if peer.peer.0 == name),
    )
}

/// Send a request every 100 ms for `d`; the outcome of each, in order.
fn steady_requests(w: &mut World, svc: &str, d: Duration) -> Vec<(Duration, Option<String>, u16)> {
    let start = w.now;
    let mut seen = Vec::new();
    while w.now < start + d {
        let req = w.request(svc, secs(5));
        w.run_for(ms(100));
        let (to, status) = match w.outcome(req) {
            Some(Outcome::Route { instance, .. }) => (Some(instance.peer.0.clone()), 200),
            Some(Outcome::Fail { status, .. }) => (None, *status),
            None => (None, 0),
        };
        seen.push((w.now.saturating_since(start), to, status));
    }
    seen
}

#[test]
fn a_changed_entry_reaches_a_running_client_within_about_a_second() {
    let old = service("svc", 50, 100);
    let mut w = World::new([&old]);
    w.add_instance(&old, "old-instance", ms(5));
    let first = steady_requests(&mut w, "svc", secs(2));
    assert!(first.iter().all(|(_, to, _)| to.as_deref() == Some("old-instance")), "{first:?}");

    // The operator replaces the entry: another build, so another content hash.
    let mut new = old.clone();
    new.hash = ContentHash("svc-v2".into());
    w.registry.insert("svc".into(), new.clone());
    w.add_instance(&new, "new-instance", ms(5));
    let after = steady_requests(&mut w, "svc", secs(3));
    let switched = after.iter().find(|(_, to, _)| to.as_deref() == Some("new-instance")).map(|(t, _, _)| *t);
    let switched = switched.unwrap_or_else(|| panic!("never switched: {after:?}"));
    assert!(switched <= ms(1200), "the change took {switched:?} to reach the client");
    let last = after.iter().skip_while(|(t, _, _)| *t <= switched).collect::<Vec<_>>();
    assert!(last.iter().all(|(_, to, _)| to.as_deref() == Some("new-instance")), "{last:?}");
}

#[test]
fn a_removed_service_stops_resolving_within_about_a_second() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    steady_requests(&mut w, "svc", secs(1));
    w.registry.remove("svc");
    let after = steady_requests(&mut w, "svc", secs(3));
    let gone = after.iter().find(|(_, _, status)| *status == 404).map(|(t, _, _)| *t);
    let gone = gone.unwrap_or_else(|| panic!("still resolving: {after:?}"));
    assert!(gone <= ms(1200), "the removal took {gone:?} to reach the client");
    assert!(after.iter().skip_while(|(t, _, _)| *t <= gone).all(|(_, _, s)| *s == 404), "{after:?}");
}

#[test]
fn the_failed_registry_is_the_one_skipped() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    // Two replicas behind the DHT key; the first one listed is down (never answers).
    w.providers.insert(DhtKey::Registry, vec![peer("registry-dead"), peer(REGISTRY)]);
    w.add_instance(&svc, "i1", ms(5));
    let req = w.request("svc", secs(5));
    w.run_for(secs(4));
    assert_eq!(w.routed_to(req).as_deref(), Some("i1"), "resolved through the live replica");
    // Keep using the name for a while: refreshes go to the live replica only, also
    // after the list of replicas is looked up again.
    steady_requests(&mut w, "svc", secs(10));
    assert_eq!(registry_gets_to(&w, "registry-dead"), 1, "asked once, then skipped");
    assert!(registry_gets_to(&w, REGISTRY) >= 8, "refreshed about every second");

    // The live one fails too: the client looks the replicas up again and, the dead
    // one being skipped, goes on with whichever answers.
    w.providers.insert(DhtKey::Registry, vec![peer("registry-dead"), peer("registry-2"), peer(REGISTRY)]);
    w.rtt.insert(PeerId("registry-2".into()), ms(2));
    w.rtt.remove(&PeerId(REGISTRY.into()));
    steady_requests(&mut w, "svc", secs(6));
    assert_eq!(registry_gets_to(&w, "registry-dead"), 1, "still skipped");
    assert!(registry_gets_to(&w, "registry-2") >= 2, "the other live replica took over");
}

#[test]
fn cached_entries_keep_serving_while_every_registry_is_down() {
    let svc = service("svc", 50, 100);
    let mut w = World::new([&svc]);
    w.add_instance(&svc, "i1", ms(5));
    steady_requests(&mut w, "svc", secs(1));
    w.rtt.remove(&PeerId(REGISTRY.into()));
    let during = steady_requests(&mut w, "svc", secs(20));
    assert!(during.iter().all(|(_, to, _)| to.as_deref() == Some("i1")), "{during:?}");
    // A name never resolved before has nothing to fall back on: a clear 503.
    let req = w.request("other", secs(5));
    w.run_for(secs(5));
    assert!(matches!(w.outcome(req), Some(Outcome::Fail { status: 503, .. })), "{:?}", w.outcome(req));
}
