//! The allocation path closed end to end, with the real binaries on loopback:
//! only operators decide what runs, and only instances an allocator (or an
//! operator) certified ever receive a request.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tiny HTTP application on a free port that answers every request with `body`
/// and counts the requests it got, except its own sidecar's liveness checks
/// (`Host: physarum-check`).
struct App {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

fn app(body: &'static str) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    // Read one request head (the tests send no bodies), answer, keep alive.
                    let mut line = String::new();
                    let mut first = true;
                    let mut check = false;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim().is_empty() && !first {
                            break;
                        }
                        check |= line.trim().eq_ignore_ascii_case("host: physarum-check");
                        first = false;
                    }
                    if !check {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    App { addr, requests }
}

/// A sidecar started by hand for `service` in front of `app`; with `operator_key`,
/// certified by that operator.
fn sidecar(c: &Cluster, name: &str, service: &str, app: SocketAddr, operator_key: Option<&std::path::Path>) -> Daemon {
    let metrics_port = free_port();
    let mut cmd = command("proxy", c.dir.path());
    cmd.arg("--configfile").arg(&c.conf).arg("--bootstrap").arg(&c.bootstrap_addr);
    cmd.arg("--listen").arg("/ip4/127.0.0.1/tcp/0");
    if let Some(key) = operator_key {
        cmd.arg("--operator-key").arg(key);
    }
    cmd.arg(free_port().to_string()).arg(service).arg(app.to_string()).arg(metrics_port.to_string());
    let proc = Proc::spawn(name, cmd, c.dir.path());
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    wait_for(&format!("{name} to run"), START_TIMEOUT, || metrics_up(metrics).then_some(()));
    Daemon { proc, metrics }
}

fn untrusted_seen(c: &Cluster) -> f64 {
    metric(&scrape(c.proxy.as_ref().unwrap().metrics), "physarum_untrusted_instances_total").unwrap_or(0.0)
}

/// An impostor sidecar advertising the service's hash never receives a request;
/// an operator-started one does. No allocator runs, so nothing else can serve.
#[test]
fn an_impostor_sidecar_never_receives_a_request_and_an_operator_started_one_does() {
    let mut c = Cluster::bootstrap("impostor", None);
    c.start_registry();
    c.start_proxy();
    c.register_hello("hello-world-server");
    let evil = app("evil");
    let _impostor = sidecar(&c, "impostor", "hello-world-server", evil.addr, None);
    // Until the client has tried (and refused) the impostor, requests fail: there is
    // nothing else to serve them.
    wait_for("the client to try the impostor", Duration::from_secs(30), || {
        let r = get(c.proxy_addr, "/hello-world-server/secret?cookie=1").unwrap();
        assert_ne!(r.status, 200, "served by the impostor: {}", r.text());
        (untrusted_seen(&c) >= 1.0).then_some(())
    });

    // A stranger's key cannot certify a sidecar at all: it refuses to start.
    let stranger = c.dir.path().join("stranger.key");
    physarum::keys::keygen(&stranger).unwrap();
    let mut cmd = command("proxy", c.dir.path());
    cmd.arg("--configfile").arg(&c.conf).arg("--bootstrap").arg(&c.bootstrap_addr);
    cmd.arg("--operator-key").arg(&stranger).args(["0", "hello-world-server", "127.0.0.1:9"]);
    let (ok, _, err) = run_bounded(cmd, Duration::from_secs(30));
    assert!(!ok && err.contains("is not one of the configured operators"), "{err}");

    let good = app("served by the operator's instance");
    let _operator_run = sidecar(&c, "operator-run", "hello-world-server", good.addr, Some(&c.operator_key));
    let served = wait_for("the operator-started sidecar to serve", Duration::from_secs(30), || {
        let r = get(c.proxy_addr, "/hello-world-server/x").unwrap();
        (r.status == 200).then_some(r)
    });
    assert_eq!(served.text(), "served by the operator's instance");
    for i in 0..20 {
        let r = get(c.proxy_addr, &format!("/hello-world-server/{i}")).unwrap();
        assert_eq!((r.status, r.text()), (200, "served by the operator's instance".to_string()), "{}", c.logs());
    }
    assert_eq!(evil.requests.load(Ordering::SeqCst), 0, "the impostor's application was reached");
    assert!(good.requests.load(Ordering::SeqCst) >= 1);
}

/// Only listed operators can register; `/bin/sh` from a stranger is refused and
/// nothing runs; even an operator's `/bin/sh` is refused outside the exec roots.
/// Oversized entries are refused at once. Two services sharing a program both serve.
#[test]
fn only_operators_decide_what_runs() {
    let c = Cluster::start("admission", 1);
    let dir = c.dir.path();
    let pwned = dir.join("PWNED");
    let sh = dir.join("sh.json");
    let cmd = format!("touch {}", pwned.display());
    std::fs::write(&sh, format!(r#"{{"Name": "sh", "Exec": {{"Program": "/bin/sh", "Args": ["-c", {cmd:?}]}}}}"#))
        .unwrap();
    let sh = sh.to_str().unwrap();

    // A fresh identity with a key of its own, made with the CLI.
    let stranger = dir.join("stranger.key");
    let mut keygen = command("physarum", dir);
    keygen.args(["keygen", "--out", stranger.to_str().unwrap()]);
    let (ok, public, err) = run_bounded(keygen, Duration::from_secs(20));
    assert!(ok && public.trim().len() == 64, "{public}\n{err}");
    let mut shown = command("physarum", dir);
    shown.args(["keygen", "--public", stranger.to_str().unwrap()]);
    assert_eq!(run_bounded(shown, Duration::from_secs(20)).1, public);

    let (ok, out, err) = c.registry_cli(&["add", sh, "--operator-key", stranger.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(err.contains("not a configured operator") && err.contains(public.trim()), "{err}");
    let (ok, _, err) = c.registry_cli(&["get", "sh"]);
    assert!(!ok && err.contains("no service named"), "{err}");
    // Nor can the stranger remove what an operator registered.
    c.register_hello("hello-world-server");
    let (ok, _, err) = c.registry_cli(&["rm", "hello-world-server", "--operator-key", stranger.to_str().unwrap()]);
    assert!(!ok && err.contains("not a configured operator"), "{err}");

    // An operator may register /bin/sh, but the allocator runs nothing outside its exec roots.
    let key = c.operator_key.display().to_string();
    let (ok, out, err) = c.registry_cli(&["add", sh, "--operator-key", &key]);
    assert!(ok, "{out}\n{err}");
    let r = get(c.proxy_addr, "/sh/").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("outside this allocator's exec roots"), "{}", r.text());
    assert!(!pwned.exists(), "/bin/sh ran");

    // An entry over the size limit is refused at once, with the limit in the reason.
    let big = dir.join("big.json");
    let wrapper = dir.join("hello.sh");
    let arg = "x".repeat(70 * 1024);
    std::fs::write(
        &big,
        format!(r#"{{"Name": "big", "Exec": {{"Program": {:?}, "Args": [{arg:?}]}}}}"#, wrapper.display().to_string()),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let (ok, _, err) = c.registry_cli(&["add", big.to_str().unwrap(), "--operator-key", &key]);
    assert!(!ok && err.contains("more than the limit of 65536"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20));

    // Two services running the same program with other arguments are two services.
    let second = dir.join("hello-bound.json");
    std::fs::write(
        &second,
        format!(
            r#"{{"Name": "hello-bound", "Exec": {{"Program": {:?}, "Args": ["--bind", "127.0.0.1"]}}}}"#,
            wrapper.display().to_string()
        ),
    )
    .unwrap();
    let (ok, out, err) = c.registry_cli(&["add", second.to_str().unwrap(), "--operator-key", &key]);
    assert!(ok, "{out}\n{err}");
    for service in ["hello-world-server", "hello-bound", "hello-world-server", "hello-bound"] {
        let r = get(c.proxy_addr, &format!("/{service}/")).unwrap();
        assert_eq!((r.status, r.text()), (200, "Hello, world\n".to_string()), "{service}\n{}", c.logs());
    }
    let (ok, out, _) = c.registry_cli(&["get", "hello-bound"]);
    assert!(ok && out.contains("(verified)"), "{out}");
}
