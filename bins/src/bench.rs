//! `physarum bench`: physarum's data plane and control plane measured on loopback,
//! each figure beside its reference from the same run, printed as one Markdown table.
//!
//! - proxy overhead: wrk against the `hello` app directly, through two nginx hops
//!   (Debian's nginx, one worker, upstream keep-alive) and through two physarum
//!   hops (client proxy → encrypted libp2p tunnel → sidecar → app), the three paths
//!   interleaved round by round; req/s, p50, p99, CPU per request per hop (from
//!   /proc/PID/stat), RSS per proxy idle and under load;
//! - cold start: the first request for a service with no instance, process driver
//!   (each run asks for another registered variant of `hello`, so no instance and
//!   no cache entry exists yet); the share the allocator spent starting it;
//! - discovery: an instance runs, a fresh client proxy (empty caches) asks for it,
//!   in clusters of N physarum nodes (the rest are anonymous proxies in the DHT);
//! - failover: steady GETs, the serving instance (app and sidecar) killed;
//! - footprint: RSS of an idle allocator and proxy;
//! - simulation speed of a scenario file.
//!
//! Every daemon is a child process running this executable's subcommand, so the
//! bench measures the build it is part of (run it with `--release`). Ports are
//! picked at run time; every process it starts is stopped at the end, also on
//! failure (children die with it).

use crate::cli::BenchArgs;
use crate::dev::{self, free_port, local, tail, Cluster, HELLO_SERVICE};
use crate::service_config::ServiceConfig;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use physarum_core::trust::SecretKey;
use physarum_net_real::driver::die_with_parent;
use physarum_net_real::keyfile;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// The parts of the bench, in the order they run.
pub const SECTIONS: [&str; 6] = ["footprint", "proxy", "cold", "discovery", "failover", "sim"];

/// One row of the report: a figure, its reference and target.
#[derive(Default)]
struct Row {
    figure: String,
    direct: String,
    reference: String,
    physarum: String,
    ratio: String,
    target: String,
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    raw: String,
}

impl Report {
    fn row(&mut self, figure: impl Into<String>) -> &mut Row {
        self.rows.push(Row { figure: figure.into(), ..Row::default() });
        self.rows.last_mut().expect("just pushed")
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| figure | direct | reference (same run) | physarum | physarum / reference | target |\n");
        out.push_str("|---|---:|---:|---:|---:|---|\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.figure, r.direct, r.reference, r.physarum, r.ratio, r.target
            );
        }
        out
    }
}

/// A process started for the bench that is not a physarum daemon (nginx, wrk):
/// its own process group, stopped with it on drop.
struct Group {
    child: Child,
}

impl Group {
    fn spawn(mut cmd: Command, log: &Path) -> Result<Group> {
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).kill_on_drop(true).process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {:?}", cmd.as_std().get_program()))?;
        Ok(Group { child })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling the process group we created for our own child.
            unsafe {
                libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

// ------------------------------------------------------------------ /proc

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/PID/stat after the command name (state is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds of `pid` (all its threads).
fn cpu_secs(pid: u32) -> f64 {
    let Some(f) = stat_fields(pid) else { return 0.0 };
    let ticks: f64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks_per_sec()
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_secs(p)).sum()
}

/// VmRSS of `pid` with the part of it that is its own (RssAnon: heap, stacks), the
/// rest being pages of the executable and libraries shared through the page cache.
fn rss_with_private(pid: u32) -> String {
    let f = status_mib(pid, &["VmRSS:", "RssAnon:"]);
    format!("{} ({} private)", fmt_num(f[0], 1), fmt_num(f[1], 1))
}

/// Fields of /proc/`pid`/status given in kB, in MiB.
fn status_mib(pid: u32, names: &[&str]) -> Vec<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    names.iter().map(|n| field(n)).collect()
}

fn rss_sum(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| status_mib(p, &["VmRSS:"])[0]).sum()
}

/// `pid` and its children (an nginx master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ------------------------------------------------------------------ figures

/// What the failover section reports, from its GETs: (seconds since the start,
/// latency in seconds or `None` for a failure), and when the instance was killed.
#[derive(Debug, PartialEq)]
struct FailoverFigures {
    /// The normal latency: the larger of the pre-kill p99 and twice its median.
    normal: f64,
    /// GETs after the kill, and how many of them failed.
    after: usize,
    failed: usize,
    /// Seconds from the kill until latency was normal again (NaN: not in the window).
    recovered: f64,
    /// The GETs after the kill that failed or were slower than normal (seconds after the kill).
    bad: Vec<(f64, Option<f64>)>,
}

impl FailoverFigures {
    fn of(samples: &[(f64, Option<f64>)], killed: f64) -> Self {
        let base: Vec<f64> = samples.iter().filter(|(t, _)| *t < killed).filter_map(|(_, l)| *l).collect();
        let normal = quantile(&base, 0.99).max(2.0 * median(&base));
        let after: Vec<&(f64, Option<f64>)> = samples.iter().filter(|(t, _)| *t >= killed).collect();
        let bad_get = |l: &Option<f64>| l.is_none_or(|l| l > normal);
        // Back to normal: from the first normal GET after which every GET succeeded
        // and no larger share of them (rounded up to whole GETs) was slow than before
        // the kill. (About 1 % of the GETs before the kill were above its p99 by
        // definition, so "none slower than normal" would count the machine's usual
        // noise as not recovered.)
        let slow_share_before = base.iter().filter(|&&l| l > normal).count() as f64 / base.len().max(1) as f64;
        let normal_from = (0..after.len()).find(|&i| {
            let rest = &after[i..];
            let slow = rest.iter().filter(|(_, l)| bad_get(l)).count() as f64;
            !bad_get(&rest[0].1)
                && rest.iter().all(|(_, l)| l.is_some())
                && slow <= (slow_share_before * rest.len() as f64).ceil()
        });
        FailoverFigures {
            normal,
            after: after.len(),
            failed: after.iter().filter(|(_, l)| l.is_none()).count(),
            recovered: normal_from.map_or(f64::NAN, |i| after[i].0 - killed),
            bad: after.iter().filter(|(_, l)| bad_get(l)).map(|(t, l)| (t - killed, *l)).collect(),
        }
    }
}

/// The `q`-quantile (0..=1) of `v` (nearest rank), or NaN when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

fn fmt_num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// `a / b` as `0.43×`.
fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

fn ms(d: f64) -> String {
    fmt_num(d * 1000.0, 1) + " ms"
}

// ------------------------------------------------------------------ tools

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// nginx and wrk, installed with apt-get (Debian's nginx-light) when missing.
pub fn ensure_tools() -> Result<(PathBuf, PathBuf)> {
    if let (Some(n), Some(w)) = (find_tool("nginx"), find_tool("wrk")) {
        return Ok((n, w));
    }
    let mut missing = Vec::new();
    if find_tool("nginx").is_none() {
        missing.push("nginx-light");
    }
    if find_tool("wrk").is_none() {
        missing.push("wrk");
    }
    if find_tool("apt-get").is_none() {
        bail!("{} missing and no apt-get to install them", missing.join(" and "));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let apt = |args: &[&str]| -> bool {
        let mut cmd = match root {
            true => std::process::Command::new("apt-get"),
            false => {
                let mut c = std::process::Command::new("sudo");
                c.args(["-n", "apt-get"]);
                c
            }
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    };
    eprintln!("bench: installing {} with apt-get", missing.join(" "));
    let had_system_nginx = Path::new("/run/nginx.pid").exists();
    let mut install: Vec<&str> = vec!["install", "-y", "-q"];
    install.extend(&missing);
    if !apt(&install) {
        let _ = apt(&["update", "-q"]);
        if !apt(&install) {
            // Some releases have only the plain nginx package.
            for p in install.iter_mut().filter(|p| **p == "nginx-light") {
                *p = "nginx";
            }
            if !apt(&install) {
                bail!("apt-get install {} failed", missing.join(" "));
            }
        }
    }
    // Outside containers the package starts a system nginx on port 80: not ours.
    if !had_system_nginx {
        if let Ok(pid) = std::fs::read_to_string("/run/nginx.pid") {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: a plain signal to the nginx the package just started.
                unsafe {
                    libc::kill(pid, libc::SIGQUIT);
                }
            }
        }
    }
    match (find_tool("nginx"), find_tool("wrk")) {
        (Some(n), Some(w)) => Ok((n, w)),
        _ => bail!("nginx or wrk still missing after apt-get install"),
    }
}

// ------------------------------------------------------------------ wrk

#[derive(Clone, Debug)]
struct WrkResult {
    round: usize,
    path: &'static str,
    conns: u32,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: f64,
    errors: f64,
    /// CPU seconds per request of the path's proxies (both hops together).
    cpu_proxies_us: f64,
    /// CPU seconds per request of the app.
    cpu_app_us: f64,
    /// RSS of each hop halfway through the run, MiB.
    rss_hops: Vec<f64>,
}

/// "62.00us", "1.20ms", "1.01s" → µs.
fn wrk_time_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// (req/s, p50 µs, p99 µs, requests, errors) from wrk's `--latency` output.
fn parse_wrk(out: &str) -> Option<(f64, f64, f64, f64, f64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0.0;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v, ..] => rps = v.parse().ok(),
            ["50%", v, ..] => p50 = wrk_time_us(v),
            ["99%", v, ..] => p99 = wrk_time_us(v),
            [n, "requests", "in", ..] => requests = n.parse().ok(),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<f64>().unwrap_or(0.0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<f64>().ok()).sum::<f64>()
            }
            _ => {}
        }
    }
    Some((rps?, p50?, p99?, requests?, errors))
}

// ------------------------------------------------------------------ the bench

struct Bench {
    args: BenchArgs,
    cluster: Cluster,
    nginx_bin: PathBuf,
    wrk_bin: PathBuf,
    operator: SecretKey,
    operator_path: PathBuf,
    common: Vec<String>,
    boot_addr: String,
    http: HttpClient,
    hello_port: u16,
    sidecar_port: u16,
    nginx: Vec<Group>,
    nginx_front_port: u16,
    client_port: u16,
    /// Physarum daemons in the P2P network now (the bootstrap included).
    p2p_nodes: usize,
    next_name: usize,
    allocator_metrics: Option<SocketAddr>,
    report: Report,
}

/// Run the whole bench and print its table (also to `--out`).
pub async fn run(args: BenchArgs) -> Result<()> {
    let sections: Vec<String> = match &args.only {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => SECTIONS.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = sections.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        bail!("unknown section {bad:?} in --only (sections: {})", SECTIONS.join(", "));
    }
    if cfg!(debug_assertions) {
        eprintln!("bench: warning: this is a debug build; measure with `cargo run --release -p physarum -- bench`");
    }
    let (nginx_bin, wrk_bin) = ensure_tools().context("the bench needs nginx and wrk")?;
    let exe = match &args.daemons {
        Some(exe) => std::fs::canonicalize(exe).with_context(|| format!("no executable at {}", exe.display()))?,
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    let root = std::env::temp_dir().join(format!("physarum-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("logs")).with_context(|| format!("cannot create {}", root.display()))?;
    let conf = root.join("conf.json");
    std::fs::write(
        &conf,
        "{\"Perf\": {\"SoftReq\": {\"RTT\": 100}, \"HardReq\": {\"RTT\": 1000}}, \"Bootstraps\": []}\n",
    )?;
    let operator_path = root.join("operator.key");
    let operator = crate::keys::keygen(&operator_path)?;
    let mut common =
        vec!["--configfile".into(), conf.display().to_string(), "--operator".into(), operator.public().to_string()];
    if let Some(port) = &args.tunnel_port {
        common.extend(["--tunnel-port".into(), port.clone()]);
    }
    let load_before = load_average();
    let started = Instant::now();
    let mut bench = Bench {
        cluster: Cluster::new(root.clone(), exe, conf),
        nginx_bin,
        wrk_bin,
        operator,
        operator_path,
        common,
        boot_addr: String::new(),
        http: Client::builder(TokioExecutor::new()).build_http(),
        hello_port: 0,
        sidecar_port: 0,
        nginx: Vec::new(),
        nginx_front_port: 0,
        client_port: 0,
        p2p_nodes: 0,
        next_name: 0,
        allocator_metrics: None,
        report: Report { rows: Vec::new(), notes: Vec::new(), raw: String::new() },
        args,
    };
    let result = bench.run_sections(&sections).await;
    bench.nginx.clear();
    bench.cluster.stop().await;
    let keep = result.is_err() || bench.args.keep;
    match keep {
        true => eprintln!("bench: logs kept in {}", root.join("logs").display()),
        false => {
            let _ = std::fs::remove_dir_all(&root);
        }
    }
    result?;
    let text = bench.render(&load_before, started.elapsed());
    print!("{text}");
    if let Some(out) = &bench.args.out {
        std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

impl Bench {
    async fn run_sections(&mut self, sections: &[String]) -> Result<()> {
        let has = |s: &str| sections.iter().any(|x| x == s);
        let needs_cluster = sections.iter().any(|s| s != "sim");
        if needs_cluster {
            self.seed()?;
            self.start_base().await?;
        }
        if has("footprint") || has("proxy") {
            self.start_nginx().await?;
        }
        if has("footprint") {
            self.footprint().await?;
        }
        if has("proxy") {
            self.proxy().await?;
        }
        if has("cold") {
            self.cold().await?;
        }
        if has("discovery") {
            self.discovery().await?;
        }
        if has("failover") {
            self.failover().await?;
        }
        if has("sim") {
            self.sim().await?;
        }
        Ok(())
    }

    fn name(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}-{}", self.next_name)
    }

    /// The registry's contents: hello, and one variant of it per cold-start run
    /// (another hash each, so every run finds no instance).
    fn seed(&self) -> Result<()> {
        let mut configs = vec![dev::hello_config(&self.cluster.exe, None)];
        for i in 1..=self.args.cold_runs {
            configs.push(cold_variant(&self.cluster.exe, i));
        }
        dev::seed_registry(&self.cluster.root.join("registry-data"), &configs, &self.operator)
    }

    /// Options for a daemon that joins through the bootstrap.
    fn joined(&self, key: Option<&str>) -> Vec<String> {
        let mut a = self.common.clone();
        a.extend(["--bootstrap".into(), self.boot_addr.clone(), "--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
        if let Some(name) = key {
            a.extend(["--key".into(), self.cluster.root.join(format!("{name}.key")).display().to_string()]);
        }
        a
    }

    /// Bootstrap, registry, hello and its sidecar, a client proxy.
    async fn start_base(&mut self) -> Result<()> {
        let boot_key = self.cluster.root.join("bootstrap.key");
        let boot_peer = keyfile::peer_id_string(&keyfile::generate_to(&boot_key)?);
        let boot_port = free_port()?;
        self.boot_addr = format!("/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_peer}");
        let m = local(free_port()?);
        let mut a = self.common.clone();
        a.extend([
            "--key".into(),
            boot_key.display().to_string(),
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{boot_port}"),
            "--metrics".into(),
            m.to_string(),
        ]);
        self.cluster.spawn("bootstrap", "bootstrap", &a, m)?;
        self.cluster.wait_up(&["bootstrap".into()]).await?;

        let m = local(free_port()?);
        let mut a = self.joined(Some("registry"));
        let data = self.cluster.root.join("registry-data").display().to_string();
        a.extend(["--data-dir".into(), data, "--metrics".into(), m.to_string()]);
        self.cluster.spawn("registry", "registry-service", &a, m)?;
        self.cluster.wait_up(&["registry".into()]).await?;
        self.p2p_nodes = 2;

        (self.hello_port, self.sidecar_port) = self.start_instance("hello", "sidecar").await?;
        self.client_port = self.start_client("client").await?;
        // Discovery is done once a request goes through.
        self.get_ok(self.client_port, &format!("/{HELLO_SERVICE}/"), Duration::from_secs(60)).await?;
        Ok(())
    }

    /// A `hello` app and a sidecar (service mode, certified by the operator) in
    /// front of it; their HTTP ports.
    async fn start_instance(&mut self, app: &str, sidecar: &str) -> Result<(u16, u16)> {
        let hello_port = free_port()?;
        let a = vec!["--bind".into(), "127.0.0.1".into(), "--port".into(), hello_port.to_string()];
        self.cluster.spawn(app, "hello", &a, local(hello_port))?;
        self.cluster.wait_up(&[app.into()]).await?;
        let port = free_port()?;
        let mport = free_port()?;
        let mut a = self.joined(None);
        a.extend([
            "--operator-key".into(),
            self.operator_path.display().to_string(),
            port.to_string(),
            HELLO_SERVICE.into(),
            format!("127.0.0.1:{hello_port}"),
            mport.to_string(),
        ]);
        self.cluster.spawn(sidecar, "proxy", &a, local(mport))?;
        self.cluster.wait_up(&[sidecar.into()]).await?;
        self.p2p_nodes += 1;
        Ok((hello_port, port))
    }

    /// An anonymous proxy with a fresh identity (empty caches); its HTTP port, once
    /// it has joined the network and listens.
    async fn start_client(&mut self, name: &str) -> Result<u16> {
        let port = free_port()?;
        let m = local(free_port()?);
        let mut a = self.joined(None);
        a.extend(["--metrics".into(), m.to_string(), port.to_string()]);
        self.cluster.spawn(name, "proxy", &a, m)?;
        self.cluster.wait_up(&[name.into()]).await?;
        self.p2p_nodes += 1;
        Ok(port)
    }

    async fn stop_node(&mut self, name: &str) {
        self.cluster.stop_one(name).await;
        self.p2p_nodes -= 1;
    }

    /// GET `path` on 127.0.0.1:`port`: (status, body, time to the whole response).
    async fn get(&self, port: u16, path: &str, timeout: Duration) -> Result<(u16, String, Duration)> {
        let uri: hyper::Uri = format!("http://127.0.0.1:{port}{path}").parse()?;
        let t0 = Instant::now();
        let fut = async {
            let resp = self.http.get(uri).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        let (status, body) = tokio::time::timeout(timeout, fut).await.context("timed out")??;
        Ok((status, body, t0.elapsed()))
    }

    async fn get_ok(&self, port: u16, path: &str, timeout: Duration) -> Result<Duration> {
        match self.get(port, path, timeout).await {
            Ok((200, _, took)) => Ok(took),
            Ok((status, body, _)) => bail!("GET :{port}{path} answered {status}: {}", body.trim()),
            Err(e) => bail!("GET :{port}{path} failed: {e:#}"),
        }
    }

    // ---------------------------------------------------------------- nginx

    async fn start_nginx(&mut self) -> Result<()> {
        let back = free_port()?;
        let front = free_port()?;
        self.nginx_hop("nginx-back", back, self.hello_port, "/", "").await?;
        self.nginx_hop("nginx-front", front, back, &format!("/{HELLO_SERVICE}/"), "/").await?;
        self.nginx_front_port = front;
        self.get_ok(front, &format!("/{HELLO_SERVICE}/"), Duration::from_secs(10)).await?;
        Ok(())
    }

    async fn nginx_hop(&mut self, name: &str, port: u16, upstream: u16, location: &str, pass: &str) -> Result<()> {
        let prefix = self.cluster.root.join(name);
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let conf = NGINX_HOP
            .replace("@PREFIX@", &prefix.display().to_string())
            .replace("@PORT@", &port.to_string())
            .replace("@UPSTREAM_PORT@", &upstream.to_string())
            .replace("@LOCATION@", location)
            .replace("@PASS_PATH@", pass);
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(&self.nginx_bin);
        cmd.arg("-p").arg(&prefix).arg("-e").arg(prefix.join("error.log")).arg("-c").arg(&conf_path);
        let log = self.cluster.logs.join(format!("{name}.log"));
        self.nginx.push(Group::spawn(cmd, &log)?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(local(port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("{name} not listening on {port}; its log:\n{}", tail(&log, 10));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn nginx_pids(&self) -> Vec<Vec<u32>> {
        self.nginx.iter().map(|g| with_children(g.pid())).collect()
    }

    // ---------------------------------------------------------------- sections

    async fn footprint(&mut self) -> Result<()> {
        // Let start-up allocations settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let client = rss_with_private(self.cluster.pid("client").unwrap_or(0));
        let sidecar = rss_with_private(self.cluster.pid("sidecar").unwrap_or(0));
        let nginx: Vec<f64> = self.nginx_pids().iter().map(|p| rss_sum(p)).collect();
        let r = self.report.row("RSS idle, client proxy / front hop, MiB");
        r.reference = fmt_num(nginx.get(1).copied().unwrap_or(f64::NAN), 1) + " (nginx)";
        r.physarum = client;
        r.target = "≤ 10 MB".into();
        let r = self.report.row("RSS idle, sidecar / back hop, MiB");
        r.reference = fmt_num(nginx.first().copied().unwrap_or(f64::NAN), 1) + " (nginx)";
        r.physarum = sidecar;
        r.target = "≤ 10 MB".into();
        Ok(())
    }

    async fn wrk(
        &self,
        round: usize,
        path: &'static str,
        conns: u32,
        url: &str,
        hops: &[Vec<u32>],
    ) -> Result<WrkResult> {
        let app = self.cluster.pid("hello").unwrap_or(0);
        let proxies: Vec<u32> = hops.iter().flatten().copied().collect();
        let (p0, a0) = (cpu_of(&proxies), cpu_secs(app));
        let secs = self.args.duration.max(1);
        let out = Command::new(&self.wrk_bin)
            .args(["--latency", "-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "10s", url])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let sample = async {
            tokio::time::sleep(Duration::from_millis(secs * 500)).await;
            hops.iter().map(|h| rss_sum(h)).collect::<Vec<f64>>()
        };
        let (out, rss_hops) = tokio::join!(out, sample);
        let out = out.context("cannot run wrk")?;
        let (p1, a1) = (cpu_of(&proxies), cpu_secs(app));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some((rps, p50, p99, requests, errors)) = parse_wrk(&text) else {
            bail!("cannot read wrk's output: {text}{}", String::from_utf8_lossy(&out.stderr));
        };
        let per = |cpu: f64| if requests > 0.0 { cpu / requests * 1e6 } else { f64::NAN };
        Ok(WrkResult {
            round,
            path,
            conns,
            rps,
            p50_us: p50,
            p99_us: p99,
            requests,
            errors,
            cpu_proxies_us: per(p1 - p0),
            cpu_app_us: per(a1 - a0),
            rss_hops,
        })
    }

    async fn proxy(&mut self) -> Result<()> {
        let direct = format!("http://127.0.0.1:{}/", self.hello_port);
        let nginx = format!("http://127.0.0.1:{}/{HELLO_SERVICE}/", self.nginx_front_port);
        let phys = format!("http://127.0.0.1:{}/{HELLO_SERVICE}/", self.client_port);
        let nginx_hops = self.nginx_pids();
        let phys_hops =
            vec![vec![self.cluster.pid("client").unwrap_or(0)], vec![self.cluster.pid("sidecar").unwrap_or(0)]];
        let paths: [(&'static str, &str, &[Vec<u32>]); 3] =
            [("direct", &direct, &[]), ("nginx", &nginx, &nginx_hops), ("physarum", &phys, &phys_hops)];
        let conns = [1u32, 32];
        eprintln!(
            "bench: proxy overhead, {} rounds of {} s per path and concurrency",
            self.args.rounds, self.args.duration
        );
        // Warm-up: every path once at each concurrency.
        for (_, url, _) in &paths {
            for c in conns {
                let _ = Command::new(&self.wrk_bin)
                    .args(["-t1", &format!("-c{c}"), "-d1s", url])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await;
            }
        }
        let mut runs = Vec::new();
        let mut loads = Vec::new();
        for round in 1..=self.args.rounds as usize {
            loads.push(format!("round {round}: {}", load_average()));
            for c in conns {
                for (path, url, hops) in &paths {
                    let r = self.wrk(round, path, c, url, hops).await?;
                    eprintln!(
                        "bench: round {round} {path} c{c}: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, proxies {:.1} µs CPU/request, errors {}",
                        r.rps, r.p50_us, r.p99_us, r.cpu_proxies_us, r.errors
                    );
                    runs.push(r);
                }
            }
        }
        self.report.notes.push(format!("load average at the start of each proxy round: {}", loads.join("; ")));
        let med = |path: &str, c: u32, f: fn(&WrkResult) -> f64| {
            median(&runs.iter().filter(|r| r.path == path && r.conns == c).map(f).collect::<Vec<_>>())
        };
        for c in conns {
            let (d, n, p) = (med("direct", c, |r| r.rps), med("nginx", c, |r| r.rps), med("physarum", c, |r| r.rps));
            let row = self.report.row(format!("c{c} requests/s (2 hops)"));
            row.direct = fmt_num(d, 0);
            row.reference = fmt_num(n, 0);
            row.physarum = fmt_num(p, 0);
            row.ratio = ratio(p, n);
            row.target = "≥ 1.00× nginx".into();
            for (label, f) in [("p50", (|r: &WrkResult| r.p50_us) as fn(&WrkResult) -> f64), ("p99", |r| r.p99_us)] {
                let (d, n, p) = (med("direct", c, f), med("nginx", c, f), med("physarum", c, f));
                let row = self.report.row(format!("c{c} {label} µs (2 hops)"));
                row.direct = fmt_num(d, 0);
                row.reference = fmt_num(n, 0);
                row.physarum = fmt_num(p, 0);
                row.ratio = ratio(p, n);
                row.target = if c == 32 && label == "p99" { "≤ 1.00× nginx".into() } else { String::new() };
                let (an, ap) = ((n - d) / 2.0, (p - d) / 2.0);
                let row = self.report.row(format!("c{c} {label} added per hop, µs"));
                row.reference = fmt_num(an, 0);
                row.physarum = fmt_num(ap, 0);
                row.ratio = ratio(ap, an);
                row.target = "≤ 1.00× nginx".into();
            }
            let (n, p) = (med("nginx", c, |r| r.cpu_proxies_us / 2.0), med("physarum", c, |r| r.cpu_proxies_us / 2.0));
            let row = self.report.row(format!("c{c} CPU µs per request per hop"));
            row.reference = fmt_num(n, 1);
            row.physarum = fmt_num(p, 1);
            row.ratio = ratio(p, n);
            row.target = "≤ 1.00× nginx".into();
            let (d, n, p) = (
                med("direct", c, |r| r.cpu_app_us),
                med("nginx", c, |r| r.cpu_app_us),
                med("physarum", c, |r| r.cpu_app_us),
            );
            let row = self.report.row(format!("c{c} CPU µs per request of the app behind"));
            row.direct = fmt_num(d, 1);
            row.reference = fmt_num(n, 1);
            row.physarum = fmt_num(p, 1);
            row.ratio = ratio(p, n);
        }
        let errors = |path: &str| runs.iter().filter(|r| r.path == path).map(|r| r.errors).sum::<f64>();
        let row = self.report.row("errors (non-2xx + socket), all runs");
        row.direct = fmt_num(errors("direct"), 0);
        row.reference = fmt_num(errors("nginx"), 0);
        row.physarum = fmt_num(errors("physarum"), 0);
        row.target = "0".into();
        let rss = |path: &str, hop: usize| {
            median(
                &runs
                    .iter()
                    .filter(|r| r.path == path && r.conns == 32)
                    .filter_map(|r| r.rss_hops.get(hop).copied())
                    .collect::<Vec<_>>(),
            )
        };
        let row = self.report.row("RSS under load (c32), front / back hop, MiB");
        row.reference = format!("{} / {}", fmt_num(rss("nginx", 0), 1), fmt_num(rss("nginx", 1), 1));
        row.physarum = format!("{} / {}", fmt_num(rss("physarum", 0), 1), fmt_num(rss("physarum", 1), 1));
        let _ = writeln!(
            self.report.raw,
            "round\tpath\tconns\treq/s\tp50_us\tp99_us\trequests\terrors\tcpu_us_per_req_proxies\tcpu_us_per_req_app"
        );
        for r in &runs {
            let _ = writeln!(
                self.report.raw,
                "{}\t{}\t{}\t{:.0}\t{:.0}\t{:.0}\t{:.0}\t{:.0}\t{:.1}\t{:.1}",
                r.round,
                r.path,
                r.conns,
                r.rps,
                r.p50_us,
                r.p99_us,
                r.requests,
                r.errors,
                r.cpu_proxies_us,
                r.cpu_app_us
            );
        }
        Ok(())
    }

    /// Read one sample (`name` with no labels, or `name{labels}`) from a metrics endpoint.
    async fn metric(&self, addr: SocketAddr, name: &str) -> Option<f64> {
        let (_, text, _) = self.get(addr.port(), "/metrics", Duration::from_secs(2)).await.ok()?;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    async fn start_allocator(&mut self) -> Result<SocketAddr> {
        if let Some(m) = self.allocator_metrics {
            return Ok(m);
        }
        let name = "allocator";
        let key = keyfile::generate_to(&self.cluster.root.join(format!("{name}.key")))?;
        let grant_path = self.cluster.root.join(format!("{name}.grant.json"));
        crate::keys::write_grant(
            &crate::keys::grant(&self.operator_path, &keyfile::peer_id_string(&key))?,
            &grant_path,
        )?;
        let m = local(free_port()?);
        let exec_root = self.cluster.exe.parent().context("this executable has no directory")?.display().to_string();
        let mut a = self.joined(Some(name));
        a.extend([
            "--metrics".into(),
            m.to_string(),
            "--instance-dir".into(),
            self.cluster.root.join("instances").display().to_string(),
            "--grant".into(),
            grant_path.display().to_string(),
            "--exec-root".into(),
            exec_root,
            // Instances of earlier runs go soon, so runs do not pile up.
            "--idle-limit".into(),
            "1".into(),
            "--cull-interval".into(),
            "1".into(),
            "--max-instances".into(),
            "32".into(),
        ]);
        self.cluster.spawn(name, "allocator", &a, m)?;
        self.cluster.wait_up(&[name.into()]).await?;
        self.p2p_nodes += 1;
        self.allocator_metrics = Some(m);
        Ok(m)
    }

    async fn cold(&mut self) -> Result<()> {
        let alloc = self.start_allocator().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = self.report.row("RSS idle, allocator, MiB");
        r.physarum = rss_with_private(self.cluster.pid("allocator").unwrap_or(0));
        r.target = "≤ 10 MB".into();
        eprintln!("bench: cold start, {} runs", self.args.cold_runs);
        let mut totals = Vec::new();
        let mut starts = Vec::new();
        for i in 1..=self.args.cold_runs {
            // Let the allocator cull the instances of earlier runs, so few run at once.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.metric(alloc, "physarum_instances_running").await.unwrap_or(0.0) >= 4.0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let s0 = self.metric(alloc, "physarum_instance_start_latency_seconds_sum").await.unwrap_or(0.0);
            let took = self.get_ok(self.client_port, &format!("/{}/", cold_name(i)), Duration::from_secs(30)).await?;
            let s1 = self.metric(alloc, "physarum_instance_start_latency_seconds_sum").await.unwrap_or(0.0);
            totals.push(took.as_secs_f64());
            starts.push(s1 - s0);
        }
        let shares: Vec<f64> = totals.iter().zip(&starts).map(|(t, s)| s / t).collect();
        for (q, label, target) in [(0.5, "p50", "≤ 100 ms"), (0.9, "p90", ""), (0.99, "p99", "≤ 300 ms")] {
            let r = self.report.row(format!("cold start {label} ({} runs, process driver)", totals.len()));
            r.physarum = ms(quantile(&totals, q));
            r.reference = ms(quantile(&starts, q)) + " starting the instance";
            r.target = target.into();
        }
        let r = self.report.row("cold start: share spent starting the instance (median)");
        r.physarum = fmt_num(median(&shares) * 100.0, 0) + " %";
        let _ = writeln!(
            self.report.raw,
            "cold start, ms (total/starting): {}",
            totals
                .iter()
                .zip(&starts)
                .map(|(t, s)| format!("{:.1}/{:.1}", t * 1e3, s * 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(())
    }

    async fn discovery(&mut self) -> Result<()> {
        let mut sizes: Vec<usize> = self
            .args
            .discovery
            .split(',')
            .map(|s| s.trim().parse::<usize>().with_context(|| format!("bad cluster size {s:?} in --discovery")))
            .collect::<Result<_>>()?;
        sizes.sort_unstable();
        for size in sizes {
            // The measured client is one of the `size` nodes.
            let mut fillers = Vec::new();
            while self.p2p_nodes + 1 < size {
                let name = self.name("filler");
                let port = free_port()?;
                let m = local(free_port()?);
                let mut a = self.joined(None);
                a.extend(["--metrics".into(), m.to_string(), port.to_string()]);
                self.cluster.spawn(&name, "proxy", &a, m)?;
                self.p2p_nodes += 1;
                fillers.push(name);
            }
            self.cluster.wait_up(&fillers).await?;
            self.settle().await;
            if self.p2p_nodes + 1 > size {
                self.report.notes.push(format!(
                    "discovery at {size} nodes ran with {} nodes (the other sections' daemons)",
                    self.p2p_nodes + 1
                ));
            }
            let mut times = Vec::new();
            for _ in 0..self.args.discovery_samples {
                let name = self.name("fresh-client");
                let port = self.start_client(&name).await?;
                let took = self.get_ok(port, &format!("/{HELLO_SERVICE}/"), Duration::from_secs(30)).await?;
                times.push(took.as_secs_f64());
                self.stop_node(&name).await;
            }
            eprintln!("bench: discovery at {size} nodes: median {:.1} ms", median(&times) * 1e3);
            let target = if size >= 50 { "p50 ≤ 10 ms, p99 ≤ 50 ms at 50 nodes" } else { "" };
            let r = self.report.row(format!("discovery, {size} nodes, empty caches: p50 / p99 ({} runs)", times.len()));
            r.physarum = format!("{} / {}", ms(quantile(&times, 0.5)), ms(quantile(&times, 0.99)));
            r.target = target.into();
            let _ = writeln!(
                self.report.raw,
                "discovery at {size} nodes, ms: {}",
                times.iter().map(|t| format!("{:.1}", t * 1e3)).collect::<Vec<_>>().join(" ")
            );
        }
        Ok(())
    }

    /// Wait until the cluster is quiet: nodes that just joined fill their routing
    /// tables and dial each other for a while, and a lookup then measures that storm,
    /// not discovery in an N-node cluster. Quiet: all daemons together use less than a
    /// tenth of a core over half a second (at most 30 s).
    async fn settle(&self) {
        let pids = self.cluster.pids();
        let deadline = Instant::now() + Duration::from_secs(30);
        let waited = Instant::now();
        let window = Duration::from_millis(500);
        loop {
            let before = cpu_of(&pids);
            tokio::time::sleep(window).await;
            let busy = (cpu_of(&pids) - before) / window.as_secs_f64();
            if busy < 0.1 || Instant::now() >= deadline {
                eprintln!(
                    "bench: cluster settled after {:.1} s ({:.2} cores busy)",
                    waited.elapsed().as_secs_f64(),
                    busy
                );
                return;
            }
        }
    }

    async fn failover(&mut self) -> Result<()> {
        let (_, _) = self.start_instance("hello-b", "sidecar-b").await?;
        let name = self.name("failover-client");
        let port = self.start_client(&name).await?;
        self.get_ok(port, &format!("/{HELLO_SERVICE}/"), Duration::from_secs(30)).await?;
        // Which instance serves this client: hello tells its pid.
        let (_, pid, _) = self.get(port, &format!("/{HELLO_SERVICE}/pid"), Duration::from_secs(5)).await?;
        let pid: u32 = pid.trim().parse().context("hello's /pid")?;
        let (app, sidecar) = match self.cluster.pid("hello") == Some(pid) {
            true => ("hello", "sidecar"),
            false => ("hello-b", "sidecar-b"),
        };
        let interval = Duration::from_millis(10);
        let before = Duration::from_secs(2);
        let after = Duration::from_secs(self.args.duration.clamp(2, 10));
        let t0 = Instant::now();
        let mut samples: Vec<(f64, Option<f64>)> = Vec::new();
        let mut killed_at = None;
        while t0.elapsed() < before + after {
            if killed_at.is_none() && t0.elapsed() >= before {
                self.cluster.kill_one(sidecar).await;
                self.cluster.kill_one(app).await;
                self.p2p_nodes -= 1;
                killed_at = Some(t0.elapsed().as_secs_f64());
            }
            let at = t0.elapsed().as_secs_f64();
            let ok = match self.get(port, &format!("/{HELLO_SERVICE}/"), Duration::from_secs(5)).await {
                Ok((200, _, took)) => Some(took.as_secs_f64()),
                _ => None,
            };
            samples.push((at, ok));
            tokio::time::sleep(interval).await;
        }
        let f = FailoverFigures::of(&samples, killed_at.unwrap_or(0.0));
        let _ = writeln!(
            self.report.raw,
            "failover: GETs after the kill slower than normal or failed (s after the kill: ms): {}",
            f.bad
                .iter()
                .map(|(t, l)| format!("{t:.3}:{}", l.map_or("failed".into(), |l| format!("{:.1}", l * 1e3))))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let (after, failed, recovered, normal) = (f.after, f.failed, f.recovered, f.normal);
        let r = self.report.row(format!("failover: failed GETs of {after} after the kill"));
        r.physarum = failed.to_string();
        r.target = "0".into();
        let r = self.report.row("failover: time until latency is normal again");
        r.physarum = ms(recovered);
        r.reference = format!("normal ≤ {} (before the kill)", ms(normal));
        r.target = "≤ 1 s".into();
        self.stop_node(&name).await;
        Ok(())
    }

    async fn sim(&mut self) -> Result<()> {
        let path = self
            .args
            .sim_scenario
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/twenty-nodes-10min.json"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let scenario = physarum_net_sim::Scenario::from_json(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let simulated = scenario.duration_ms as f64 / 1000.0;
        let t0 = Instant::now();
        // The simulation builds its own runtime: on a thread of its own, which this
        // (otherwise idle) task waits for.
        std::thread::scope(|s| s.spawn(|| physarum_net_sim::run(&scenario, 1).map(drop)).join())
            .map_err(|_| anyhow::anyhow!("the simulation panicked"))?
            .map_err(anyhow::Error::msg)?;
        let wall = t0.elapsed().as_secs_f64();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let r = self.report.row(format!("simulation speed, {name}"));
        r.physarum = format!("{:.1} simulated s per wall s", simulated / wall);
        r.reference = format!("{simulated:.0} s simulated in {wall:.1} s");
        Ok(())
    }

    fn render(&self, load_before: &str, took: Duration) -> String {
        let mut out = String::new();
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(
            out,
            "- machine: {cores} CPUs ({cpu}), commit {commit}, {} build",
            if cfg!(debug_assertions) { "debug" } else { "release" }
        );
        let _ = writeln!(
            out,
            "- load average (1/5/15 min): {load_before} before, {} after; took {:.0} s",
            load_average(),
            took.as_secs_f64()
        );
        let _ = writeln!(out, "- command: `physarum bench {}`", self.args.command_line());
        for n in &self.report.notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
        out.push_str(&self.report.markdown());
        if !self.report.raw.is_empty() {
            out.push_str("\n<details><summary>raw figures</summary>\n\n```\n");
            out.push_str(&self.report.raw);
            out.push_str("```\n\n</details>\n");
        }
        out
    }
}

fn cold_name(i: usize) -> String {
    format!("bench-cold-{i}")
}

/// `hello` under another name with an environment that changes its hash.
fn cold_variant(physarum: &Path, i: usize) -> ServiceConfig {
    let mut c = dev::hello_config(physarum, None);
    c.name = Some(cold_name(i));
    if let Some(exec) = c.exec.as_mut() {
        exec.env = BTreeMap::from([("PHYSARUM_BENCH_VARIANT".to_string(), i.to_string())]);
    }
    c
}

/// One nginx reverse-proxy hop: one worker, upstream keep-alive (the setup a user
/// would otherwise pick for a local proxy in front of a remote proxy).
const NGINX_HOP: &str = r#"
worker_processes 1;
daemon off;
master_process on;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/tmp/body;
    proxy_temp_path @PREFIX@/tmp/proxy;
    fastcgi_temp_path @PREFIX@/tmp/fastcgi;
    uwsgi_temp_path @PREFIX@/tmp/uwsgi;
    scgi_temp_path @PREFIX@/tmp/scgi;
    # physarum never closes a client's keep-alive connection; nginx would after 1000.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream next_hop {
        server 127.0.0.1:@UPSTREAM_PORT@;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location @LOCATION@ {
            proxy_pass http://next_hop@PASS_PATH@;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// GETs every 10 ms: 200 before a kill at 2 s, then `after` (latencies in ms,
    /// `None` failed); 1 ms normally, every 100th 3 ms (the machine's noise).
    fn failover_samples(after: &[Option<f64>]) -> Vec<(f64, Option<f64>)> {
        let noise = |i: usize| if i % 100 == 99 { 0.003 } else { 0.001 };
        let before = (0..200).map(|i| (i as f64 * 0.01, Some(noise(i))));
        let after = after.iter().enumerate().map(|(i, l)| (2.0 + i as f64 * 0.01, l.map(|ms| ms / 1e3)));
        before.chain(after).collect()
    }

    #[test]
    fn failover_recovery_ignores_the_usual_noise_but_not_a_slow_stretch() {
        let quiet = |i: usize| Some(if i % 100 == 99 { 3.0 } else { 1.0 });
        // One failed GET at the kill, then as before: normal again from the next GET.
        let mut after: Vec<Option<f64>> = (0..300).map(quiet).collect();
        after[0] = None;
        let f = FailoverFigures::of(&failover_samples(&after), 2.0);
        assert_eq!((f.after, f.failed), (300, 1));
        assert!((f.recovered - 0.01).abs() < 1e-9, "{f:?}");
        // Slow for the first second after the kill: normal again at 1 s.
        let slow: Vec<Option<f64>> = (0..300).map(|i| if i < 100 { Some(20.0) } else { quiet(i) }).collect();
        let f = FailoverFigures::of(&failover_samples(&slow), 2.0);
        assert_eq!(f.failed, 0);
        assert!((f.recovered - 1.0).abs() < 1e-9, "{f:?}");
        assert_eq!(f.bad.len(), 100 + 2, "the slow stretch and the two noisy GETs: {f:?}");
        // Still failing at the end of the window: never normal again.
        let failing: Vec<Option<f64>> = (0..300).map(|i| if i >= 290 { None } else { quiet(i) }).collect();
        assert!(FailoverFigures::of(&failover_samples(&failing), 2.0).recovered.is_nan());
    }

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 1 connections\n  Latency Distribution\n     50%   62.00us\n     75%   70.00us\n     90%  100.00us\n     99%    1.20ms\n  8000 requests in 1.00s, 1.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec:   7999.50\n";
        let (rps, p50, p99, n, errors) = parse_wrk(out).unwrap();
        assert_eq!((rps, p50, p99, n, errors), (7999.5, 62.0, 1200.0, 8000.0, 10.0));
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn cold_variants_have_their_own_hash() {
        let exe = std::env::current_exe().unwrap();
        let a = cold_variant(&exe, 1).to_service_info(None, Path::new("/")).unwrap();
        let b = cold_variant(&exe, 2).to_service_info(None, Path::new("/")).unwrap();
        assert_ne!(a.hash, b.hash);
    }
}
