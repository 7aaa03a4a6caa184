//! End-to-end tests: the real binaries on loopback (issue 4).
//!
//! Every process is started through a guard that stops it on drop; ports are
//! dynamic; readiness is polled against deadlines.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SERVICE: &str = "hello-world-server";

fn instances_up(c: &Cluster) -> f64 {
    c.allocators.iter().map(|a| metric_sum(&scrape(a.metrics), "physarum_instances_up_total")).sum()
}

/// The pids of `hello` instances the allocators run.
fn hello_pids(c: &Cluster) -> Vec<u32> {
    let hello = bin("hello").display().to_string();
    c.allocators.iter().flat_map(|a| children_of(a.proc.pid())).filter(|p| cmdline(*p).starts_with(&hello)).collect()
}

fn get_ok(c: &Cluster, path: &str) -> HttpResponse {
    let r = get(c.proxy_addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", c.logs()));
    assert_eq!(r.status, 200, "GET {path}: {} {}\n{}", r.status, r.text(), c.logs());
    r
}

/// bootstrap + registry + two allocators + an anonymous proxy; `hello` registered
/// with the CLI; the first request allocates, the second is served from the cache;
/// bodies and query strings pass intact; an unknown service is a 404 with the
/// reason; 100 MB stream through with bounded proxy memory; a killed instance is
/// replaced by a new one.
#[test]
fn a_cluster_allocates_serves_streams_and_recovers() {
    let c = Cluster::start("cluster", 2);

    // Register through the CLI, and read it back.
    c.register_hello(SERVICE);
    let (ok, out, err) = c.registry_cli(&["get", SERVICE]);
    assert!(ok && out.contains(SERVICE) && out.contains("hello.sh"), "{out}\n{err}");
    let (ok, out, err) = c.registry_cli(&["list"]);
    assert!(ok && out.contains(SERVICE), "{out}\n{err}");
    assert_eq!(instances_up(&c), 0.0);
    let store = std::fs::read_to_string(c.dir.path().join("registry-data/registry.json")).unwrap();
    assert!(store.contains(SERVICE), "the registry persisted the entry: {store}");

    // The bootstrap pings its peers and exports their RTTs.
    let boot_metrics = c.bootstrap.metrics;
    wait_for("RTT metrics on the bootstrap", Duration::from_secs(15), || {
        let text = scrape(boot_metrics);
        (text.lines().filter(|l| l.starts_with("physarum_peer_rtt_seconds{peer=")).count() >= 3).then_some(())
    });
    assert!(metric(&scrape(boot_metrics), "physarum_connected_peers").unwrap_or(0.0) >= 4.0);

    // First request: allocated on demand.
    let t0 = Instant::now();
    let r = get_ok(&c, &format!("/{SERVICE}/hello"));
    let cold = t0.elapsed();
    assert_eq!(r.text(), "Hello, world\n");
    assert_eq!(instances_up(&c), 1.0, "one instance started\n{}", c.logs());
    let first_pid = get_ok(&c, &format!("/{SERVICE}/pid")).text();

    // Second request: from the peer cache, no new instance.
    let proxy_metrics = c.proxy.as_ref().unwrap().metrics;
    let hits_before = metric_sum(&scrape(proxy_metrics), "physarum_cache_hits_total");
    let t0 = Instant::now();
    let r = get_ok(&c, &format!("/{SERVICE}/hello"));
    let cached = t0.elapsed();
    assert_eq!(r.text(), "Hello, world\n");
    let hits_after = metric_sum(&scrape(proxy_metrics), "physarum_cache_hits_total");
    assert!(hits_after > hits_before, "cache hits {hits_before} -> {hits_after}");
    assert_eq!(instances_up(&c), 1.0);
    eprintln!("MEASURED loopback: cold first request {cold:?}, cached request {cached:?}");

    // POST body and query string intact.
    let body = b"line one\nline two & more=stuff \x00\xff binary".to_vec();
    let r = http(c.proxy_addr, "POST", &format!("/{SERVICE}/echo?a=1&b=two%20words&c"), &body, Duration::from_secs(30))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let mut want = b"POST /echo?a=1&b=two%20words&c\n\n".to_vec();
    want.extend_from_slice(&body);
    assert_eq!(r.body, want);
    // A larger upload streams through too (1 MiB).
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let r = http(c.proxy_addr, "PUT", &format!("/{SERVICE}/echo"), &big, Duration::from_secs(60)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[r.body.len() - big.len()..], &big[..]);

    // Unknown service: 404 with the reason.
    let r = get(c.proxy_addr, "/no-such-service/x").unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no-such-service"), "reason: {}", r.text());

    // 100 MB response streams through; the proxy's memory stays bounded.
    let proxy_pid = c.proxy.as_ref().unwrap().proc.pid();
    let rss_before = rss_kib(proxy_pid).unwrap();
    let n: u64 = 100 * 1024 * 1024;
    let mut got = 0u64;
    let mut max_rss = rss_before;
    let mut last_check = Instant::now();
    let t0 = Instant::now();
    let (status, _) =
        http_stream(c.proxy_addr, "GET", &format!("/{SERVICE}/bytes/{n}"), b"", Duration::from_secs(60), |d| {
            got += d.len() as u64;
            if last_check.elapsed() > Duration::from_millis(20) {
                max_rss = max_rss.max(rss_kib(proxy_pid).unwrap_or(0));
                last_check = Instant::now();
            }
        })
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(status, 200);
    assert_eq!(got, n);
    eprintln!(
        "MEASURED 100 MB through the proxy in {took:?}; proxy RSS {} KiB before, max {} KiB during",
        rss_before, max_rss
    );
    assert!(max_rss < rss_before + 48 * 1024, "proxy RSS grew from {rss_before} KiB to {max_rss} KiB");

    // Kill the instance: the next requests are served by a new one.
    let pids = hello_pids(&c);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(format!("{}\n", pids[0]), first_pid);
    unsafe {
        libc::kill(pids[0] as libc::pid_t, libc::SIGKILL);
    }
    // The allocator notices the exit (and stops the sidecar).
    wait_for("the allocator to notice the exit", Duration::from_secs(10), || {
        let gone: f64 =
            c.allocators.iter().map(|a| metric_sum(&scrape(a.metrics), "physarum_instances_gone_total")).sum();
        (gone >= 1.0).then_some(())
    });
    // The very next request is served by a new instance: the proxy finds the cached
    // instance dead before sending anything, evicts it and asks the core again.
    let next = get(c.proxy_addr, &format!("/{SERVICE}/pid")).expect("the proxy answers");
    assert_eq!(next.status, 200, "the next request after the kill failed: {}\n{}", next.text(), c.logs());
    let new_pid = next.text();
    assert_ne!(new_pid, first_pid);
    assert_eq!(get_ok(&c, &format!("/{SERVICE}/hello")).text(), "Hello, world\n");
    assert_eq!(instances_up(&c), 2.0);

    // An allocator that is killed outright takes its instances with it (no orphans).
    let host =
        c.allocators.iter().find(|a| !children_of(a.proc.pid()).is_empty()).expect("an allocator with instances");
    let orphans = children_of(host.proc.pid());
    assert_eq!(orphans.len(), 2, "the application and its sidecar: {orphans:?}");
    host.proc.signal(libc::SIGKILL);
    let left = poll_until(Duration::from_secs(10), || orphans.iter().all(|p| !alive(*p)).then_some(()));
    assert!(left.is_some(), "instances outlived their allocator: {orphans:?}");
}

/// The registry's entries survive a restart of the registry.
#[test]
fn registry_entries_survive_a_restart() {
    let mut c = Cluster::bootstrap("restart", None);
    c.start_registry();
    c.register_hello("svc-a");
    let (ok, out, err) = c.registry_cli(&["get", "svc-a"]);
    assert!(ok && out.contains("svc-a"), "{out}\n{err}");
    // Stop it and start it again on the same data directory.
    let status = c.registry.as_mut().unwrap().proc.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "registry exit: {status:?}");
    c.start_registry();
    let log = c.registry.as_ref().unwrap().proc.log_text();
    assert!(log.contains("Loaded 1 services"), "{log}");
    let (ok, out, err) = c.registry_cli(&["get", "svc-a"]);
    assert!(ok && out.contains("svc-a"), "after restart: {out}\n{err}\n{}", c.logs());
    // Delete, then it is gone, also after another restart.
    let key = c.operator_key.display().to_string();
    let (ok, out, err) = c.registry_cli(&["rm", "svc-a", "--operator-key", &key]);
    assert!(ok && out.contains("Removed svc-a"), "{out}\n{err}");
    c.registry.as_mut().unwrap().proc.stop(Duration::from_secs(10));
    c.start_registry();
    let (ok, out, err) = c.registry_cli(&["get", "svc-a"]);
    assert!(!ok && err.contains("no service named"), "{out}\n{err}");
    let (ok, out, _) = c.registry_cli(&["list"]);
    assert!(ok && out.contains("No services registered"), "{out}");
}

/// A node with another private network key cannot join, and says why.
#[test]
fn a_node_with_the_wrong_psk_cannot_join() {
    let mut c = Cluster::bootstrap("psk", Some("the right passphrase"));
    // The right key joins, and the whole flow works in the private network: the
    // instance and its sidecar get the key through P2P_PSK.
    c.start_registry();
    c.start_allocator();
    c.start_proxy();
    c.register_hello(SERVICE);
    let r = get(c.proxy_addr, &format!("/{SERVICE}/hello")).unwrap();
    assert_eq!((r.status, r.text()), (200, "Hello, world\n".to_string()), "{}", c.logs());
    // A wrong one does not, and exits with a clear error.
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = command("allocator", c.dir.path());
    cmd.arg("--configfile").arg(&c.conf).arg("--bootstrap").arg(&c.bootstrap_addr);
    cmd.arg("--psk").arg("a wrong passphrase").arg("--bootstrap-attempts").arg("1");
    cmd.arg("--key").arg(c.dir.path().join("intruder.key")).arg("--metrics").arg(metrics.to_string());
    cmd.arg("--grant").arg(c.grant("intruder"));
    cmd.arg("--listen").arg("/ip4/127.0.0.1/tcp/0");
    let mut intruder = Proc::spawn("intruder", cmd, c.dir.path());
    let status = intruder.wait_exit(Duration::from_secs(60)).expect("the intruder gives up");
    assert!(!status.success());
    let log = intruder.log_text();
    assert!(log.contains("cannot join the P2P network"), "{log}");
    assert!(log.contains("private network key"), "{log}");
    assert!(!metrics_up(metrics));
    // And without any key, neither.
    let (ok, _, err) = {
        let mut cmd = command("physarum", c.dir.path());
        cmd.args(["registry", "--bootstrap-attempts", "1", "--bootstrap", &c.bootstrap_addr, "list"]);
        run_bounded(cmd, Duration::from_secs(60))
    };
    assert!(!ok);
    assert!(err.contains("cannot join the P2P network") && err.contains("has no --psk"), "{err}");
}

/// A broken config file: a clear error naming the file, and a non-zero exit,
/// from every daemon. Likewise a corrupt identity key.
#[test]
fn a_broken_config_is_a_clear_error() {
    let dir = TempDir::new("badconf");
    let conf = dir.path().join("conf.json");
    std::fs::write(&conf, r#"{"Perf": {"SoftReq": {"RTT": 100}, "HardReq": {"RTT": "#).unwrap();
    for (name, extra) in [
        ("allocator", vec!["--metrics", "127.0.0.1:0", "--grant", "g.json"]),
        ("proxy", vec!["0"]),
        ("registry", vec!["--metrics", "127.0.0.1:0"]),
        ("bootstrap", vec!["--metrics", "127.0.0.1:0"]),
        ("physarum", vec![]),
    ] {
        let mut cmd = command(name, dir.path());
        if name == "physarum" {
            cmd.args(["registry", "--configfile", conf.to_str().unwrap(), "list"]);
        } else {
            cmd.arg("--configfile").arg(&conf).args(&extra);
        }
        let (ok, out, err) = run_bounded(cmd, Duration::from_secs(20));
        assert!(!ok, "{name} accepted a broken config\n{out}\n{err}");
        assert!(err.contains("conf.json") && err.contains("invalid config"), "{name}: {err}");
    }
    // Soft above hard.
    std::fs::write(&conf, r#"{"Perf": {"SoftReq": {"RTT": 900}, "HardReq": {"RTT": 100}}}"#).unwrap();
    let mut cmd = command("proxy", dir.path());
    cmd.arg("--configfile").arg(&conf).arg("0");
    let (ok, _, err) = run_bounded(cmd, Duration::from_secs(20));
    assert!(!ok && err.contains("is above"), "{err}");
    // A missing config file named explicitly.
    let mut cmd = command("allocator", dir.path());
    cmd.arg("--configfile").arg(dir.path().join("nope.json")).arg("--grant").arg("g.json");
    let (ok, _, err) = run_bounded(cmd, Duration::from_secs(20));
    assert!(!ok && err.contains("cannot read config file") && err.contains("nope.json"), "{err}");
    // A corrupt key file.
    let key = dir.path().join("bad.key");
    std::fs::write(&key, b"garbage").unwrap();
    let mut cmd = command("bootstrap", dir.path());
    cmd.arg("--key").arg(&key).arg("--metrics").arg("127.0.0.1:0").arg("--listen").arg("/ip4/127.0.0.1/tcp/0");
    let (ok, _, err) = run_bounded(cmd, Duration::from_secs(20));
    assert!(!ok && err.contains("bad.key") && err.contains("not a valid libp2p identity key"), "{err}");
    // A bad service config for the CLI, before any network.
    let svc = dir.path().join("svc.json");
    std::fs::write(&svc, r#"{"Name": "x", "NetworkSoftReq": 10}"#).unwrap();
    let mut cmd = command("physarum", dir.path());
    cmd.args(["registry", "add", svc.to_str().unwrap(), "--operator-key", "operator.key"]);
    let (ok, _, err) = run_bounded(cmd, Duration::from_secs(20));
    assert!(!ok && err.contains("\"Exec\" or \"Image\""), "{err}");
}

/// `hello` answers on $SERVICE_PORT (or --port) and streams what the tests use.
#[test]
fn hello_answers() {
    let dir = TempDir::new("hello");
    let port = free_port();
    let mut cmd = command("hello", dir.path());
    cmd.env("SERVICE_PORT", port.to_string());
    let _hello = Proc::spawn("hello", cmd, dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("hello to listen", Duration::from_secs(10), || connects(addr).then_some(()));
    assert_eq!(get(addr, "/").unwrap().text(), "Hello, world\n");
    let r = http(addr, "POST", "/echo?x=1", b"abc", Duration::from_secs(5)).unwrap();
    assert_eq!(r.text(), "POST /echo?x=1\n\nabc");
    let r = get(addr, "/bytes/200000").unwrap();
    assert_eq!(r.body.len(), 200_000);
    assert_eq!(get(addr, "/bytes/nope").unwrap().status, 400);
}
