//! End-to-end robustness of the real binaries: overload is answered, not dropped; a
//! stopped application is failed over; a long request is not culled under.
//!
//! Every process is started through a guard that stops it on drop; ports are
//! dynamic; readiness is polled against deadlines.

mod common;

use common::*;
use std::time::{Duration, Instant};

const SERVICE: &str = "hello-robust";
/// The per-try timeout the core derives for the registered hello (hard RTT 1 s × 10).
const TRY_TIMEOUT: Duration = Duration::from_secs(10);

fn get_ok(c: &Cluster, path: &str) -> HttpResponse {
    let r = get(c.proxy_addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", c.logs()));
    assert_eq!(r.status, 200, "GET {path}: {} {}\n{}", r.status, r.text(), c.logs());
    r
}

fn allocator_metric(c: &Cluster, name: &str) -> f64 {
    c.allocators.iter().map(|a| metric_sum(&scrape(a.metrics), name)).sum()
}

/// The pids of `hello` instances the allocators run.
fn hello_pids(c: &Cluster) -> Vec<u32> {
    let hello = bin("hello").display().to_string();
    c.allocators.iter().flat_map(|a| children_of(a.proc.pid())).filter(|p| cmdline(*p).starts_with(&hello)).collect()
}

/// 1,000 concurrent slow requests through one client proxy to one instance: each
/// ends as 200 or as 503 with `Retry-After`; none is dropped or fails otherwise
/// (past yamux's 512 streams the whole connection used to drop).
#[test]
fn a_thousand_concurrent_slow_requests_end_as_200_or_503_with_retry_after() {
    let c = Cluster::start("load", 1);
    c.register_hello(SERVICE);
    get_ok(&c, &format!("/{SERVICE}/hello"));
    let addr = c.proxy_addr;
    let path = format!("/{SERVICE}/sleep/2000");
    let t0 = Instant::now();
    let threads: Vec<_> = (0..1000)
        .map(|_| {
            let path = path.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let start = Instant::now();
                    let r = http(addr, "GET", &path, b"", Duration::from_secs(90));
                    (r, start.elapsed())
                })
                .unwrap()
        })
        .collect();
    let (mut ok, mut shed, mut other) = (Vec::new(), 0, Vec::new());
    for t in threads {
        match t.join().unwrap() {
            (Ok(r), took) if r.status == 200 && r.text() == "slept 2000\n" => ok.push(took),
            (Ok(r), _) if r.status == 503 && r.header("retry-after").is_some() => shed += 1,
            (Ok(r), _) => other.push(format!("{} {}", r.status, r.text())),
            (Err(e), _) => other.push(format!("error: {e}")),
        }
    }
    ok.sort();
    let p99 = ok.get(ok.len().saturating_sub(1) * 99 / 100).copied();
    eprintln!(
        "MEASURED 1000 concurrent /sleep/2000: {} × 200, {shed} × 503 in {:?}; p99 of admitted {p99:?}",
        ok.len(),
        t0.elapsed()
    );
    assert!(
        other.is_empty(),
        "{} requests ended otherwise, e.g. {:?}\n{}",
        other.len(),
        &other[..other.len().min(5)],
        c.logs()
    );
    assert!(ok.len() >= 256, "at least the per-instance stream limit's worth were served: {}", ok.len());
    // The connection survived: the same instance still serves, no new one was needed.
    assert_eq!(get_ok(&c, &format!("/{SERVICE}/hello")).text(), "Hello, world\n");
    assert_eq!(allocator_metric(&c, "physarum_instances_up_total"), 1.0, "{}", c.logs());
}

/// Sends SIGCONT to a stopped process when dropped, so its allocator can stop it.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGCONT);
        }
    }
}

/// The application of the serving instance is stopped (SIGSTOP) while its sidecar
/// lives: GETs keep succeeding on another instance, none waits longer than the
/// per-try timeout plus a new instance's start, and the stopped one is culled.
#[test]
fn a_stopped_application_is_failed_over() {
    let mut c = Cluster::bootstrap("stopped", None);
    c.start_registry();
    c.start_allocator_with(&["--cull-interval", "2"]);
    c.start_allocator_with(&["--cull-interval", "2"]);
    c.start_proxy();
    c.register_hello(SERVICE);
    let first = get_ok(&c, &format!("/{SERVICE}/pid")).text();
    let stopped: u32 = first.trim().parse().unwrap();
    assert_eq!(hello_pids(&c), vec![stopped]);
    unsafe {
        libc::kill(stopped as libc::pid_t, libc::SIGSTOP);
    }
    let _resume = Resume(stopped);
    let limit = TRY_TIMEOUT + START_TIMEOUT;
    let mut worst = Duration::ZERO;
    for i in 0..8 {
        let t0 = Instant::now();
        let r = http(c.proxy_addr, "GET", &format!("/{SERVICE}/pid"), b"", limit + Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("GET {i}: {e}\n{}", c.logs()));
        let took = t0.elapsed();
        worst = worst.max(took);
        assert_eq!(r.status, 200, "GET {i} after the stop: {} {}\n{}", r.status, r.text(), c.logs());
        assert_ne!(r.text(), first, "GET {i} was answered by the stopped application");
        assert!(took < limit, "GET {i} took {took:?}");
    }
    eprintln!("MEASURED with the serving application stopped: the slowest GET took {worst:?}");
    let proxy_log = c.proxy.as_ref().unwrap().proc.log_text();
    assert!(proxy_log.contains("retrying on another instance"), "the proxy logs its failover:\n{proxy_log}");
    // The allocator culls the stopped instance: its sidecar says the application does not answer.
    wait_for("the stopped instance to be culled", Duration::from_secs(20), || {
        (allocator_metric(&c, "physarum_culls_total") >= 1.0).then_some(())
    });
    let logs = c.logs();
    assert!(logs.contains("culled: idle query failed") && logs.contains("does not answer"), "{logs}");
}

/// A request longer than the idle limit completes, and its instance is not culled
/// under it: idle time counts from the end of the last request.
#[test]
fn a_request_longer_than_the_idle_limit_completes() {
    let mut c = Cluster::bootstrap("long", None);
    c.start_registry();
    c.start_allocator_with(&["--idle-limit", "2", "--cull-interval", "1"]);
    c.start_proxy();
    c.register_hello(SERVICE);
    let r = get_ok(&c, &format!("/{SERVICE}/sleep/6000"));
    assert_eq!(r.text(), "slept 6000\n");
    assert_eq!(allocator_metric(&c, "physarum_culls_total"), 0.0, "culled under a request\n{}", c.logs());
    // Idle after the request, it is culled, with its reason in the allocator's log.
    wait_for("the idle instance to be culled", Duration::from_secs(20), || {
        (allocator_metric(&c, "physarum_culls_total") >= 1.0).then_some(())
    });
    let log = c.allocators[0].proc.log_text();
    assert!(log.contains("culled: idle for"), "{log}");
}

/// The `instance-*` directories in `dir`.
fn instance_dirs(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n.starts_with("instance-"));
    v.sort();
    v
}

/// An allocator killed outright (SIGKILL) leaves its instance directories (with
/// their identity keys) behind; restarted, it removes them and no process of theirs
/// is left; it then serves again.
#[test]
fn a_killed_and_restarted_allocator_leaves_no_orphan_process_or_directory() {
    let mut c = Cluster::bootstrap("restart-alloc", None);
    c.start_registry();
    c.start_allocator();
    c.start_proxy();
    c.register_hello(SERVICE);
    let first = get_ok(&c, &format!("/{SERVICE}/pid")).text();
    let dir = c.instance_dir(0);
    assert_eq!(instance_dirs(&dir).len(), 1, "one instance directory");
    let procs = children_of(c.allocators[0].proc.pid());
    assert_eq!(procs.len(), 2, "the application and its sidecar: {procs:?}");
    c.allocators[0].proc.signal(libc::SIGKILL);
    assert!(c.allocators[0].proc.wait_exit(Duration::from_secs(10)).is_some());
    let gone = poll_until(Duration::from_secs(10), || procs.iter().all(|p| !alive(*p)).then_some(()));
    assert!(gone.is_some(), "instances outlived their allocator: {procs:?}");
    assert_eq!(instance_dirs(&dir).len(), 1, "the killed allocator left its instance directory");
    c.restart_allocator(0, &[]);
    assert_eq!(instance_dirs(&dir), Vec::<String>::new(), "{}", c.allocators[0].proc.log_text());
    assert!(c.allocators[0].proc.log_text().contains("Removed 1 instance directories left by an earlier run"));
    // It serves again, from a new instance.
    let again = get_ok(&c, &format!("/{SERVICE}/pid")).text();
    assert_ne!(again, first);
    assert_eq!(instance_dirs(&dir).len(), 1);
}

/// The sidecar's metrics port, from the allocator's log line for the instance.
fn sidecar_metrics(c: &Cluster) -> std::net::SocketAddr {
    let log = c.allocators[0].proc.log_text();
    let at = log.find("metrics port ").unwrap_or_else(|| panic!("no metrics port in the log:\n{log}"));
    let port: String = log[at + "metrics port ".len()..].chars().take_while(|ch| ch.is_ascii_digit()).collect();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// SIGTERM to an allocator lets requests in flight finish before it stops its
/// instances; then nothing of them is left.
#[test]
fn sigterm_drains_requests_in_flight_before_stopping_instances() {
    let mut c = Cluster::start("drain", 1);
    c.register_hello(SERVICE);
    get_ok(&c, &format!("/{SERVICE}/hello"));
    let procs = children_of(c.allocators[0].proc.pid());
    let sidecar = sidecar_metrics(&c);
    let served = || metric_sum(&scrape(sidecar), "physarum_tunnel_served_total");
    let before = served();
    let addr = c.proxy_addr;
    let path = format!("/{SERVICE}/sleep/3000");
    let slow = std::thread::spawn(move || http(addr, "GET", &path, b"", Duration::from_secs(30)));
    wait_for("the sidecar to serve the slow request", Duration::from_secs(10), || (served() > before).then_some(()));
    c.allocators[0].proc.signal(libc::SIGTERM);
    let r = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!((r.status, r.text()), (200, "slept 3000\n".to_string()), "{}", c.logs());
    let status = c.allocators[0].proc.wait_exit(Duration::from_secs(20)).expect("the allocator exits");
    assert!(status.success(), "{status}");
    assert!(procs.iter().all(|p| !alive(*p)), "instance processes left: {procs:?}");
    assert_eq!(instance_dirs(&c.instance_dir(0)), Vec::<String>::new());
}
