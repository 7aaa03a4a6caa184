//! Writes the seeds of the `wire` fuzz target (`fuzz/corpus/wire/`): one valid
//! frame of each message kind. Run after changing a wire message:
//! `cargo test -p physarum-core --test fuzz_seeds -- --ignored`.

use physarum_core::perf::{PerfLimits, Requirements};
use physarum_core::trust::{Issuer, SecretKey, SignedEntry};
use physarum_core::types::{ContentHash, PeerAddr, RunSpec, ServiceInfo};
use physarum_core::wire::{self, Envelope, Request, Response, TunnelAck, TunnelHello};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

fn frame(msg: &impl Serialize) -> Vec<u8> {
    wire::encode(msg).expect("a seed encodes")
}

#[test]
#[ignore = "writes fuzz/corpus/wire; run it after changing a wire message"]
fn write_wire_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wire");
    std::fs::create_dir_all(&dir).unwrap();
    let info = ServiceInfo {
        name: "hello".into(),
        hash: ContentHash("3f2a".into()),
        run: RunSpec::Exec {
            program: "/srv/physarum/hello".into(),
            args: vec!["-v".into()],
            env: vec![("RUST_LOG".into(), "info".into())],
        },
        requirements: Requirements {
            soft: PerfLimits::rtt(Duration::from_millis(100)),
            hard: PerfLimits::rtt(Duration::from_millis(1000)),
        },
        cpu_millis: 100,
        memory_mb: 16,
        stateful: false,
        client_mode: false,
    };
    let image = ServiceInfo { run: RunSpec::Image { image: "reg/hello:1".into() }, ..info.clone() };
    let instance = PeerAddr::new("12D3KooW", vec!["/ip4/127.0.0.1/tcp/4001".into()]);
    let operator = SecretKey::from_bytes([1; 32]);
    let signed = |info: &ServiceInfo| SignedEntry::sign(info.name.clone(), 3, Some(info.clone()), &operator);
    let removal = SignedEntry::sign("hello".into(), 4, None, &operator);
    let credentials =
        Issuer::operator(SecretKey::from_bytes([1; 32])).issue(instance.peer.clone(), info.hash.clone(), 1_900_000_000);
    let seeds = [
        ("request-allocate", frame(&Request::Allocate { service: "hello".into() })),
        ("request-registry-get", frame(&Request::RegistryGet { name: "hello".into() })),
        ("request-registry-list", frame(&Request::RegistryList { after: Some("a".into()) })),
        ("request-registry-put", frame(&Request::RegistryPut { entry: Box::new(signed(&info)) })),
        ("request-registry-remove", frame(&Request::RegistryPut { entry: Box::new(removal) })),
        ("request-idle-query", frame(&Request::IdleQuery { credentials: Some(Box::new(credentials.clone())) })),
        ("request-ping", frame(&Request::Ping { nonce: 7 })),
        ("response-allocated", frame(&Response::Allocated { instance })),
        ("response-refused", frame(&Response::Refused { reason: "full".into() })),
        ("response-entry", frame(&Response::Entry { entry: Some(Box::new(signed(&image))) })),
        ("response-entries", frame(&Response::Entries { entries: vec![signed(&info), signed(&image)], next: None })),
        ("response-done", frame(&Response::Done)),
        ("response-idle", frame(&Response::Idle { seconds: 61 })),
        ("response-pong", frame(&Response::Pong { nonce: 7 })),
        ("response-error", frame(&Response::Error { reason: "not a registry".into() })),
        ("envelope-request", frame(&Envelope::Request { id: 1, from: "a".into(), body: Request::Ping { nonce: 1 } })),
        ("envelope-response", frame(&Envelope::Response { id: 1, body: Response::Done })),
        ("tunnel-hello", frame(&TunnelHello { service: "hello".into() })),
        ("tunnel-ack-ok", frame(&TunnelAck::Ok { credentials: Some(credentials) })),
        ("tunnel-ack-rejected", frame(&TunnelAck::Rejected { reason: "not served here".into() })),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
