//! Shared harness of the end-to-end tests: start the real binaries on loopback
//! with dynamic ports, poll readiness against deadlines, stop every process
//! (guards kill on drop), speak plain HTTP/1.1.
#![allow(dead_code)]

pub mod docker;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("physarum-e2e-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("PHYSARUM_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    physarum_net_real::ports::free_port([127, 0, 0, 1].into()).unwrap()
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped on drop.
/// Its stdout and stderr go to `log`.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has exited (and its status).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait for the process to exit on its own within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Send `sig` to the process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Poll `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`wait_for`], but returns `None` at the deadline instead of panicking.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// An HTTP response, body fully read.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Send one request (`Connection: close`) and read the whole response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut sink = Vec::new();
    let (status, headers) = http_stream(addr, method, path, body, timeout, |chunk| sink.extend_from_slice(chunk))?;
    Ok(HttpResponse { status, headers, body: sink })
}

pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    http(addr, "GET", path, b"", Duration::from_secs(30))
}

/// Send one request and hand the (de-chunked) body to `on_data` as it arrives.
pub fn http_stream(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
    mut on_data: impl FnMut(&[u8]),
) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"));
    let length =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse::<u64>().ok());
    const BUF: usize = 64 * 1024;
    let mut buf = vec![0u8; BUF];
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut left = size;
            while left > 0 {
                let n = r.read(&mut buf[..left.min(BUF as u64) as usize])?;
                if n == 0 {
                    return Err(std::io::Error::other("connection closed inside a chunk"));
                }
                on_data(&buf[..n]);
                left -= n as u64;
            }
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(mut left) = length {
        while left > 0 {
            let n = r.read(&mut buf[..left.min(BUF as u64) as usize])?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed before the body ended"));
            }
            on_data(&buf[..n]);
            left -= n as u64;
        }
    } else {
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            on_data(&buf[..n]);
        }
    }
    Ok((status, headers))
}

/// Resident set size of a process in KiB (from /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set size of a process in KiB (from /proc).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Every process whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the command (which may contain spaces) start after ") ".
            if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
                let ppid = rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
                if ppid == Some(pid) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// `pid` and all its descendants, depth first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in children_of(p) {
            all.push(c);
            stack.push(c);
        }
    }
    all
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// The command line of a process.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The binaries under test.
pub fn bin(name: &str) -> PathBuf {
    let p = match name {
        "allocator" => env!("CARGO_BIN_EXE_allocator"),
        "proxy" => env!("CARGO_BIN_EXE_proxy"),
        "registry" => env!("CARGO_BIN_EXE_registry"),
        "bootstrap" => env!("CARGO_BIN_EXE_bootstrap"),
        "hello" => env!("CARGO_BIN_EXE_hello"),
        "physarum" => env!("CARGO_BIN_EXE_physarum"),
        "physarum-netdelay" => env!("CARGO_BIN_EXE_physarum-netdelay"),
        other => panic!("no binary {other}"),
    };
    PathBuf::from(p)
}

/// A command for one of our binaries, hermetic: runs in `cwd`, without the
/// caller's P2P_* environment.
pub fn command(name: &str, cwd: &Path) -> Command {
    let mut c = Command::new(bin(name));
    c.current_dir(cwd).env_remove("P2P_BOOTSTRAPS").env_remove("P2P_PSK").env("PHYSARUM_HOME", cwd.join("home"));
    c
}

/// Whether `GET /metrics` on `addr` answers 200 (daemons open it once they run).
pub fn metrics_up(addr: SocketAddr) -> bool {
    matches!(http(addr, "GET", "/metrics", b"", Duration::from_secs(2)), Ok(r) if r.status == 200)
}

/// The value of the first sample line starting with `prefix` in `text`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Sum of every sample whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

pub fn scrape(addr: SocketAddr) -> String {
    http(addr, "GET", "/metrics", b"", Duration::from_secs(5)).map(|r| r.text()).unwrap_or_default()
}

/// A daemon of the cluster: its process and its metrics address.
pub struct Daemon {
    pub proc: Proc,
    pub metrics: SocketAddr,
}

/// bootstrap + registry + allocators + an anonymous proxy, on loopback.
pub struct Cluster {
    pub dir: TempDir,
    pub conf: PathBuf,
    /// The operator key every daemon trusts (listed in `conf`).
    pub operator_key: PathBuf,
    pub bootstrap_addr: String,
    pub bootstrap: Daemon,
    pub registry: Option<Daemon>,
    pub allocators: Vec<Daemon>,
    pub proxy: Option<Daemon>,
    pub proxy_addr: SocketAddr,
    pub psk: Option<String>,
}

pub const START_TIMEOUT: Duration = Duration::from_secs(40);

impl Cluster {
    /// Start a bootstrap only; add the rest with the methods below.
    pub fn bootstrap(tag: &str, psk: Option<&str>) -> Cluster {
        let dir = TempDir::new(tag);
        let conf = dir.path().join("conf.json");
        let operator_key = dir.path().join("operator.key");
        let operator = physarum::keys::keygen(&operator_key).unwrap().public();
        let text = format!(
            r#"{{"Perf": {{"SoftReq": {{"RTT": 100}}, "HardReq": {{"RTT": 1000}}}}, "Bootstraps": [], "Operators": ["{operator}"]}}"#
        );
        std::fs::write(&conf, text).unwrap();
        let key = dir.path().join("bootstrap.key");
        let peer = physarum_net_real::keyfile::peer_id_string(&physarum_net_real::keyfile::generate_to(&key).unwrap());
        let port = free_port();
        let bootstrap_addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = command("bootstrap", dir.path());
        cmd.arg("--configfile").arg(&conf).arg("--key").arg(&key);
        cmd.arg("--listen").arg(format!("/ip4/127.0.0.1/tcp/{port}")).arg("--metrics").arg(metrics.to_string());
        if let Some(psk) = psk {
            cmd.arg("--psk").arg(psk);
        }
        let proc = Proc::spawn("bootstrap", cmd, dir.path());
        let mut c = Cluster {
            dir,
            conf,
            operator_key,
            bootstrap_addr,
            bootstrap: Daemon { proc, metrics },
            registry: None,
            allocators: Vec::new(),
            proxy: None,
            proxy_addr: "127.0.0.1:1".parse().unwrap(),
            psk: psk.map(str::to_string),
        };
        c.wait_daemon_up("bootstrap");
        c
    }

    /// The full cluster of the issue: bootstrap, registry, `allocators` allocators
    /// and an anonymous proxy.
    pub fn start(tag: &str, allocators: usize) -> Cluster {
        let mut c = Cluster::bootstrap(tag, None);
        c.start_registry();
        for _ in 0..allocators {
            c.start_allocator();
        }
        c.start_proxy();
        c
    }

    fn net_args(&self, cmd: &mut Command, name: &str) {
        cmd.arg("--configfile").arg(&self.conf).arg("--bootstrap").arg(&self.bootstrap_addr);
        cmd.arg("--listen").arg("/ip4/127.0.0.1/tcp/0");
        cmd.arg("--key").arg(self.dir.path().join(format!("{name}.key")));
        if let Some(psk) = &self.psk {
            cmd.arg("--psk").arg(psk);
        }
    }

    fn daemon(&self, name: &str) -> &Daemon {
        match name {
            "bootstrap" => &self.bootstrap,
            "registry" => self.registry.as_ref().unwrap(),
            "proxy" => self.proxy.as_ref().unwrap(),
            n => {
                let i: usize = n.trim_start_matches("allocator").parse().unwrap();
                &self.allocators[i]
            }
        }
    }

    fn daemon_mut(&mut self, name: &str) -> &mut Daemon {
        match name {
            "bootstrap" => &mut self.bootstrap,
            "registry" => self.registry.as_mut().unwrap(),
            "proxy" => self.proxy.as_mut().unwrap(),
            n => {
                let i: usize = n.trim_start_matches("allocator").parse().unwrap();
                &mut self.allocators[i]
            }
        }
    }

    /// Wait until the daemon serves its metrics (it opens them once its node runs);
    /// fail with its log if it exits first.
    pub fn wait_daemon_up(&mut self, name: &str) {
        let metrics = self.daemon(name).metrics;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if metrics_up(metrics) {
                return;
            }
            let d = self.daemon_mut(name);
            if let Some(status) = d.proc.try_exit() {
                panic!("{name} exited with {status} while starting; log:\n{}", d.proc.log_text());
            }
            if Instant::now() >= deadline {
                panic!("{name} did not start within {START_TIMEOUT:?}; log:\n{}", d.proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn start_registry(&mut self) {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = command("registry", self.dir.path());
        self.net_args(&mut cmd, "registry");
        cmd.arg("--data-dir").arg(self.dir.path().join("registry-data")).arg("--metrics").arg(metrics.to_string());
        self.registry = Some(Daemon { proc: Proc::spawn("registry", cmd, self.dir.path()), metrics });
        self.wait_daemon_up("registry");
    }

    pub fn start_allocator(&mut self) {
        self.start_allocator_with(&[]);
    }

    /// Start an allocator with extra flags (`--idle-limit`, `--cull-interval`, `--driver`, …).
    pub fn start_allocator_with(&mut self, extra: &[&str]) {
        let i = self.allocators.len();
        let daemon = self.spawn_allocator(i, extra);
        self.allocators.push(daemon);
        self.wait_daemon_up(&format!("allocator{i}"));
    }

    /// Start allocator `i` again (same key and instance directory) once it has exited.
    pub fn restart_allocator(&mut self, i: usize, extra: &[&str]) {
        let daemon = self.spawn_allocator(i, extra);
        drop(std::mem::replace(&mut self.allocators[i], daemon));
        self.wait_daemon_up(&format!("allocator{i}"));
    }

    /// Allocator `i`'s instance directory.
    pub fn instance_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("allocator{i}-instances"))
    }

    fn spawn_allocator(&self, i: usize, extra: &[&str]) -> Daemon {
        let name = format!("allocator{i}");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = command("allocator", self.dir.path());
        self.net_args(&mut cmd, &name);
        let grant = self.grant(&name);
        cmd.arg("--grant").arg(grant).arg("--exec-root").arg(self.dir.path());
        cmd.arg("--metrics").arg(metrics.to_string());
        cmd.arg("--instance-dir").arg(self.instance_dir(i));
        cmd.args(extra);
        let log_name = if self.allocators.len() > i { format!("{name}-restarted") } else { name.clone() };
        let mut proc = Proc::spawn(&log_name, cmd, self.dir.path());
        proc.name = name;
        Daemon { proc, metrics }
    }

    /// Make the identity of the daemon `name` now and grant it, as an operator would.
    pub fn grant(&self, name: &str) -> PathBuf {
        let key_path = self.dir.path().join(format!("{name}.key"));
        let (key, _) = physarum_net_real::keyfile::load_or_create(&key_path).unwrap();
        let peer = physarum_net_real::keyfile::peer_id_string(&key);
        let grant = physarum::keys::grant(&self.operator_key, &peer).unwrap();
        let path = self.dir.path().join(format!("{name}.grant.json"));
        physarum::keys::write_grant(&grant, &path).unwrap();
        path
    }

    pub fn start_proxy(&mut self) {
        let port = free_port();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = command("proxy", self.dir.path());
        self.net_args(&mut cmd, "proxy");
        cmd.arg("--metrics").arg(metrics.to_string()).arg(port.to_string());
        self.proxy = Some(Daemon { proc: Proc::spawn("proxy", cmd, self.dir.path()), metrics });
        self.proxy_addr = format!("127.0.0.1:{port}").parse().unwrap();
        self.wait_daemon_up("proxy");
        let addr = self.proxy_addr;
        wait_for("the proxy's HTTP port", START_TIMEOUT, || connects(addr).then_some(()));
    }

    /// Run `physarum registry ARGS…` against this cluster; (exit ok, stdout, stderr).
    pub fn registry_cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = command("physarum", self.dir.path());
        cmd.arg("registry").arg("--configfile").arg(&self.conf).arg("--bootstrap").arg(&self.bootstrap_addr);
        if let Some(psk) = &self.psk {
            cmd.arg("--psk").arg(psk);
        }
        cmd.args(args);
        let out = run_bounded(cmd, Duration::from_secs(60));
        (out.0, out.1, out.2)
    }

    /// Register the `hello` binary as `name`. The registered program is a small
    /// script that execs it: allocators hash the registered executable before each
    /// start, and a debug build of `hello` is ~170 MB (the `physarum dev` test
    /// registers a real binary).
    pub fn register_hello(&self, name: &str) {
        self.register_wrapped(name, "hello.sh", &format!("'{}'", bin("hello").display()));
    }

    /// Register, signed by the operator, a service `name` whose program is the script
    /// `wrapper` (in the cluster's directory) that execs `command` with its arguments.
    pub fn register_wrapped(&self, name: &str, wrapper: &str, command: &str) {
        let conf = self.dir.path().join(format!("{name}.json"));
        let wrapper = self.dir.path().join(wrapper);
        std::fs::write(&wrapper, format!("#!/bin/sh\nexec {command} \"$@\"\n")).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let text = format!(
            r#"{{"Name": "{name}", "Exec": {{"Program": {:?}, "Args": []}}, "NetworkSoftReq": 100, "NetworkHardReq": 1000}}"#,
            wrapper.display().to_string()
        );
        std::fs::write(&conf, text).unwrap();
        let key = self.operator_key.display().to_string();
        let (ok, out, err) = self.registry_cli(&["add", conf.to_str().unwrap(), "--operator-key", &key]);
        assert!(ok, "registry add failed:\n{out}\n{err}\n{}", self.logs());
    }

    /// Every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut all: Vec<&Daemon> = vec![&self.bootstrap];
        all.extend(self.registry.iter());
        all.extend(self.allocators.iter());
        all.extend(self.proxy.iter());
        for d in all {
            s.push_str(&format!("===== {} =====\n{}\n", d.proc.name, tail(&d.proc.log_text(), 60)));
        }
        s
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a command to completion within `timeout` (killed after it); (success, stdout, stderr).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    let dir = std::env::temp_dir();
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let out_path = dir.join(format!("physarum-run-{}-{nonce}.out", std::process::id()));
    let err_path = dir.join(format!("physarum-run-{}-{nonce}.err", std::process::id()));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let mut err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    if status.is_none() {
        err.push_str(&format!("\n[killed after {timeout:?}]"));
    }
    (status.is_some_and(|s| s.success()), out, err)
}
