//! `physarum dev`: a whole cluster on this machine with no setup — a bootstrap, a
//! registry (store in a temporary or given data dir, `hello-world-server`
//! registered), N allocators with the process driver and an anonymous proxy on
//! 127.0.0.1:4200. Every daemon is a child process running this executable's
//! subcommand of the same name, so `cargo run -p physarum -- dev` needs nothing
//! else built; the allocators start `physarum proxy` sidecars and the demo service
//! is `physarum hello`. Ctrl-C or SIGTERM stops them all, allocators stopping their instances
//! first, and children die with this process however it ends (PR_SET_PDEATHSIG).
//!
//! Trust is on as in production: an operator key is made (kept at
//! `DATA_DIR/operator.key` with `--data-dir`), every daemon trusts it, each
//! allocator is granted by it and runs programs only from this executable's
//! directory, and the demo entry is signed with it.

use crate::cli::{DevArgs, DriverKind};
use crate::service_config::{ExecConfig, ServiceConfig};
use crate::store::RegistryStore;
use anyhow::{bail, Context, Result};
use physarum_core::trust::{SecretKey, SignedEntry};
use physarum_net_real::driver::die_with_parent;
use physarum_net_real::keyfile;
use physarum_net_real::metrics::endpoint_answers;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The bundled demo service.
pub const HELLO_SERVICE: &str = "hello-world-server";
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

pub(crate) fn free_port() -> Result<u16> {
    physarum_net_real::ports::free_port([127, 0, 0, 1].into()).context("cannot find a free port")
}

pub(crate) fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(crate) struct Cluster {
    pub(crate) root: PathBuf,
    pub(crate) logs: PathBuf,
    /// This executable: every daemon is one of its subcommands.
    pub(crate) exe: PathBuf,
    pub(crate) conf: PathBuf,
    daemons: Vec<Daemon>,
}

impl Cluster {
    pub(crate) fn new(root: PathBuf, exe: PathBuf, conf: PathBuf) -> Cluster {
        Cluster { logs: root.join("logs"), root, exe, conf, daemons: Vec::new() }
    }

    /// Start `physarum <subcommand> ARGS…` (this very executable).
    pub(crate) fn spawn(&mut self, name: &str, subcommand: &str, args: &[String], metrics: SocketAddr) -> Result<()> {
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(subcommand)
            .args(args)
            .current_dir(&self.root)
            .env_remove("P2P_BOOTSTRAPS")
            .env_remove("P2P_PSK")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            // Ctrl-C in the terminal reaches only us; we stop the children in order.
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {} {subcommand}", self.exe.display()))?;
        self.daemons.push(Daemon { name: name.to_string(), child, log, metrics });
        Ok(())
    }

    /// Wait until the named daemons serve their metrics (they do once they run).
    pub(crate) async fn wait_up(&mut self, names: &[String]) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for d in self.daemons.iter_mut().filter(|d| names.contains(&d.name)) {
            loop {
                if endpoint_answers(d.metrics, Duration::from_secs(1)).await {
                    break;
                }
                if let Ok(Some(status)) = d.child.try_wait() {
                    bail!("{} exited while starting ({status}); its log:\n{}", d.name, tail(&d.log, 15));
                }
                if Instant::now() >= deadline {
                    bail!("{} did not start within {START_TIMEOUT:?}; its log:\n{}", d.name, tail(&d.log, 15));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Stop every daemon, the proxy and allocators first (they stop their
    /// instances), the bootstrap last: SIGTERM, then SIGKILL after a grace.
    pub(crate) async fn stop(&mut self) {
        while let Some(d) = self.daemons.pop() {
            Self::stop_daemon(d).await;
        }
    }

    async fn stop_daemon(mut d: Daemon) {
        if let Ok(Some(_)) = d.child.try_wait() {
            return;
        }
        if let Some(pid) = d.child.id() {
            // SAFETY: signalling our own unreaped child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(8), d.child.wait()).await.is_err() {
            eprintln!("{} did not stop within 8 s: killing it", d.name);
            let _ = d.child.kill().await;
        }
    }

    /// Stop the named daemon (as [`Cluster::stop`] does) and forget it.
    pub(crate) async fn stop_one(&mut self, name: &str) {
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            Self::stop_daemon(self.daemons.remove(i)).await;
        }
    }

    /// Kill the named daemon at once (SIGKILL, as a crash) and forget it.
    pub(crate) async fn kill_one(&mut self, name: &str) {
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            let mut d = self.daemons.remove(i);
            let _ = d.child.kill().await;
        }
    }

    /// The process id of the named daemon, while it runs.
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.daemons.iter().find(|d| d.name == name).and_then(|d| d.child.id())
    }

    /// The process ids of every daemon running.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.daemons.iter().filter_map(|d| d.child.id()).collect()
    }

    /// The first daemon that exited on its own, if any.
    pub(crate) fn exited(&mut self) -> Option<(String, String, PathBuf)> {
        self.daemons.iter_mut().find_map(|d| match d.child.try_wait() {
            Ok(Some(status)) => Some((d.name.clone(), status.to_string(), d.log.clone())),
            _ => None,
        })
    }
}

/// The demo image `physarum dev --driver docker` builds and registers.
pub const HELLO_IMAGE: &str = "physarum/hello:dev";

/// Build [`HELLO_IMAGE`] from this executable unless it is up to date, with the
/// repository's `images/build.sh`.
fn build_hello_image(physarum: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
    if !script.is_file() {
        bail!("cannot build the demo image: {} is missing (run physarum dev from the repository)", script.display());
    }
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg("--physarum")
        .arg(physarum)
        .arg("--tag")
        .arg(HELLO_IMAGE)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("building the demo image {HELLO_IMAGE} failed ({status}); is the Docker engine running?");
    }
    Ok(())
}

/// The bundled demo service's config: this executable's `hello` subcommand, or
/// the demo image.
pub(crate) fn hello_config(physarum: &Path, image: Option<&str>) -> ServiceConfig {
    ServiceConfig {
        name: Some(HELLO_SERVICE.into()),
        exec: match image {
            Some(_) => None,
            None => Some(ExecConfig {
                program: physarum.display().to_string(),
                args: vec!["hello".into()],
                env: Default::default(),
            }),
        },
        image: image.map(str::to_string),
        network_soft_req: 100,
        network_hard_req: 1000,
        cpu_req: 100,
        // A container's limit covers its sidecar and shell too.
        memory_req: if image.is_some() { 64 } else { 16 },
        stateful: false,
        client_mode: false,
    }
}

/// The L4 demo services (this executable's subcommands of the same names).
pub const TCP_ECHO_SERVICE: &str = "tcp-echo";
pub const UDP_ECHO_SERVICE: &str = "udp-echo";

/// More UDP echo services, for a chain of three hops: each its own service (an
/// instance is never chosen as the next hop after itself, and an allocator hands out
/// its running instance of a service rather than starting a second).
pub const UDP_ECHO_EXTRA: [&str; 2] = ["udp-echo-2", "udp-echo-3"];

/// An L4 demo service's config: this executable's `subcommand`, registered as
/// `name`. The name is also in its environment, so that services of one program
/// differ in content hash (each is its own service).
pub(crate) fn echo_config(physarum: &Path, name: &str, subcommand: &str) -> ServiceConfig {
    let mut config = hello_config(physarum, None);
    config.name = Some(name.into());
    if let Some(exec) = &mut config.exec {
        exec.args = vec![subcommand.into()];
        exec.env.insert("PHYSARUM_DEMO_NAME".into(), name.into());
    }
    config
}

/// Register (or refresh) each service `config` in the store, signed by `operator`.
pub(crate) fn seed_registry(data_dir: &Path, configs: &[ServiceConfig], operator: &SecretKey) -> Result<()> {
    let store = RegistryStore::open(data_dir)?;
    let mut entries = store.load()?;
    for config in configs {
        let name = config.name.clone().context("a seeded service needs a name")?;
        let info = config.to_service_info(None, Path::new("/"))?;
        let version = entries.iter().find(|e| e.name == name).map_or(1, |e| e.version + 1);
        entries.retain(|e| e.name != name);
        entries.push(SignedEntry::sign(name, version, Some(info), operator));
    }
    store.save(&entries)
}

/// Run the dev cluster until Ctrl-C / SIGTERM.
pub async fn run(args: DevArgs) -> Result<()> {
    if args.allocators == 0 {
        bail!("--allocators must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let proxy_addr = local(args.port);
    TcpListener::bind(proxy_addr)
        .with_context(|| format!("port {} is taken on 127.0.0.1: stop what uses it or pass --port", args.port))?;

    let root = std::env::temp_dir().join(format!("physarum-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("logs")).with_context(|| format!("cannot create {}", root.display()))?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| root.join("registry-data"));
    let conf = root.join("conf.json");
    std::fs::write(
        &conf,
        "{\"Perf\": {\"SoftReq\": {\"RTT\": 100}, \"HardReq\": {\"RTT\": 1000}}, \"Bootstraps\": []}\n",
    )?;
    // The operator key: kept with the data when there is a data dir, so the
    // registry's entries stay verifiable across runs.
    let key_path = match &args.data_dir {
        Some(d) => d.join("operator.key"),
        None => root.join("operator.key"),
    };
    let operator = match key_path.exists() {
        true => crate::keys::load_operator_key(&key_path)?,
        false => crate::keys::keygen(&key_path)?,
    };
    let image = match args.driver {
        DriverKind::Docker => {
            build_hello_image(&exe)?;
            Some(HELLO_IMAGE)
        }
        DriverKind::Process => None,
    };
    let mut services = vec![hello_config(&exe, image)];
    // The L4 demos run as processes (the demo image holds the HTTP demo only).
    if args.driver == DriverKind::Process {
        services.push(echo_config(&exe, TCP_ECHO_SERVICE, TCP_ECHO_SERVICE));
        for name in std::iter::once(UDP_ECHO_SERVICE).chain(UDP_ECHO_EXTRA) {
            services.push(echo_config(&exe, name, UDP_ECHO_SERVICE));
        }
    }
    seed_registry(&data_dir, &services, &operator)?;

    let mut cluster = Cluster::new(root.clone(), exe, conf.clone());
    let result = run_cluster(&mut cluster, &args, &data_dir, proxy_addr, (&key_path, &operator)).await;
    eprintln!("\nStopping the cluster...");
    cluster.stop().await;
    if result.is_ok() || std::env::var_os("PHYSARUM_KEEP_DEV_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    match &result {
        Ok(()) => eprintln!("Stopped."),
        Err(_) => eprintln!("Stopped after an error."),
    }
    result
}

async fn run_cluster(
    c: &mut Cluster,
    args: &DevArgs,
    data_dir: &Path,
    proxy_addr: SocketAddr,
    (operator_path, operator): (&Path, &SecretKey),
) -> Result<()> {
    let t0 = Instant::now();
    let conf = c.conf.display().to_string();
    let operator_public = operator.public().to_string();
    let mut common = vec!["--configfile".to_string(), conf, "--operator".into(), operator_public.clone()];
    if let Some(psk) = &args.psk {
        common.extend(["--psk".to_string(), psk.clone()]);
    }

    // Bootstrap: its identity is made here so its address is known in advance.
    let boot_key = c.root.join("bootstrap.key");
    let boot_peer = keyfile::peer_id_string(&keyfile::generate_to(&boot_key)?);
    let boot_port = free_port()?;
    let boot_addr = format!("/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_peer}");
    let boot_metrics = local(free_port()?);
    let mut a = common.clone();
    a.extend([
        "--key".into(),
        boot_key.display().to_string(),
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{boot_port}"),
        "--metrics".into(),
        boot_metrics.to_string(),
    ]);
    c.spawn("bootstrap", "bootstrap", &a, boot_metrics)?;
    c.wait_up(&["bootstrap".into()]).await?;

    let joined = |name: &str, c: &Cluster| {
        let mut a = common.clone();
        a.extend([
            "--bootstrap".into(),
            boot_addr.clone(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--key".into(),
            c.root.join(format!("{name}.key")).display().to_string(),
        ]);
        a
    };

    let reg_metrics = local(free_port()?);
    let mut a = joined("registry", c);
    a.extend(["--data-dir".into(), data_dir.display().to_string(), "--metrics".into(), reg_metrics.to_string()]);
    c.spawn("registry", "registry-service", &a, reg_metrics)?;
    c.wait_up(&["registry".into()]).await?;

    let mut alloc_names = Vec::new();
    let mut alloc_metrics = Vec::new();
    let exec_root = c.exe.parent().context("this executable has no directory")?.display().to_string();
    for i in 1..=args.allocators {
        let name = format!("allocator-{i}");
        let m = local(free_port()?);
        // Its identity is made here so that the operator can grant it before it starts.
        let key = keyfile::generate_to(&c.root.join(format!("{name}.key")))?;
        let grant_path = c.root.join(format!("{name}.grant.json"));
        crate::keys::write_grant(&crate::keys::grant(operator_path, &keyfile::peer_id_string(&key))?, &grant_path)?;
        let mut a = joined(&name, c);
        a.extend([
            "--metrics".into(),
            m.to_string(),
            "--instance-dir".into(),
            c.root.join(format!("{name}-instances")).display().to_string(),
            "--grant".into(),
            grant_path.display().to_string(),
            "--exec-root".into(),
            exec_root.clone(),
        ]);
        if args.driver == DriverKind::Docker {
            a.extend(["--driver".into(), "docker".into()]);
        }
        c.spawn(&name, "allocator", &a, m)?;
        alloc_names.push(name);
        alloc_metrics.push(m);
    }
    c.wait_up(&alloc_names).await?;

    let proxy_metrics = local(free_port()?);
    let mut a = joined("proxy", c);
    a.extend(["--metrics".into(), proxy_metrics.to_string(), proxy_addr.port().to_string()]);
    c.spawn("proxy", "proxy", &a, proxy_metrics)?;
    c.wait_up(&["proxy".into()]).await?;

    let took = t0.elapsed();
    println!("physarum dev cluster is up (started in {:.1} s):", took.as_secs_f64());
    println!("  bootstrap    {boot_addr}");
    println!("               metrics http://{boot_metrics}/metrics");
    println!("  registry     data in {}", data_dir.display());
    println!("               metrics http://{reg_metrics}/metrics");
    for (name, m) in alloc_names.iter().zip(&alloc_metrics) {
        println!("  {name:12} {} driver, metrics http://{m}/metrics", format!("{:?}", args.driver).to_lowercase());
    }
    println!("  proxy        http://{proxy_addr}  (anonymous mode)");
    println!("               metrics http://{proxy_metrics}/metrics");
    match args.driver {
        DriverKind::Process => {
            println!("  service      {HELLO_SERVICE} -> {} hello", c.exe.display());
            println!("  service      {TCP_ECHO_SERVICE} -> {} {TCP_ECHO_SERVICE}", c.exe.display());
            for name in std::iter::once(UDP_ECHO_SERVICE).chain(UDP_ECHO_EXTRA) {
                println!("  service      {name} -> {} {UDP_ECHO_SERVICE}", c.exe.display());
            }
        }
        DriverKind::Docker => println!("  service      {HELLO_SERVICE} -> image {HELLO_IMAGE}"),
    }
    println!("  operator     {operator_public}");
    println!("               key {}", operator_path.display());
    println!("  logs         {}", c.logs.display());
    println!();
    println!("Try:");
    println!("  curl {}:{}/{HELLO_SERVICE}/hello", proxy_addr.ip(), proxy_addr.port());
    if args.driver == DriverKind::Process {
        println!("  {} l4 map --proxy {proxy_addr} tcp {TCP_ECHO_SERVICE}   # then: nc ADDRESS PORT", c.exe.display());
    }
    println!();
    println!("Register a service of your own (its program must live in {exec_root}), signed with that key:");
    println!(
        "  {} registry --bootstrap {boot_addr} --operator {operator_public} add SERVICE.json --operator-key {}",
        c.exe.display(),
        operator_path.display()
    );
    println!();
    println!("Press Ctrl-C to stop.");

    let mut check = tokio::time::interval(Duration::from_millis(500));
    let shutdown = crate::signals::shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = check.tick() => {
                if let Some((name, status, log)) = c.exited() {
                    bail!("{name} exited unexpectedly ({status}); its log:\n{}", tail(&log, 15));
                }
            }
        }
    }
}
