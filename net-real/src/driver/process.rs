//! The `process` instance driver: an instance is the registered executable plus a
//! sidecar `proxy` in service mode, both child processes of the allocator.
//!
//! For an instance the driver
//! 1. refuses container images (that is the Docker driver's job), programs whose
//!    resolved path (symlinks followed) lies outside its exec roots, and programs
//!    whose content hash (run spec + SHA3-256 of the bytes) no longer matches the
//!    registered one;
//! 2. generates the instance's identity key in advance, so its peer id is known
//!    before it starts, and picks its ports at run time;
//! 3. starts the application with `PROXY_IP, PROXY_PORT, SERVICE_PORT,
//!    METRICS_PORT, P2P_BOOTSTRAPS, P2P_PSK` and the sidecar
//!    `proxy --key K --listen /ip4/IP/tcp/P2P … PROXY_PORT SERVICE 127.0.0.1:SERVICE_PORT METRICS_PORT`;
//! 4. reports it up only once it is reachable — the application accepts
//!    connections, the sidecar's P2P port accepts connections and its metrics
//!    endpoint (which the proxy opens only once its node runs) answers — or failed
//!    with the reason (exit status and the tail of its log) when it exits first or
//!    the deadline passes;
//!    Both run as the configured unprivileged user when the allocator runs as root;
//! 5. reaps the children, reports an exit of either (after stopping the other) on
//!    the runtime's `ExitSink`, and stops every instance when the allocator stops
//!    ([`ProcessDriver::shutdown`], or drop, or `PR_SET_PDEATHSIG` when killed).

use super::instance::{fresh_dir, InstanceContext, InstancePlan, IDENTITY_KEY};
use super::{die_with_parent, hash_file};
use physarum_core::trust::program_within;
use physarum_core::types::{content_hash, InstanceId, PeerAddr, RunSpec, ServiceInfo};
use physarum_runtime::transport::{ExitSink, InstanceDriver};
use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How the driver runs instances.
#[derive(Clone, Debug)]
pub struct ProcessDriverConfig {
    /// The `proxy` executable started beside each application.
    pub proxy_program: PathBuf,
    /// Arguments before the proxy's own (`["proxy"]` when it is `physarum proxy`).
    pub proxy_args: Vec<String>,
    /// Where instance directories (identity key, logs) are made.
    pub work_dir: PathBuf,
    /// The address instances listen on for P2P and are reported at (`PROXY_IP`).
    pub host_ip: IpAddr,
    /// `P2P_BOOTSTRAPS` for instances (include the allocator's own address).
    pub bootstraps: Vec<String>,
    /// `P2P_PSK` for instances.
    pub psk: Option<String>,
    /// Passed to the sidecar as `--configfile` (performance defaults).
    pub config_file: Option<PathBuf>,
    /// An instance not reachable by then is stopped and reported failed.
    pub ready_timeout: Duration,
    /// SIGTERM → SIGKILL grace when stopping.
    pub stop_grace: Duration,
    /// SIGTERM → SIGKILL grace of a sidecar asked to stop: it drains its requests in
    /// flight first (for up to the proxy's `DRAIN_LIMIT`, 10 s).
    pub drain_grace: Duration,
    /// Refuse executables whose SHA3-256 differs from the registered hash.
    pub verify_hash: bool,
    /// Keep instance directories (logs) after an instance ends.
    pub keep_dirs: bool,
    /// Directories (canonical) whose programs may run; none: no program runs.
    pub exec_roots: Vec<PathBuf>,
    /// The user instances run as (set when the allocator runs as root).
    pub run_as: Option<RunAs>,
    /// Operators' public keys, passed to each sidecar (`--operator`) so that it can
    /// check the credentials the allocator gives it.
    pub operators: Vec<String>,
}

/// An unprivileged user for instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Look `name` up in the user database.
    pub fn lookup(name: &str) -> Result<RunAs, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(RunAs { name: name.to_string(), uid: u.uid.as_raw(), gid: u.gid.as_raw() }),
            Ok(None) => Err(format!("there is no user {name:?} to run instances as (--run-as)")),
            Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
        }
    }
}

impl ProcessDriverConfig {
    /// What every instance is handed.
    pub fn instance_context(&self) -> InstanceContext {
        InstanceContext {
            host_ip: self.host_ip,
            bootstraps: self.bootstraps.clone(),
            psk: self.psk.clone(),
            operators: self.operators.clone(),
        }
    }

    pub fn new(proxy_program: PathBuf, work_dir: PathBuf) -> Self {
        ProcessDriverConfig {
            proxy_program,
            proxy_args: Vec::new(),
            work_dir,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            bootstraps: Vec::new(),
            psk: None,
            config_file: None,
            ready_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(3),
            drain_grace: Duration::from_secs(12),
            verify_hash: true,
            keep_dirs: false,
            exec_roots: Vec::new(),
            run_as: None,
            operators: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Status {
    Running,
    /// Exited on its own (either process), with the reason.
    Exited(String),
    /// Stopped on request; both processes are gone.
    Stopped,
}

struct Entry {
    stop: watch::Sender<bool>,
    status: watch::Receiver<Status>,
    /// Process ids of the children not yet reaped (for the last-resort kill on drop).
    pids: Arc<Mutex<Vec<u32>>>,
}

struct Shared {
    config: ProcessDriverConfig,
    instances: Mutex<HashMap<InstanceId, Entry>>,
    hashes: Mutex<HashMap<PathBuf, (FileStamp, String)>>,
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    ino: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp { len: meta.len(), modified: meta.modified().ok(), ino: meta.ino() }
    }
}

impl Shared {
    fn instances(&self) -> MutexGuard<'_, HashMap<InstanceId, Entry>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Shared {
    /// Last resort when the driver is dropped without `shutdown`: kill whatever
    /// still runs. (`kill_on_drop` covers the monitor tasks being dropped.)
    fn drop(&mut self) {
        for entry in self.instances().values() {
            for pid in lock(&entry.pids).iter() {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs instances as child processes. Cheap to clone; the last clone dropped kills
/// every instance still running.
#[derive(Clone)]
pub struct ProcessDriver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProcessDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessDriver").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl ProcessDriver {
    /// A driver; fails when the proxy executable is missing or the work directory
    /// cannot be made.
    pub fn new(config: ProcessDriverConfig) -> Result<Self, String> {
        if !config.proxy_program.is_file() {
            return Err(format!(
                "the sidecar proxy executable {} does not exist (it is expected next to the allocator)",
                config.proxy_program.display()
            ));
        }
        fs::create_dir_all(&config.work_dir)
            .map_err(|e| format!("cannot create the instance directory {}: {e}", config.work_dir.display()))?;
        Ok(ProcessDriver {
            shared: Arc::new(Shared {
                config,
                instances: Mutex::new(HashMap::new()),
                hashes: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &ProcessDriverConfig {
        &self.shared.config
    }

    /// Instances currently tracked (starting or running).
    pub fn running(&self) -> Vec<InstanceId> {
        let mut ids: Vec<_> = self.shared.instances().keys().copied().collect();
        ids.sort();
        ids
    }

    /// Stop every instance and wait until all their processes are gone.
    pub async fn shutdown(&self) {
        let ids = self.running();
        futures::future::join_all(ids.into_iter().map(|id| self.stop_instance(id))).await;
    }

    async fn stop_instance(&self, instance: InstanceId) {
        let entry = self.shared.instances().remove(&instance);
        let Some(entry) = entry else { return };
        let _ = entry.stop.send(true);
        let mut status = entry.status;
        // Wait for the monitor to have reaped both processes.
        let _ = status.wait_for(|s| *s != Status::Running).await;
    }

    async fn start_instance(
        &self,
        instance: InstanceId,
        service: ServiceInfo,
        exits: ExitSink,
    ) -> Result<PeerAddr, String> {
        let cfg = &self.shared.config;
        let (program, args) = match &service.run {
            RunSpec::Image { image } => {
                return Err(format!(
                    "cannot run {}: it is the container image {image:?} and the docker driver is not \
                     available on this allocator (only executables can be run)",
                    service.name
                ))
            }
            RunSpec::Exec { program, args, env } => (program.clone(), (args.clone(), env.clone())),
        };
        let (args, app_env) = args;
        let program = resolve_program(&program)?;
        // The core checked the registered path; a symlink must not lead out of the roots.
        let resolved = fs::canonicalize(&program).map_err(|e| format!("cannot resolve {}: {e}", program.display()))?;
        let roots: Vec<String> = cfg.exec_roots.iter().map(|r| r.display().to_string()).collect();
        program_within(&resolved.display().to_string(), &roots)
            .map_err(|e| format!("refusing to run {}: {e}", service.name))?;
        if cfg.verify_hash {
            let digest = self.program_hash(&program).await?;
            let actual = content_hash(&service.run, &digest);
            if actual != service.hash {
                return Err(format!(
                    "refusing to run {}: the content hash of {} and its arguments is {actual}, not the \
                     registered {} (the executable changed since it was registered)",
                    service.name,
                    program.display(),
                    service.hash
                ));
            }
        }
        if self.shared.instances().contains_key(&instance) {
            return Err(format!("instance {instance} is already running"));
        }

        let ctx = cfg.instance_context();
        let dir = fresh_dir(&cfg.work_dir, &format!("instance-{instance}"))?;
        let prepared = InstancePlan::prepare(&dir, &ctx, &service).and_then(|plan| {
            if let Some(user) = &cfg.run_as {
                for path in [dir.clone(), dir.join(IDENTITY_KEY)] {
                    std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                        .map_err(|e| format!("cannot hand {} to user {}: {e}", path.display(), user.name))?;
                }
            }
            Ok(plan)
        });
        let plan = match prepared {
            Ok(plan) => plan,
            Err(e) => {
                self.remove_dir(&dir);
                return Err(e);
            }
        };
        let (peer, p2p_addr) = (plan.peer.clone(), plan.p2p_addr());
        let (proxy_port, service_port, metrics_port) = (plan.proxy_port, plan.service_port, plan.metrics_port);
        let env = plan.env(&ctx);

        let mut app = Command::new(&program);
        app.args(&args).envs(app_env.iter().map(|(k, v)| (k, v))).current_dir(&dir);
        let mut proxy = Command::new(&cfg.proxy_program);
        proxy.args(&cfg.proxy_args).current_dir(&dir).args(plan.sidecar_args(
            &ctx,
            &service,
            &dir.join(IDENTITY_KEY),
            cfg.config_file.as_deref(),
        ));
        for (cmd, log) in [(&mut app, "app.log"), (&mut proxy, "proxy.log")] {
            cmd.env_remove("P2P_PSK").envs(env.iter().map(|(k, v)| (k, v)));
            let out = fs::File::create(dir.join(log)).map_err(|e| format!("cannot create {log}: {e}"))?;
            let err = out.try_clone().map_err(|e| format!("cannot create {log}: {e}"))?;
            cmd.stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true).process_group(0);
            if let Some(user) = &cfg.run_as {
                // std drops the supplementary groups too when it changes the uid as root.
                cmd.uid(user.uid).gid(user.gid);
            }
            die_with_parent(cmd);
        }

        let mut app = match app.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.remove_dir(&dir);
                return Err(format!("cannot start {}: {e}", program.display()));
            }
        };
        let proxy = match proxy.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = app.kill().await;
                self.remove_dir(&dir);
                return Err(format!("cannot start the sidecar proxy {}: {e}", cfg.proxy_program.display()));
            }
        };
        tracing::info!(
            "instance {instance} of {}: started {} (pid {:?}) on port {service_port} and its proxy {peer} \
             (pid {:?}) at {p2p_addr}, HTTP port {proxy_port}, metrics port {metrics_port}",
            service.name,
            program.display(),
            app.id(),
            proxy.id()
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let (status_tx, mut status_rx) = watch::channel(Status::Running);
        let up = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(app.id().into_iter().chain(proxy.id()).collect::<Vec<_>>()));
        self.shared
            .instances()
            .insert(instance, Entry { stop: stop_tx, status: status_rx.clone(), pids: pids.clone() });
        tokio::spawn(monitor(Monitor {
            instance,
            app,
            proxy,
            stop: stop_rx,
            status: status_tx,
            up: up.clone(),
            pids,
            exits,
            shared: Arc::downgrade(&self.shared),
            dir: dir.clone(),
        }));

        // Poll readiness against the deadline, giving up as soon as a process exits.
        let deadline = tokio::time::Instant::now() + cfg.ready_timeout;
        loop {
            let status = status_rx.borrow_and_update().clone();
            match status {
                Status::Exited(reason) => {
                    let tail = log_tail(&dir);
                    self.remove_dir(&dir);
                    return Err(format!("instance of {} failed to start: {reason}{tail}", service.name));
                }
                Status::Stopped => return Err(format!("instance of {} was stopped while starting", service.name)),
                Status::Running => {}
            }
            if plan.is_ready().await {
                up.store(true, Ordering::SeqCst);
                // An exit between the check and `up` would otherwise go unreported.
                if let Status::Exited(reason) = status_rx.borrow().clone() {
                    return Err(format!("instance of {} exited just after starting: {reason}", service.name));
                }
                tracing::info!("instance {instance} of {} is up as {peer} at {p2p_addr}", service.name);
                return Ok(PeerAddr::new(peer, vec![p2p_addr]));
            }
            if tokio::time::Instant::now() >= deadline {
                let tail = log_tail(&dir);
                let keep = cfg.keep_dirs;
                // Keep the logs readable for the reason, then stop and clean up.
                self.stop_instance(instance).await;
                if !keep {
                    let _ = fs::remove_dir_all(&dir);
                }
                return Err(format!(
                    "instance of {} was not reachable within {:?}{tail}",
                    service.name, cfg.ready_timeout
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), status_rx.changed()).await;
        }
    }

    /// SHA3-256 of `program`, cached while its size, modification time and inode
    /// stay the same (debug builds of an executable can be hundreds of MB).
    async fn program_hash(&self, program: &Path) -> Result<String, String> {
        let meta = fs::metadata(program).map_err(|e| format!("cannot read {}: {e}", program.display()))?;
        let stamp = FileStamp::of(&meta);
        if let Some((cached_stamp, hash)) = lock(&self.shared.hashes).get(program) {
            if *cached_stamp == stamp {
                return Ok(hash.clone());
            }
        }
        let path = program.to_path_buf();
        let hash = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| format!("hashing {} failed: {e}", program.display()))?
            .map_err(|e| format!("cannot read {}: {e}", program.display()))?;
        lock(&self.shared.hashes).insert(program.to_path_buf(), (stamp, hash.clone()));
        Ok(hash)
    }

    fn remove_dir(&self, dir: &Path) {
        if !self.shared.config.keep_dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl InstanceDriver for ProcessDriver {
    async fn start(&self, instance: InstanceId, service: ServiceInfo, exits: ExitSink) -> Result<PeerAddr, String> {
        self.start_instance(instance, service, exits).await
    }

    async fn stop(&self, instance: InstanceId) {
        self.stop_instance(instance).await
    }
}

struct Monitor {
    instance: InstanceId,
    app: Child,
    proxy: Child,
    stop: watch::Receiver<bool>,
    status: watch::Sender<Status>,
    up: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<u32>>>,
    exits: ExitSink,
    shared: std::sync::Weak<Shared>,
    dir: PathBuf,
}

/// Owns an instance's two children: waits for either to exit or for a stop
/// request, then takes both down and reaps them.
async fn monitor(mut m: Monitor) {
    let grace = m.shared.upgrade().map(|s| s.config.stop_grace).unwrap_or(Duration::from_secs(1));
    let exited = tokio::select! {
        r = m.app.wait() => Some(format!("the application exited ({})", describe(r))),
        r = m.proxy.wait() => Some(format!("the sidecar proxy exited ({})", describe(r))),
        _ = m.stop.wait_for(|stop| *stop) => None,
    };
    match exited {
        Some(_) => drop(tokio::join!(terminate(&mut m.app, grace), terminate(&mut m.proxy, grace))),
        // Asked to stop: the sidecar drains its requests in flight, then the application goes.
        None => {
            let drain = m.shared.upgrade().map(|s| s.config.drain_grace).unwrap_or(grace);
            terminate(&mut m.proxy, drain).await;
            terminate(&mut m.app, grace).await;
        }
    }
    lock(&m.pids).clear();
    match exited {
        Some(reason) => {
            tracing::info!("instance {}: {reason}", m.instance);
            let was_up = m.up.load(Ordering::SeqCst);
            if let Some(shared) = m.shared.upgrade() {
                shared.instances().remove(&m.instance);
                if was_up && !shared.config.keep_dirs {
                    let _ = fs::remove_dir_all(&m.dir);
                }
            }
            // While starting, `start` reads the reason from the status instead.
            if was_up {
                m.exits.exited(m.instance);
            }
            let _ = m.status.send(Status::Exited(reason));
        }
        None => {
            tracing::info!("instance {}: stopped", m.instance);
            if let Some(shared) = m.shared.upgrade() {
                if !shared.config.keep_dirs {
                    let _ = fs::remove_dir_all(&m.dir);
                }
            }
            let _ = m.status.send(Status::Stopped);
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; always reaps.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        signal(pid, libc::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn describe(r: std::io::Result<ExitStatus>) -> String {
    match r {
        Ok(status) => status.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// The last lines of the instance's logs, for failure reasons.
fn log_tail(dir: &Path) -> String {
    let mut out = String::new();
    for log in ["app.log", "proxy.log"] {
        let Ok(text) = fs::read(dir.join(log)) else { continue };
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(600)..]).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if let Some(tail) = lines.get(lines.len().saturating_sub(3)..).filter(|t| !t.is_empty()) {
            out.push_str(&format!("; {log}: {}", tail.join(" | ")));
        }
    }
    out
}

/// Where to find a registered program on this machine: absolute paths as they are;
/// bare names next to the current executable, then on `PATH`.
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    let path = Path::new(program);
    if program.is_empty() {
        return Err("the registered program is empty".into());
    }
    if path.is_absolute() || program.contains('/') {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("the registered program {program} does not exist on this machine"))
        };
    }
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(program)));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect::<Vec<_>>())
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| format!("the registered program {program} is neither next to this executable nor on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile;
    use physarum_core::perf::Requirements;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("physarum-driver-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn service(program: &Path, args: &[&str]) -> ServiceInfo {
        let run = RunSpec::Exec {
            program: program.display().to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hi".into())],
        };
        ServiceInfo {
            name: "svc".into(),
            hash: content_hash(&run, &hash_file(program).unwrap()),
            run,
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        }
    }

    /// A fake sidecar proxy in Python: listens on the P2P port and serves 200 on the
    /// metrics port, like the real proxy once its node runs; records its arguments.
    fn fake_proxy(dir: &Path) -> PathBuf {
        script(
            dir,
            "proxy",
            r#"echo "$@" > args.txt
env > env.txt
exec python3 - "$@" <<'EOF'
import socket, sys, threading, http.server
args = sys.argv[1:]
listen = args[args.index("--listen") + 1].split("/")
p2p = socket.socket(); p2p.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
p2p.bind((listen[2], int(listen[4]))); p2p.listen()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(args[-1])), H).serve_forever()
EOF"#,
        )
    }

    fn has_python() -> bool {
        std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks existence.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    fn driver(dir: &Path, proxy: PathBuf) -> ProcessDriver {
        let mut cfg = ProcessDriverConfig::new(proxy, dir.join("work"));
        cfg.exec_roots = vec![fs::canonicalize(dir).unwrap()];
        cfg.bootstraps = vec!["/ip4/127.0.0.1/tcp/4001/p2p/QmBoot".into(), "/ip4/127.0.0.1/tcp/5/p2p/QmSelf".into()];
        cfg.psk = Some("secret".into());
        cfg.ready_timeout = Duration::from_secs(10);
        ProcessDriver::new(cfg).unwrap()
    }

    /// An application that listens on $SERVICE_PORT (python), and records its env.
    fn fake_app(dir: &Path) -> PathBuf {
        script(
            dir,
            "app",
            r#"env > app-env.txt
exec python3 -c 'import os, socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["SERVICE_PORT"]))); s.listen(); time.sleep(600)'"#,
        )
    }

    #[tokio::test]
    async fn image_services_fail_clearly() {
        let dir = tempdir("image");
        let d = driver(&dir, script(&dir, "proxy", "sleep 60"));
        let mut svc = service(&script(&dir, "app", "true"), &[]);
        svc.run = RunSpec::Image { image: "nginx:latest".into() };
        let (exits, _rx) = ExitSink::channel();
        let err = d.start(InstanceId(1), svc, exits).await.unwrap_err();
        assert!(err.contains("docker driver is not available"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_changed_executable_is_refused() {
        let dir = tempdir("hash");
        let d = driver(&dir, script(&dir, "proxy", "sleep 60"));
        let app = script(&dir, "app", "sleep 60");
        let svc = service(&app, &[]);
        script(&dir, "app", "echo tampered; sleep 60");
        let (exits, _rx) = ExitSink::channel();
        let err = d.start(InstanceId(1), svc, exits).await.unwrap_err();
        assert!(err.contains("the executable changed since it was registered"), "{err}");
        assert!(d.running().is_empty());
        // Other arguments are another service: its hash differs, so it is refused too.
        let mut other = service(&app, &["--other"]);
        other.hash = service(&app, &[]).hash;
        let (exits, _rx) = ExitSink::channel();
        let err = d.start(InstanceId(2), other, exits).await.unwrap_err();
        assert!(err.contains("not the"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn programs_outside_the_exec_roots_are_refused_also_through_symlinks() {
        let dir = tempdir("roots");
        let d = driver(&dir, script(&dir, "proxy", "sleep 60"));
        let (exits, _rx) = ExitSink::channel();
        let err = d.start(InstanceId(1), service(Path::new("/bin/sh"), &["-c", "id"]), exits).await.unwrap_err();
        assert!(err.contains("outside this allocator's exec roots"), "{err}");
        let link = dir.join("innocent");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        let (exits, _rx) = ExitSink::channel();
        let err = d.start(InstanceId(2), service(&link, &[]), exits).await.unwrap_err();
        assert!(err.contains("outside this allocator's exec roots"), "{err}");
        assert!(d.running().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn program_hashes_are_cached_until_the_file_changes() {
        let dir = tempdir("hashcache");
        let d = driver(&dir, script(&dir, "proxy", "sleep 60"));
        let app = script(&dir, "app", "echo a");
        let h1 = d.program_hash(&app).await.unwrap();
        assert_eq!(h1, hash_file(&app).unwrap());
        assert_eq!(d.program_hash(&app).await.unwrap(), h1);
        script(&dir, "app", "echo something else");
        let h2 = d.program_hash(&app).await.unwrap();
        assert_ne!(h2, h1);
        assert_eq!(h2, hash_file(&app).unwrap());
        assert!(d.program_hash(&dir.join("missing")).await.unwrap_err().contains("cannot read"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_application_that_exits_at_once_fails_with_its_status_and_log() {
        let dir = tempdir("exit");
        let d = driver(&dir, script(&dir, "proxy", "sleep 60"));
        let app = script(&dir, "app", "echo 'cannot bind: boom' >&2; exit 3");
        let (exits, mut rx) = ExitSink::channel();
        let err = d.start(InstanceId(7), service(&app, &[]), exits).await.unwrap_err();
        assert!(err.contains("the application exited (exit status: 3)"), "{err}");
        assert!(err.contains("cannot bind: boom"), "{err}");
        // Failed starts are not reported as exits, and nothing is left running.
        assert!(rx.try_recv().is_err());
        assert!(d.running().is_empty());
        assert!(!dir.join("work/instance-7").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_instance_fails_at_the_deadline_and_is_stopped() {
        let dir = tempdir("deadline");
        let mut cfg = ProcessDriverConfig::new(script(&dir, "proxy", "echo $$ > pid; exec sleep 60"), dir.join("w"));
        cfg.ready_timeout = Duration::from_millis(400);
        cfg.exec_roots = vec![fs::canonicalize(&dir).unwrap()];
        let d = ProcessDriver::new(cfg).unwrap();
        let app = script(&dir, "app", "exec sleep 60");
        let (exits, mut rx) = ExitSink::channel();
        let t0 = std::time::Instant::now();
        let err = d.start(InstanceId(1), service(&app, &[]), exits).await.unwrap_err();
        assert!(err.contains("not reachable within"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(8));
        assert!(d.running().is_empty());
        assert!(rx.try_recv().is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn runs_app_and_sidecar_reports_up_then_exits_and_stops() {
        if !has_python() {
            eprintln!("skipped: python3 is not available for the fake sidecar");
            return;
        }
        let dir = tempdir("run");
        let d = driver(&dir, fake_proxy(&dir));
        let app = fake_app(&dir);
        let (exits, mut rx) = ExitSink::channel();
        let svc = service(&app, &["--flag"]);
        let addr = d.start(InstanceId(1), svc.clone(), exits.clone()).await.unwrap();

        // The peer id is the one of the key generated in advance.
        let inst_dir = dir.join("work/instance-1");
        let key = keyfile::load(&inst_dir.join(IDENTITY_KEY)).unwrap();
        assert_eq!(addr.peer.0, keyfile::peer_id_string(&key));
        assert_eq!(addr.addrs.len(), 1);
        assert!(addr.addrs[0].starts_with("/ip4/127.0.0.1/tcp/"), "{:?}", addr.addrs);

        // The application got the environment, the sidecar the arguments.
        let env = fs::read_to_string(inst_dir.join("app-env.txt")).unwrap();
        for var in
            ["GREETING=hi", "PROXY_IP=127.0.0.1", "PROXY_PORT=", "SERVICE_PORT=", "METRICS_PORT=", "P2P_PSK=secret"]
        {
            assert!(env.contains(var), "{var} missing in {env}");
        }
        assert!(env.contains("P2P_BOOTSTRAPS=/ip4/127.0.0.1/tcp/4001/p2p/QmBoot /ip4/127.0.0.1/tcp/5/p2p/QmSelf"));
        let args = fs::read_to_string(inst_dir.join("args.txt")).unwrap();
        assert!(args.contains("--key") && args.contains("--listen /ip4/127.0.0.1/tcp/"), "{args}");
        assert!(args.contains("--bootstrap /ip4/127.0.0.1/tcp/4001/p2p/QmBoot"), "{args}");
        assert!(args.contains(" svc 127.0.0.1:"), "{args}");
        let proxy_env = fs::read_to_string(inst_dir.join("env.txt")).unwrap();
        assert!(proxy_env.contains("P2P_PSK=secret"), "{proxy_env}");

        // A second instance; kill its application: the sidecar is stopped too and the
        // exit is reported.
        let addr2 = d.start(InstanceId(2), svc.clone(), exits.clone()).await.unwrap();
        assert_ne!(addr2.peer, addr.peer);
        assert_eq!(d.running(), vec![InstanceId(1), InstanceId(2)]);
        let app_pids = pids_of(&dir.join("work/instance-2"));
        assert_eq!(app_pids.len(), 2, "{app_pids:?}");
        signal(app_pids[0], libc::SIGKILL);
        let exited = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
        assert_eq!(exited, Some(InstanceId(2)));
        assert_eq!(d.running(), vec![InstanceId(1)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while app_pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(app_pids.iter().all(|p| !alive(*p)), "children of instance 2 still alive");

        // Stop instance 1: both processes gone, no exit reported, directory removed.
        let pids1 = pids_of(&inst_dir);
        d.stop(InstanceId(1)).await;
        assert!(pids1.iter().all(|p| !alive(*p)));
        assert!(!inst_dir.exists());
        assert!(rx.try_recv().is_err());
        d.stop(InstanceId(1)).await; // idempotent

        // Shutdown stops whatever runs.
        d.start(InstanceId(3), svc, exits).await.unwrap();
        let pids3 = pids_of(&dir.join("work/instance-3"));
        d.shutdown().await;
        assert!(pids3.iter().all(|p| !alive(*p)));
        assert!(d.running().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn instances_run_as_the_configured_user_when_the_allocator_is_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !has_python() {
            eprintln!("skipped: needs root (to switch users) and python3 for the fake sidecar");
            return;
        }
        let dir = tempdir("runas");
        let nobody = RunAs::lookup("nobody").unwrap();
        let mut cfg = ProcessDriverConfig::new(fake_proxy(&dir), dir.join("work"));
        cfg.exec_roots = vec![fs::canonicalize(&dir).unwrap()];
        cfg.run_as = Some(nobody.clone());
        let d = ProcessDriver::new(cfg).unwrap();
        let (exits, _rx) = ExitSink::channel();
        d.start(InstanceId(1), service(&fake_app(&dir), &[]), exits).await.unwrap();
        let inst = dir.join("work/instance-1");
        for pid in pids_of(&inst) {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
            let ids: Vec<u32> = uid_line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
            assert!(ids.iter().all(|&u| u == nobody.uid), "pid {pid}: {uid_line}");
            let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap().to_string();
            assert!(!groups.split_whitespace().skip(1).any(|g| g == "0"), "pid {pid} kept root's groups: {groups}");
        }
        d.shutdown().await;
        assert!(!RunAs::lookup("no-such-user-here").unwrap_err().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_client_mode_instance_runs_an_anonymous_sidecar_and_need_not_listen() {
        if !has_python() {
            eprintln!("skipped: python3 is not available for the fake sidecar");
            return;
        }
        let dir = tempdir("client");
        // A fake sidecar: P2P port from --listen, metrics from --metrics (anonymous
        // mode) or the last argument (service mode).
        let proxy = script(
            &dir,
            "proxy",
            r#"echo "$@" > args.txt
exec python3 - "$@" <<'EOF'
import socket, sys, http.server
args = sys.argv[1:]
listen = args[args.index("--listen") + 1].split("/")
p2p = socket.socket(); p2p.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
p2p.bind((listen[2], int(listen[4]))); p2p.listen()
host, port = args[args.index("--metrics") + 1].split(":") if "--metrics" in args else ("127.0.0.1", args[-1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer((host, int(port)), H).serve_forever()
EOF"#,
        );
        let mut cfg = ProcessDriverConfig::new(proxy, dir.join("work"));
        cfg.ready_timeout = Duration::from_secs(3);
        cfg.exec_roots = vec![fs::canonicalize(&dir).unwrap()];
        let d = ProcessDriver::new(cfg).unwrap();
        // The application only makes requests: it never listens on SERVICE_PORT.
        let mut svc = service(&script(&dir, "app", "exec sleep 60"), &[]);
        svc.client_mode = true;
        let (exits, _rx) = ExitSink::channel();
        d.start(InstanceId(1), svc.clone(), exits.clone()).await.unwrap();
        let args = fs::read_to_string(dir.join("work/instance-1/args.txt")).unwrap();
        assert!(args.contains("--metrics 127.0.0.1:") && !args.contains(" svc "), "{args}");
        d.shutdown().await;
        // The same application as a service is never reachable.
        svc.client_mode = false;
        let err = d.start(InstanceId(2), svc, exits).await.unwrap_err();
        assert!(err.contains("not reachable within"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The pids the driver tracks for the instance whose directory is `dir`, found
    /// through /proc (processes whose cwd is that directory): application first.
    fn pids_of(dir: &Path) -> Vec<u32> {
        let dir = fs::canonicalize(dir).unwrap();
        let mut found = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if fs::read_link(e.path().join("cwd")).ok().as_deref() == Some(dir.as_path()) {
                let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
                let is_proxy = String::from_utf8_lossy(&cmdline).contains("--listen");
                found.push((is_proxy, pid));
            }
        }
        found.sort();
        found.into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn programs_resolve_or_fail_clearly() {
        assert!(resolve_program("/bin/sh").is_ok());
        assert!(resolve_program("sh").is_ok());
        let err = resolve_program("/no/such/program").unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = resolve_program("no-such-program-xyz").unwrap_err();
        assert!(err.contains("neither next to this executable nor on PATH"), "{err}");
        assert!(resolve_program("").is_err());
    }
}
