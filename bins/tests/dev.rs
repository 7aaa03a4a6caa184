//! `physarum dev` end to end (issue 5): the one-command cluster answers through
//! its proxy, and SIGINT stops every process it started.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[test]
fn physarum_dev_serves_hello_and_stops_everything_on_sigint() {
    let dir = TempDir::new("dev");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = command("physarum", dir.path());
    cmd.args(["dev", "--port", &port.to_string(), "--allocators", "2"]);
    let t0 = Instant::now();
    let mut dev = Proc::spawn("physarum-dev", cmd, dir.path());

    // It prints what runs and the curl to try once the cluster is up.
    let curl = format!("curl 127.0.0.1:{port}/hello-world-server/hello");
    wait_for("the dev cluster to come up", Duration::from_secs(90), || {
        if let Some(status) = dev.try_exit() {
            panic!("physarum dev exited with {status}:\n{}", dev.log_text());
        }
        dev.log_text().contains(&curl).then_some(())
    });
    let up = t0.elapsed();
    let out = dev.log_text();
    for what in ["bootstrap", "registry", "allocator-1", "allocator-2", "proxy", "metrics http://", "Ctrl-C"] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }

    // The curl it suggests works: an instance is allocated on demand.
    let r = get(addr, "/hello-world-server/hello").unwrap_or_else(|e| panic!("{e}\n{}", dev.log_text()));
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, world\n"), "{}", dev.log_text());
    let first = t0.elapsed();
    eprintln!("MEASURED physarum dev: cluster up after {up:?}, first Hello, world after {first:?}");

    // Everything it started, instances included.
    let tree = descendants(dev.pid());
    // Every daemon, the demo service and its sidecar are subcommands of `physarum`.
    let hello = format!("{} hello", bin("physarum").display());
    assert!(tree.iter().any(|p| cmdline(*p).starts_with(&hello)), "no hello instance among {tree:?}");
    let sidecar = format!("{} proxy --key", bin("physarum").display());
    assert!(tree.iter().any(|p| cmdline(*p).starts_with(&sidecar)), "no sidecar proxy among {tree:?}");
    assert!(tree.len() >= 7, "expected bootstrap, registry, 2 allocators, proxy, hello and its proxy: {tree:?}");

    // SIGINT: it stops, and so does every process it started.
    dev.signal(libc::SIGINT);
    let status = dev.wait_exit(Duration::from_secs(40)).expect("physarum dev stops after SIGINT");
    assert!(status.success(), "exit status {status}:\n{}", dev.log_text());
    let left: Vec<String> = tree.iter().filter(|p| alive(**p)).map(|p| format!("{p} {}", cmdline(*p))).collect();
    assert!(left.is_empty(), "left running after SIGINT: {left:?}");
    assert!(dev.log_text().contains("Stopped."));
    // Its port is free again.
    assert!(std::net::TcpListener::bind(addr).is_ok());
}

/// `physarum dev --driver docker`: the demo image is built when missing,
/// registered and served from a container; Ctrl-C leaves no container behind.
#[test]
fn physarum_dev_with_the_docker_driver_serves_from_a_container_and_leaves_none() {
    if !common::docker::engine_available("physarum_dev_with_the_docker_driver_serves_from_a_container_and_leaves_none")
    {
        return;
    }
    let dir = TempDir::new("dev-docker");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = command("physarum", dir.path());
    cmd.args(["dev", "--port", &port.to_string(), "--driver", "docker"]);
    let mut dev = Proc::spawn("physarum-dev-docker", cmd, dir.path());
    let curl = format!("curl 127.0.0.1:{port}/hello-world-server/hello");
    wait_for("the dev cluster to come up", Duration::from_secs(180), || {
        if let Some(status) = dev.try_exit() {
            panic!("physarum dev exited with {status}:\n{}", dev.log_text());
        }
        dev.log_text().contains(&curl).then_some(())
    });
    assert!(dev.log_text().contains("image physarum/hello:dev"), "{}", dev.log_text());
    let r = get(addr, "/hello-world-server/hello").unwrap_or_else(|e| panic!("{e}\n{}", dev.log_text()));
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, world\n"), "{}", dev.log_text());
    let label = format!("physarum.allocator={}", dev_allocator_peer(&dev));
    let _guard = common::docker::DockerGuard::new(label.clone());
    assert_eq!(common::docker::containers_labelled(&label).len(), 1, "one container runs the instance");

    dev.signal(libc::SIGINT);
    let status = dev.wait_exit(Duration::from_secs(40)).expect("physarum dev stops after SIGINT");
    assert!(status.success(), "exit status {status}:\n{}", dev.log_text());
    assert!(common::docker::containers_labelled(&label).is_empty(), "containers left after Ctrl-C");
}

/// The peer id of `physarum dev`'s first allocator, from its key file.
fn dev_allocator_peer(dev: &Proc) -> String {
    let root = std::env::temp_dir().join(format!("physarum-dev-{}", dev.pid()));
    let key = physarum_net_real::keyfile::load(&root.join("allocator-1.key")).unwrap();
    physarum_net_real::keyfile::peer_id_string(&key)
}
