//! Writes the generated seeds of `corpus/`: one valid frame of each wire message
//! kind. Run after a wire format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --example write_seeds`.
//! (The shipped config and scenario files are seeds as they are: `run.sh` passes
//! their folders to the fuzzer.)

use physarum_core::perf::{PerfLimits, Requirements};
use physarum_core::types::{ContentHash, DhtKey, PeerAddr, RunSpec, ServiceInfo};
use physarum_core::wire::{self, Envelope, Request, Response, TunnelAck, TunnelHello};
use physarum_net_sim::dht::DhtMsg;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/wire");
    std::fs::create_dir_all(&dir)?;
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
    let mut n = 0;
    let mut write = |name: &str, msg: &dyn Fn() -> Result<Vec<u8>, wire::WireError>| -> std::io::Result<()> {
        n += 1;
        std::fs::write(dir.join(format!("{n:02}-{name}")), msg().expect("seed encodes"))
    };
    fn frame<T: Serialize>(m: T) -> impl Fn() -> Result<Vec<u8>, wire::WireError> {
        move || wire::encode(&m)
    }
    write("request-allocate", &frame(Request::Allocate { service: "hello".into() }))?;
    write("request-registry-get", &frame(Request::RegistryGet { name: "hello".into() }))?;
    write("request-registry-list", &frame(Request::RegistryList))?;
    write("request-registry-put", &frame(Request::RegistryPut { info: info.clone() }))?;
    write("request-registry-delete", &frame(Request::RegistryDelete { name: "hello".into() }))?;
    write("request-idle-query", &frame(Request::IdleQuery))?;
    write("request-ping", &frame(Request::Ping { nonce: 7 }))?;
    write("response-allocated", &frame(Response::Allocated { instance: instance.clone() }))?;
    write("response-refused", &frame(Response::Refused { reason: "full".into() }))?;
    write("response-service", &frame(Response::Service { info: Some(image.clone()) }))?;
    write("response-services", &frame(Response::Services { infos: vec![info.clone(), image] }))?;
    write("response-done", &frame(Response::Done))?;
    write("response-idle", &frame(Response::Idle { seconds: 61 }))?;
    write("response-pong", &frame(Response::Pong { nonce: 7 }))?;
    write("response-error", &frame(Response::Error { reason: "not a registry".into() }))?;
    write(
        "envelope-request",
        &frame(Envelope::Request { id: 1, from: "a".into(), body: Request::RegistryPut { info } }),
    )?;
    write("envelope-response", &frame(Envelope::Response { id: 1, body: Response::Done }))?;
    write("tunnel-hello", &frame(TunnelHello { service: "hello".into() }))?;
    write("tunnel-ack-ok", &frame(TunnelAck::Ok))?;
    write("tunnel-ack-rejected", &frame(TunnelAck::Rejected { reason: "not served here".into() }))?;
    write(
        "dht-add-provider",
        &frame(DhtMsg::AddProvider { id: 3, key: DhtKey::Service(ContentHash("3f2a".into())), provider: instance }),
    )?;
    write("dht-get-providers", &frame(DhtMsg::GetProviders { id: 4, key: DhtKey::Allocators }))?;
    Ok(())
}
