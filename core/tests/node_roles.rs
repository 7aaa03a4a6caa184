//! The roles a `Node` can take besides client: service mode, registry, allocator.

mod world;

use physarum_core::config::{AllocatorConfig, NodeConfig};
use physarum_core::io::{Event, Input, OpResult, Output};
use physarum_core::perf::Requirements;
use physarum_core::trust::{Issuer, Operators, SecretKey, SignedEntry};
use physarum_core::types::{ContentHash, DhtKey, InboundId, InstanceId, PeerId};
use physarum_core::wire::{Request, Response};
use physarum_core::{Instant, Node};
use std::time::Duration;
use world::*;

fn config(name: &str) -> NodeConfig {
    NodeConfig::new(PeerId(name.into()), Requirements::rtt(ms(100), ms(1000)))
}

fn drain(node: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

fn reply_to(outputs: &[Output], id: InboundId) -> Option<Response> {
    outputs.iter().find_map(|o| match o {
        Output::ReplyToPeer { id: i, response } if *i == id => Some(response.clone()),
        _ => None,
    })
}

#[test]
fn service_mode_advertises_its_hash_and_answers_idle_queries() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("sidecar");
    cfg.serve = Some("svc".into());
    let mut w = World::with_config(cfg, [&svc]);
    w.run_for(ms(100));
    let adverts = w.count(|o| matches!(o, Output::Advertise { key: DhtKey::Service(h) } if *h == svc.hash));
    assert_eq!(adverts, 1, "advertised once resolved");
    // Re-advertised periodically (records expire) and on bootstrap reconnect.
    w.run_for(Duration::from_secs(31));
    assert_eq!(w.count(|o| matches!(o, Output::Advertise { key: DhtKey::Service(_) })), 2);
    w.input(Input::BootstrapConnected);
    assert_eq!(w.count(|o| matches!(o, Output::Advertise { key: DhtKey::Service(_) })), 3);
    // Idle: seconds since the last served request ended.
    w.input(Input::TunnelServed);
    w.input(Input::TunnelDone);
    w.run_for(Duration::from_secs(7));
    let request = Request::IdleQuery { credentials: None };
    w.input(Input::PeerRequest { id: InboundId(1), from: PeerId("alloc".into()), request });
    let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
    assert_eq!(reply_to(&outs, InboundId(1)), Some(Response::Idle { seconds: 7 }));
    // A request in flight: never idle, however long it takes; idle counts from its end.
    w.input(Input::TunnelServed);
    w.run_for(Duration::from_secs(100));
    w.input(Input::PeerRequest {
        id: InboundId(2),
        from: PeerId("alloc".into()),
        request: Request::IdleQuery { credentials: None },
    });
    w.input(Input::TunnelDone);
    w.run_for(Duration::from_secs(3));
    w.input(Input::PeerRequest {
        id: InboundId(3),
        from: PeerId("alloc".into()),
        request: Request::IdleQuery { credentials: None },
    });
    let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
    assert_eq!(reply_to(&outs, InboundId(2)), Some(Response::Idle { seconds: 0 }));
    assert_eq!(reply_to(&outs, InboundId(3)), Some(Response::Idle { seconds: 3 }));
}

#[test]
fn a_sidecar_whose_application_does_not_answer_says_so_to_probes_and_idle_queries() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("sidecar");
    cfg.serve = Some("svc".into());
    let mut w = World::with_config(cfg, [&svc]);
    w.run_for(ms(100));
    let from = PeerId("client".into());
    let ping = |id| Input::PeerRequest { id: InboundId(id), from: from.clone(), request: Request::Ping { nonce: id } };
    w.input(Input::AppChecked { answered: false });
    w.input(ping(1));
    // Down only after `app_down_after` (2) failed checks in a row.
    w.input(Input::AppChecked { answered: false });
    w.input(ping(2));
    w.input(Input::PeerRequest {
        id: InboundId(3),
        from: from.clone(),
        request: Request::IdleQuery { credentials: None },
    });
    w.input(Input::AppChecked { answered: true });
    w.input(ping(4));
    let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
    assert_eq!(reply_to(&outs, InboundId(1)), Some(Response::Pong { nonce: 1 }));
    assert!(
        matches!(reply_to(&outs, InboundId(2)), Some(Response::Error { reason }) if reason.contains("does not answer"))
    );
    assert!(matches!(reply_to(&outs, InboundId(3)), Some(Response::Error { .. })));
    assert_eq!(reply_to(&outs, InboundId(4)), Some(Response::Pong { nonce: 4 }));
    let health: Vec<bool> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Event(Event::AppHealth { answering, .. }) => Some(*answering),
            _ => None,
        })
        .collect();
    assert_eq!(health, vec![false, true]);
}

#[test]
fn a_sidecar_serves_only_credentials_that_certify_itself() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("sidecar");
    cfg.serve = Some("svc".into());
    let mut w = World::with_config(cfg, [&svc]);
    w.run_for(ms(100));
    let alloc_key = SecretKey::from_bytes([7; 32]);
    let grant = physarum_core::trust::Grant::sign(PeerId("alloc".into()), alloc_key.public(), &operator());
    let issuer = Issuer::allocator(alloc_key, grant).unwrap();
    let cases = [
        (issuer.issue(PeerId("someone-else".into()), svc.hash.clone(), u64::MAX), false),
        (issuer.issue(PeerId("sidecar".into()), ContentHash("another".into()), u64::MAX), false),
        (
            Issuer::operator(SecretKey::from_bytes([9; 32])).issue(
                PeerId("sidecar".into()),
                svc.hash.clone(),
                u64::MAX,
            ),
            false,
        ),
        (issuer.issue(PeerId("sidecar".into()), svc.hash.clone(), u64::MAX), true),
    ];
    for (i, (credentials, good)) in cases.into_iter().enumerate() {
        let id = InboundId(10 + i as u64);
        let request = Request::IdleQuery { credentials: Some(Box::new(credentials.clone())) };
        w.input(Input::PeerRequest { id, from: PeerId("alloc".into()), request });
        let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
        let served = outs.contains(&Output::ServeCredentials { credentials });
        match good {
            true => assert!(served && matches!(reply_to(&outs, id), Some(Response::Idle { .. })), "case {i}"),
            false => {
                assert!(!served, "case {i}");
                assert!(
                    matches!(reply_to(&outs, id), Some(Response::Error { reason }) if reason.contains("credentials refused"))
                );
            }
        }
    }
}

#[test]
fn an_operator_run_sidecar_certifies_itself_and_renews_at_half_life() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("sidecar");
    cfg.serve = Some("svc".into());
    cfg.trust.issuer = Some(Issuer::operator(operator()));
    cfg.trust.unix_at_zero = 5000;
    let mut w = World::with_config(cfg, [&svc]);
    w.run_for(ms(100));
    let issued = |w: &World| -> Vec<_> {
        w.log
            .iter()
            .filter_map(|(_, o)| match o {
                Output::ServeCredentials { credentials } => Some(credentials.clone()),
                _ => None,
            })
            .collect()
    };
    let first = issued(&w);
    assert_eq!(first.len(), 1, "certified once the served hash is known");
    let ops = Operators::new(vec![operator().public()]);
    assert_eq!(ops.verify_credentials(&first[0], &PeerId("sidecar".into()), &svc.hash, 5000), Ok(()));
    w.run_for(Duration::from_secs(301));
    let renewed = issued(&w);
    assert_eq!(renewed.len(), 2, "renewed after half the 600 s lifetime");
    assert_eq!(renewed[1].cert.not_after, 5000 + 300 + 600);
}

#[test]
fn a_client_node_refuses_roles_it_does_not_have() {
    let mut node = Node::new(config("client"), 1, Instant::ZERO);
    drain(&mut node);
    let from = PeerId("x".into());
    for (i, request) in [
        Request::Allocate { service: "svc".into() },
        Request::RegistryList { after: None },
        Request::IdleQuery { credentials: None },
    ]
    .into_iter()
    .enumerate()
    {
        let id = InboundId(i as u64);
        node.handle_input(Instant::ZERO, Input::PeerRequest { id, from: from.clone(), request });
        let outs = drain(&mut node);
        assert!(matches!(reply_to(&outs, id), Some(Response::Error { .. })), "{outs:?}");
    }
    node.handle_input(
        Instant::ZERO,
        Input::PeerRequest { id: InboundId(9), from, request: Request::Ping { nonce: 4 } },
    );
    assert_eq!(reply_to(&drain(&mut node), InboundId(9)), Some(Response::Pong { nonce: 4 }));
}

#[test]
fn registry_role_serves_and_persists_every_change() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("registry");
    cfg.registry = Some(vec![]);
    cfg.trust.operators = Operators::new(vec![operator().public()]);
    let mut node = Node::new(cfg, 1, Instant::ZERO);
    let outs = drain(&mut node);
    assert!(outs.iter().any(|o| matches!(o, Output::Advertise { key: DhtKey::Registry })));
    let from = PeerId("cli".into());
    let entry = SignedEntry::sign("svc".into(), 1, Some(svc.clone()), &operator());
    let put = Request::RegistryPut { entry: Box::new(entry.clone()) };
    node.handle_input(Instant::ZERO, Input::PeerRequest { id: InboundId(1), from: from.clone(), request: put });
    let outs = drain(&mut node);
    assert_eq!(reply_to(&outs, InboundId(1)), Some(Response::Done));
    assert!(outs.contains(&Output::PersistRegistry { entries: vec![entry.clone()] }));
    let get = Request::RegistryGet { name: "svc".into() };
    node.handle_input(Instant::ZERO, Input::PeerRequest { id: InboundId(2), from: from.clone(), request: get });
    assert_eq!(reply_to(&drain(&mut node), InboundId(2)), Some(Response::Entry { entry: Some(Box::new(entry)) }));
    // A stranger's write is refused and nothing is persisted.
    let forged = SignedEntry::sign("svc".into(), 2, Some(svc), &SecretKey::from_bytes([66; 32]));
    let put = Request::RegistryPut { entry: Box::new(forged) };
    node.handle_input(Instant::ZERO, Input::PeerRequest { id: InboundId(3), from, request: put });
    let outs = drain(&mut node);
    assert!(
        matches!(reply_to(&outs, InboundId(3)), Some(Response::Error { reason }) if reason.contains("not a configured operator"))
    );
    assert!(!outs.iter().any(|o| matches!(o, Output::PersistRegistry { .. })));
}

#[test]
fn allocator_role_resolves_through_the_registry_and_starts_one_instance() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("alloc");
    cfg.allocator = Some(AllocatorConfig { exec_roots: vec!["/".into()], ..AllocatorConfig::default() });
    grant(&mut cfg);
    let mut w = World::with_config(cfg, [&svc]);
    assert!(w.count(|o| matches!(o, Output::Advertise { key: DhtKey::Allocators })) >= 1);
    // Two clients ask at once; a peer cannot name what to run, only the service.
    for id in [1, 2] {
        let request = Request::Allocate { service: "svc".into() };
        w.input(Input::PeerRequest { id: InboundId(id), from: PeerId(format!("c{id}")), request });
    }
    w.run_for(ms(100));
    let starts: Vec<_> = w
        .log
        .iter()
        .filter_map(|(_, o)| match o {
            Output::StartInstance { instance, service } => Some((*instance, service.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 1, "one start for concurrent requests");
    assert_eq!(starts[0].1, svc, "what runs comes from the registry");
    let instance = peer("inst");
    w.rtt.insert(instance.peer.clone(), ms(1));
    w.input(Input::InstanceStarted { instance: starts[0].0, peer: instance.clone() });
    assert_eq!(w.count(|o| matches!(o, Output::ReplyToPeer { .. })), 0, "not before it holds its credentials");
    w.run_for(ms(100));
    let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
    for id in [1, 2] {
        assert_eq!(reply_to(&outs, InboundId(id)), Some(Response::Allocated { instance: instance.clone() }));
    }
    // An unknown service is refused, with the reason.
    let request = Request::Allocate { service: "rogue-image".into() };
    w.input(Input::PeerRequest { id: InboundId(3), from: PeerId("evil".into()), request });
    w.run_for(ms(100));
    let outs: Vec<Output> = w.log.iter().map(|(_, o)| o.clone()).collect();
    assert!(matches!(reply_to(&outs, InboundId(3)), Some(Response::Refused { .. })));
    assert_eq!(w.count(|o| matches!(o, Output::StartInstance { .. })), 1);
}

#[test]
fn allocator_culls_idle_instances_through_idle_queries() {
    let svc = service("svc", 50, 100);
    let mut cfg = config("alloc");
    cfg.allocator = Some(AllocatorConfig { exec_roots: vec!["/".into()], ..AllocatorConfig::default() });
    grant(&mut cfg);
    let mut node = Node::new(cfg.clone(), 1, Instant::ZERO);
    drain(&mut node);
    // Let the registry resolve through a found registry peer.
    let request = Request::Allocate { service: "svc".into() };
    node.handle_input(Instant::ZERO, Input::PeerRequest { id: InboundId(1), from: PeerId("c".into()), request });
    let mut now = Instant::ZERO;
    let (mut started, mut stopped) = (None, None);
    for _ in 0..10 {
        // Answer everything the node asks for at this instant, until it is quiet.
        loop {
            let outs = drain(&mut node);
            if outs.is_empty() {
                break;
            }
            for o in outs {
                let input = match o {
                    Output::FindProviders { op, key: DhtKey::Registry, .. } => {
                        Some(Input::OpDone { op, result: OpResult::Providers(vec![peer(REGISTRY)]) })
                    }
                    Output::SendRequest { op, request: Request::RegistryGet { .. }, .. } => Some(Input::OpDone {
                        op,
                        result: OpResult::Response(Response::Entry {
                            entry: Some(Box::new(SignedEntry::sign("svc".into(), 1, Some(svc.clone()), &operator()))),
                        }),
                    }),
                    Output::SendRequest { op, request: Request::IdleQuery { .. }, .. } => {
                        Some(Input::OpDone { op, result: OpResult::Response(Response::Idle { seconds: 61 }) })
                    }
                    Output::StartInstance { instance, .. } => {
                        started = Some(instance);
                        Some(Input::InstanceStarted { instance, peer: peer("inst") })
                    }
                    Output::StopInstance { instance } => {
                        stopped = Some((instance, now));
                        None
                    }
                    _ => None,
                };
                if let Some(input) = input {
                    node.handle_input(now, input);
                }
            }
        }
        now += Duration::from_secs(10);
        node.handle_input(now, Input::Tick);
    }
    let started: InstanceId = started.expect("an instance was started");
    let (stopped, at) = stopped.expect("the idle instance was stopped");
    assert_eq!(stopped, started);
    assert_eq!(at, Instant::from_micros(60_000_000), "at the first cull round, 60 s in");
    assert_eq!(node.allocator().map(|a| a.instances().count()), Some(0));
}
