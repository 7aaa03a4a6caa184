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
