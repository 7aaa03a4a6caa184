//! Writes the seeds of the `wire` fuzz target (`fuzz/corpus/wire/`): one valid
//! frame of each message kind. Run after changing a wire message:
//! `cargo test -p physarum-core --test fuzz_seeds -- --ignored`.

use physarum_core::perf::{PerfLimits, Requirements};
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
        run: RunSpec::Exec { program: "/usr/bin/hello".into(), args: vec!["-v".into()] },
        requirements: Requirements {
            soft: PerfLimits::rtt(Duration::from_millis(100)),
            hard: PerfLimits::rtt(Duration::from_millis(1000)),
        },
        cpu_millis: 100,
        memory_mb: 16,
        stateful: false,
    };
    let image = ServiceInfo { run: RunSpec::Image { image: "reg/hello:1".into() }, ..info.clone() };
    let instance = PeerAddr::new("12D3KooW", vec!["/ip4/127.0.0.1/tcp/4001".into()]);
    let seeds = [
        ("request-allocate", frame(&Request::Allocate { service: "hello".into() })),
        ("request-registry-get", frame(&Request::RegistryGet { name: "hello".into() })),
        ("request-registry-list", frame(&Request::RegistryList)),
        ("request-registry-put", frame(&Request::RegistryPut { info: info.clone() })),
        ("request-registry-delete", frame(&Request::RegistryDelete { name: "hello".into() })),
        ("request-idle-query", frame(&Request::IdleQuery)),
        ("request-ping", frame(&Request::Ping { nonce: 7 })),
        ("response-allocated", frame(&Response::Allocated { instance })),
        ("response-refused", frame(&Response::Refused { reason: "full".into() })),
        ("response-service", frame(&Response::Service { info: Some(image.clone()) })),
        ("response-services", frame(&Response::Services { infos: vec![info.clone(), image] })),
        ("response-done", frame(&Response::Done)),
        ("response-idle", frame(&Response::Idle { seconds: 61 })),
        ("response-pong", frame(&Response::Pong { nonce: 7 })),
        ("response-error", frame(&Response::Error { reason: "not a registry".into() })),
        (
            "envelope-request",
            frame(&Envelope::Request { id: 1, from: "a".into(), body: Request::RegistryPut { info } }),
        ),
        ("envelope-response", frame(&Envelope::Response { id: 1, body: Response::Done })),
        ("tunnel-hello", frame(&TunnelHello { service: "hello".into() })),
        ("tunnel-ack-ok", frame(&TunnelAck::Ok)),
        ("tunnel-ack-rejected", frame(&TunnelAck::Rejected { reason: "not served here".into() })),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
