//! The docker instance driver end to end: an allocator with `--driver docker` runs
//! the registered image as a container (host networking, limits, labels), the
//! client gets `Hello, world`, the idle cull removes the container, and a restarted
//! allocator adopts the running containers its killed predecessor left behind and
//! removes the stopped ones.
//! Skipped, with a message, where no Docker engine runs.

mod common;

use common::docker::*;
use common::*;
use std::time::{Duration, Instant};

const SERVICE: &str = "hello-docker";

fn register_image(c: &Cluster, name: &str, image: &str, cpu: u32, mem: u32) {
    let conf = c.dir.path().join(format!("{name}.json"));
    let text = format!(
        r#"{{"Name": "{name}", "Image": "{image}", "NetworkSoftReq": 100, "NetworkHardReq": 1000, "CpuReq": {cpu}, "MemoryReq": {mem}}}"#
    );
    std::fs::write(&conf, text).unwrap();
    let key = c.operator_key.display().to_string();
    let (ok, out, err) = c.registry_cli(&["add", conf.to_str().unwrap(), "--operator-key", &key]);
    assert!(ok, "registry add failed:\n{out}\n{err}\n{}", c.logs());
}

fn allocator_peer(c: &Cluster, i: usize) -> String {
    let key = physarum_net_real::keyfile::load(&c.dir.path().join(format!("allocator{i}.key"))).unwrap();
    physarum_net_real::keyfile::peer_id_string(&key)
}

fn wait_containers(label: &str, n: usize, timeout: Duration, c: &Cluster) -> Vec<String> {
    poll_until(timeout, || {
        let ids = containers_labelled(label);
        (ids.len() == n).then_some(ids)
    })
    .unwrap_or_else(|| {
        panic!("expected {n} containers labelled {label}: {:?}\n{}", containers_labelled(label), c.logs())
    })
}

const DOCKER_ALLOCATOR: &[&str] = &["--driver", "docker", "--idle-limit", "3", "--cull-interval", "1"];

#[test]
fn docker_driver_runs_culls_and_cleans_up_containers() {
    if !engine_available("docker_driver_runs_culls_and_cleans_up_containers") {
        return;
    }
    build_test_image();
    let mut c = Cluster::bootstrap("docker", None);
    c.start_registry();
    c.start_allocator_with(DOCKER_ALLOCATOR);
    c.start_proxy();
    let owner = format!("physarum.allocator={}", allocator_peer(&c, 0));
    let _guard = DockerGuard::new(owner.clone());
    register_image(&c, SERVICE, TEST_IMAGE, 250, 64);

    // The capacity offered is the host's, not a constant.
    let log = c.allocators[0].proc.log_text();
    let cores = std::thread::available_parallelism().unwrap().get() * 1000;
    assert!(log.contains(&format!("Offering instances {cores} millicores")), "{log}");

    // A request starts a container; the client gets the answer.
    let t0 = Instant::now();
    let r = get(c.proxy_addr, &format!("/{SERVICE}/hello")).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, world\n"), "{}", c.logs());
    eprintln!("MEASURED docker driver: cold first request {:?}", t0.elapsed());
    let ids = wait_containers(&owner, 1, Duration::from_secs(5), &c);

    // Host networking, the service's requirements as limits, the labels.
    let inspect = docker_ok(&[
        "inspect",
        "-f",
        "{{.HostConfig.NetworkMode}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{index .Config.Labels \"physarum.service\"}} {{index .Config.Labels \"physarum.instance\"}} {{.State.Running}}",
        &ids[0],
    ]);
    assert_eq!(inspect, format!("host 250000000 {} {SERVICE} 1 true", 64 * 1024 * 1024));
    let env = docker_ok(&["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", &ids[0]]);
    for var in ["PROXY_IP=127.0.0.1", "PROXY_PORT=", "SERVICE_PORT=", "METRICS_PORT=", "P2P_BOOTSTRAPS=/ip4/"] {
        assert!(env.contains(var), "{var} missing from {env}");
    }
    // The allocator's own address is among the instance's bootstraps.
    let boots = env.lines().find(|l| l.starts_with("P2P_BOOTSTRAPS=")).unwrap();
    assert!(boots.contains(&allocator_peer(&c, 0)) && boots.contains(&c.bootstrap_addr), "{boots}");

    // Idle: the cull stops and removes the container.
    wait_containers(&owner, 0, Duration::from_secs(30), &c);

    // Again: a new container. Kill the allocator outright: the container stays
    // behind; the restarted allocator (same identity) adopts it, serves from it
    // without starting another, and culls it when idle. A stopped container of the
    // earlier run is removed.
    let r = get(c.proxy_addr, &format!("/{SERVICE}/hello")).unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), c.logs());
    let running = wait_containers(&owner, 1, Duration::from_secs(5), &c);
    c.allocators[0].proc.signal(libc::SIGKILL);
    c.allocators[0].proc.wait_exit(Duration::from_secs(10)).expect("the allocator dies");
    assert_eq!(containers_labelled(&owner), running, "the killed allocator's container is left behind");
    // `docker ps -q` lists short ids.
    let stopped = docker_ok(&["create", "--label", &owner, TEST_IMAGE])[..12].to_string();
    c.allocators.pop();
    c.start_allocator_with(DOCKER_ALLOCATOR);
    let adopted = poll_until(Duration::from_secs(20), || {
        let log = c.allocators[0].proc.log_text();
        log.contains("Adopted 1 running containers").then_some(log)
    });
    let log = adopted.unwrap_or_else(|| panic!("no adoption\n{}", c.logs()));
    assert!(log.contains("Removed 1 containers an earlier run"), "{log}");
    assert!(!containers_labelled(&owner).contains(&stopped), "the stopped leftover is removed");
    let r = get(c.proxy_addr, &format!("/{SERVICE}/hello")).unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), c.logs());
    assert_eq!(containers_labelled(&owner), running, "served by the adopted container, none started");
    wait_containers(&owner, 0, Duration::from_secs(30), &c);
    let log = c.allocators[0].proc.log_text();
    assert!(log.contains("container physarum-") && log.contains("stopped and removed"), "{log}");

    // The restarted allocator serves again, and a clean stop removes its container.
    let served = poll_until(Duration::from_secs(30), || {
        get(c.proxy_addr, &format!("/{SERVICE}/hello")).ok().filter(|r| r.status == 200)
    });
    assert!(served.is_some(), "not served after the allocator restarted\n{}", c.logs());
    wait_containers(&owner, 1, Duration::from_secs(5), &c);
    c.allocators[0].proc.stop(Duration::from_secs(20));
    assert!(containers_labelled(&owner).is_empty(), "a stopped allocator leaves no container");
}

#[test]
fn docker_driver_errors_reach_the_client() {
    if !engine_available("docker_driver_errors_reach_the_client") {
        return;
    }
    build_test_image();
    let mut c = Cluster::bootstrap("docker-errors", None);
    c.start_registry();
    c.start_allocator_with(&["--driver", "docker"]);
    c.start_proxy();
    let owner = format!("physarum.allocator={}", allocator_peer(&c, 0));
    let _guard = DockerGuard::new(owner.clone());

    // An image that is not here and cannot be pulled (no registry is reachable).
    register_image(&c, "missing-image", "physarum/no-such-image:missing", 0, 0);
    let r = get(c.proxy_addr, "/missing-image/hello").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("is not on this machine and pulling it failed"), "{}", r.text());

    // More CPU than this machine has.
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    register_image(&c, "too-big", TEST_IMAGE, (cores + 1) * 1000, 0);
    let r = get(c.proxy_addr, "/too-big/hello").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("not enough CPU"), "{}", r.text());

    // A container that exits while starting: its exit status and log.
    let failing = "physarum/hello:test-fails-at-start";
    let _untag = Untag(vec![failing.to_string()]);
    let created = docker_ok(&["create", "--label", &owner, TEST_IMAGE]);
    docker_ok(&[
        "commit",
        "--change",
        r#"ENTRYPOINT ["/bin/sh", "-c", "echo cannot bind: boom >&2; exit 3"]"#,
        &created,
        failing,
    ]);
    docker_ok(&["rm", &created]);
    register_image(&c, "fails-at-start", failing, 0, 0);
    let r = get(c.proxy_addr, "/fails-at-start/hello").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("the container exited with status 3"), "{}", r.text());
    assert!(r.text().contains("cannot bind: boom"), "{}", r.text());

    // An executable on a docker allocator.
    c.register_hello("an-executable");
    let r = get(c.proxy_addr, "/an-executable/hello").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("runs container images"), "{}", r.text());
    // Every failed start removes its container (a start the client no longer waits
    // for may still be ending on a loaded machine).
    let removed = poll_until(Duration::from_secs(20), || containers_labelled(&owner).is_empty().then_some(()));
    assert!(removed.is_some(), "containers left: {:?}\n{}", containers_labelled(&owner), c.logs());

    // No engine: the allocator says so and exits.
    let mut cmd = command("allocator", c.dir.path());
    cmd.arg("--grant").arg(c.grant("no-engine")).arg("--key").arg(c.dir.path().join("no-engine.key"));
    cmd.arg("--configfile").arg(&c.conf);
    cmd.args(["--driver", "docker", "--bootstrap", &c.bootstrap_addr, "--metrics", "127.0.0.1:0"])
        .env("DOCKER_HOST", format!("unix://{}/no-docker.sock", c.dir.path().display()));
    let (ok, out, err) = run_bounded(cmd, Duration::from_secs(30));
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("cannot reach the Docker engine"), "{out}\n{err}");
}

/// Cold-start time with the docker driver: 20 services, each a tag of the test
/// image (another reference is another content hash), each first request
/// allocates a container. Run with
/// `cargo test -p physarum --test docker -- --ignored --nocapture cold_start`.
#[test]
#[ignore]
fn cold_start_benchmark() {
    if !engine_available("cold_start_benchmark") {
        return;
    }
    build_test_image();
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut c = Cluster::bootstrap("docker-bench", None);
    c.start_registry();
    c.start_allocator_with(&["--driver", "docker", "--max-instances", "64"]);
    c.start_proxy();
    let owner = format!("physarum.allocator={}", allocator_peer(&c, 0));
    let _guard = DockerGuard::new(owner);
    let tags: Vec<String> = (0..runs).map(|i| format!("physarum/hello:bench-{i}")).collect();
    let _untag = Untag(tags.clone());
    for (i, tag) in tags.iter().enumerate() {
        docker_ok(&["tag", TEST_IMAGE, tag]);
        register_image(&c, &format!("bench-{i}"), tag, 0, 0);
    }
    let mut times = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        let r = get(c.proxy_addr, &format!("/bench-{i}/hello")).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        times.push(t0.elapsed());
    }
    times.sort();
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "MEASURED docker cold start over {runs} runs: p50 {:?}, p99 {:?}, min {:?}, max {:?}",
        p(0.5),
        p(0.99),
        times[0],
        times[times.len() - 1]
    );
}

/// Removes image tags on drop.
struct Untag(Vec<String>);

impl Drop for Untag {
    fn drop(&mut self) {
        let mut args = vec!["rmi"];
        args.extend(self.0.iter().map(String::as_str));
        let _ = docker(&args);
    }
}
