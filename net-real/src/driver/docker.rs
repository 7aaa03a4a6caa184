//! The `docker` instance driver: an instance is a container of the registered
//! image, with host networking by default, as in the original allocator.
//!
//! The image contract: the container's command is the sidecar proxy's arguments
//! (`--key … --listen … PROXY_PORT SERVICE ADDRESS METRICS_PORT`, see
//! [`InstancePlan::sidecar_args`]); its entrypoint starts the application (which
//! listens on `$SERVICE_PORT`) and `proxy "$@"`, and ends when either ends
//! (`images/build.sh` builds such images). The instance directory (identity key,
//! config file) is mounted read-only at [`INSTANCE_MOUNT`].
//!
//! For an instance the driver
//! 1. refuses executables (the process driver's job);
//! 2. uses the image when it is present and pulls it only when it is missing;
//! 3. generates the identity key and ports ([`InstancePlan`]), creates the
//!    container with the original's environment, the service's CPU and memory
//!    requirements as limits, and labels naming this allocator, the instance and
//!    the service; starts it;
//! 4. reports it up once reachable (as the process driver does), or failed with
//!    the container's exit code and the tail of its log;
//! 5. reports a later exit on the `ExitSink`; stopping is stop + remove.
//!
//! Containers an earlier run of the same allocator (same identity) left behind when
//! it was killed are found by their labels: running ones are adopted — tracked,
//! served and culled as if started now — and the rest removed
//! ([`DockerDriver::adopt`]). The labels carry what adoption needs: the instance's
//! number, service, peer id and address.

use super::instance::{fresh_dir, InstanceContext, InstancePlan, IDENTITY_KEY};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::{StreamExt, TryStreamExt};
use physarum_core::types::{InstanceId, PeerAddr, RunSpec, ServiceInfo};
use physarum_runtime::transport::{AdoptedInstance, ExitSink, InstanceDriver};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// Where the instance directory is mounted inside the container.
pub const INSTANCE_MOUNT: &str = "/physarum-instance";
/// Label: the peer id of the allocator that started the container.
pub const LABEL_ALLOCATOR: &str = "physarum.allocator";
/// Label: the allocator's instance number.
pub const LABEL_INSTANCE: &str = "physarum.instance";
/// Label: the service name.
pub const LABEL_SERVICE: &str = "physarum.service";
/// Label: the registry entry's service info (JSON) the instance was started from.
pub const LABEL_SERVICE_INFO: &str = "physarum.service-info";
/// Label: the instance sidecar's peer id and P2P address (`PEER ADDR`).
pub const LABEL_PEER: &str = "physarum.peer";
/// Label: the instance directory on the host.
pub const LABEL_DIR: &str = "physarum.instance-dir";

/// How the driver runs containers.
#[derive(Clone, Debug)]
pub struct DockerDriverConfig {
    /// Where instance directories (identity key, config) are made.
    pub work_dir: PathBuf,
    /// What every instance is handed.
    pub instance: InstanceContext,
    /// Copied into each instance and passed to the sidecar as `--configfile`.
    pub config_file: Option<PathBuf>,
    /// This allocator's peer id: containers are labelled with it and named after it.
    pub owner: String,
    /// The containers' network mode (`host`, as the original).
    pub network_mode: String,
    /// An instance not reachable by then is removed and reported failed.
    pub ready_timeout: Duration,
    /// `docker stop` grace before SIGKILL.
    pub stop_grace: Duration,
}

impl DockerDriverConfig {
    pub fn new(work_dir: PathBuf, instance: InstanceContext, owner: String) -> Self {
        DockerDriverConfig {
            work_dir,
            instance,
            config_file: None,
            owner,
            network_mode: "host".into(),
            ready_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(3),
        }
    }
}

struct Entry {
    container: String,
    dir: PathBuf,
    /// Set when the allocator stops the instance: its end is then not an exit.
    stopping: Arc<AtomicBool>,
}

struct Shared {
    config: DockerDriverConfig,
    instances: Mutex<HashMap<InstanceId, Entry>>,
}

impl Shared {
    fn instances(&self) -> MutexGuard<'_, HashMap<InstanceId, Entry>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs instances as containers. Cheap to clone.
#[derive(Clone)]
pub struct DockerDriver {
    docker: Docker,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DockerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerDriver").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

/// An error from the engine, said plainly.
fn engine_error(what: &str, e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            format!("{what}: the Docker engine answered {status_code}: {}", message.trim())
        }
        other => format!("{what}: {other}"),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

impl DockerDriver {
    /// Connect to the local Docker engine (`DOCKER_HOST` or the default socket) and
    /// agree on an API version; fails with a clear reason when no engine answers.
    pub async fn connect(config: DockerDriverConfig) -> Result<Self, String> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| format!("cannot reach the Docker engine (is it running?): {e}"))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| format!("cannot reach the Docker engine (is it running?): {e}"))?;
        std::fs::create_dir_all(&config.work_dir)
            .map_err(|e| format!("cannot create the instance directory {}: {e}", config.work_dir.display()))?;
        Ok(DockerDriver { docker, shared: Arc::new(Shared { config, instances: Mutex::new(HashMap::new()) }) })
    }

    pub fn config(&self) -> &DockerDriverConfig {
        &self.shared.config
    }

    /// Instances currently tracked (starting or running).
    pub fn running(&self) -> Vec<InstanceId> {
        let mut ids: Vec<_> = self.shared.instances().keys().copied().collect();
        ids.sort();
        ids
    }

    /// Take over the running containers an earlier run of this allocator (same
    /// identity) left behind, and remove its stopped or unreadable ones. Call it
    /// before starting instances; engine errors are logged and adopt nothing.
    pub async fn adopt(&self, exits: ExitSink) -> Vec<AdoptedInstance> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_ALLOCATOR}={}", self.shared.config.owner)])]);
        let listed = self
            .docker
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).filters(&filters).build()))
            .await;
        let containers = match listed {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("{}", engine_error("cannot look for containers an earlier run left", e));
                return Vec::new();
            }
        };
        let mut adopted = Vec::new();
        let mut removed = 0;
        for c in containers {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let running = c.state.as_ref().map(|s| s.to_string()) == Some("running".to_string());
            match running.then(|| adoptable(&labels)).flatten() {
                Some((a, dir)) if !self.shared.instances().contains_key(&a.instance) => {
                    let name =
                        c.names.and_then(|n| n.into_iter().next()).map(|n| n.trim_start_matches('/').to_string());
                    let container = name.unwrap_or(id);
                    let stopping = Arc::new(AtomicBool::new(false));
                    let entry = Entry { container: container.clone(), dir, stopping: stopping.clone() };
                    self.shared.instances().insert(a.instance, entry);
                    self.watch_exit(
                        a.instance,
                        container.clone(),
                        Arc::new(AtomicBool::new(true)),
                        stopping,
                        exits.clone(),
                    );
                    tracing::info!(
                        "instance {} of {}: adopted the running container {container} an earlier run started",
                        a.instance,
                        a.service.name
                    );
                    adopted.push(a);
                }
                _ => {
                    self.remove_container(&id).await;
                    if let Some(dir) = labels.get(LABEL_DIR) {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!("Removed {removed} containers an earlier run of this allocator left behind");
        }
        if !adopted.is_empty() {
            tracing::info!("Adopted {} running containers an earlier run of this allocator started", adopted.len());
        }
        adopted
    }

    /// Stop every instance and remove its container.
    pub async fn shutdown(&self) {
        let ids = self.running();
        futures::future::join_all(ids.into_iter().map(|id| self.stop_instance(id))).await;
    }

    fn container_name(&self, instance: InstanceId) -> String {
        format!("physarum-{}-{instance}", self.shared.config.owner)
    }

    async fn remove_container(&self, container: &str) {
        let grace = i32::try_from(self.shared.config.stop_grace.as_secs()).unwrap_or(3);
        let _ = self.docker.stop_container(container, Some(StopContainerOptionsBuilder::new().t(grace).build())).await;
        if let Err(e) = self
            .docker
            .remove_container(container, Some(RemoveContainerOptionsBuilder::new().force(true).build()))
            .await
        {
            if !is_not_found(&e) {
                tracing::warn!("{}", engine_error(&format!("cannot remove container {container}"), e));
            }
        }
    }

    async fn stop_instance(&self, instance: InstanceId) {
        let entry = self.shared.instances().remove(&instance);
        let Some(entry) = entry else { return };
        entry.stopping.store(true, Ordering::SeqCst);
        self.remove_container(&entry.container).await;
        let _ = std::fs::remove_dir_all(&entry.dir);
        tracing::info!("instance {instance}: container {} stopped and removed", entry.container);
    }

    /// Use the image when present; pull it only when it is missing.
    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(&format!("cannot look up the image {image}"), e)),
        }
        tracing::info!("image {image} is not on this machine: pulling it");
        self.docker
            .create_image(Some(CreateImageOptionsBuilder::new().from_image(image).build()), None, None)
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ())
            .map_err(|e| format!("the image {image} is not on this machine and pulling it failed: {e}"))
    }

    /// The last lines of a container's output.
    async fn log_tail(&self, container: &str) -> String {
        let opts = LogsOptionsBuilder::new().stdout(true).stderr(true).tail("5").build();
        let chunks: Vec<_> = self.docker.logs(container, Some(opts)).take(64).collect().await;
        let text: String = chunks
            .into_iter()
            .filter_map(Result::ok)
            .map(|c| String::from_utf8_lossy(&c.into_bytes()).into_owned())
            .collect();
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its log: {}", lines.join(" | "))
        }
    }

    async fn start_instance(
        &self,
        instance: InstanceId,
        service: ServiceInfo,
        exits: ExitSink,
    ) -> Result<PeerAddr, String> {
        let cfg = &self.shared.config;
        let image = match &service.run {
            RunSpec::Image { image } => image.clone(),
            RunSpec::Exec { program, .. } => {
                return Err(format!(
                    "cannot run {}: it is the executable {program} and this allocator runs container images \
                     (start it with --driver process to run executables)",
                    service.name
                ))
            }
        };
        if self.shared.instances().contains_key(&instance) {
            return Err(format!("instance {instance} is already running"));
        }
        self.ensure_image(&image).await?;

        let ctx = &cfg.instance;
        let dir = fresh_dir(&cfg.work_dir, &format!("instance-{instance}"))?;
        let setup = (|| {
            let plan = InstancePlan::prepare(&dir, ctx, &service)?;
            let conf = match &cfg.config_file {
                Some(c) => {
                    std::fs::copy(c, dir.join("conf.json"))
                        .map_err(|e| format!("cannot copy {} for the instance: {e}", c.display()))?;
                    Some(Path::new(INSTANCE_MOUNT).join("conf.json"))
                }
                None => None,
            };
            Ok::<_, String>((plan, conf))
        })();
        let (plan, conf) = match setup {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let key = Path::new(INSTANCE_MOUNT).join(IDENTITY_KEY);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(plan.sidecar_args(ctx, &service, &key, conf.as_deref())),
            env: Some(plan.env(ctx).into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(HashMap::from([
                (LABEL_ALLOCATOR.to_string(), cfg.owner.clone()),
                (LABEL_INSTANCE.to_string(), instance.to_string()),
                (LABEL_SERVICE.to_string(), service.name.clone()),
                (LABEL_SERVICE_INFO.to_string(), serde_json::to_string(&service).unwrap_or_default()),
                (LABEL_PEER.to_string(), format!("{} {}", plan.peer, plan.p2p_addr())),
                (LABEL_DIR.to_string(), dir.display().to_string()),
            ])),
            host_config: Some(HostConfig {
                network_mode: Some(cfg.network_mode.clone()),
                binds: Some(vec![format!("{}:{INSTANCE_MOUNT}:ro", dir.display())]),
                nano_cpus: (service.cpu_millis > 0).then(|| i64::from(service.cpu_millis) * 1_000_000),
                memory: (service.memory_mb > 0).then(|| i64::from(service.memory_mb) * 1024 * 1024),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = self.container_name(instance);
        let created =
            self.docker.create_container(Some(CreateContainerOptionsBuilder::new().name(&name).build()), body).await;
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(engine_error(&format!("cannot create a container of {image} for {}", service.name), e));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        self.shared
            .instances()
            .insert(instance, Entry { container: name.clone(), dir: dir.clone(), stopping: stopping.clone() });
        if let Err(e) = self.docker.start_container(&name, None).await {
            let reason = engine_error(&format!("cannot start the container of {image} for {}", service.name), e);
            self.stop_instance(instance).await;
            return Err(reason);
        }
        tracing::info!(
            "instance {instance} of {}: container {name} of {image} started; its proxy {} at {}, HTTP port {}, \
             metrics port {}",
            service.name,
            plan.peer,
            plan.p2p_addr(),
            plan.proxy_port,
            plan.metrics_port
        );

        let up = Arc::new(AtomicBool::new(false));
        let mut ended_rx = self.watch_exit(instance, name.clone(), up.clone(), stopping.clone(), exits);

        let deadline = tokio::time::Instant::now() + cfg.ready_timeout;
        loop {
            let ended = ended_rx.borrow_and_update().clone();
            if let Some(reason) = ended {
                if stopping.load(Ordering::SeqCst) {
                    return Err(format!("instance of {} was stopped while starting", service.name));
                }
                let tail = self.log_tail(&name).await;
                self.stop_instance(instance).await;
                return Err(format!("instance of {} failed to start: {reason}{tail}", service.name));
            }
            if plan.is_ready().await {
                up.store(true, Ordering::SeqCst);
                if ended_rx.borrow().is_some() {
                    self.stop_instance(instance).await;
                    return Err(format!("instance of {} exited just after starting", service.name));
                }
                tracing::info!("instance {instance} of {} is up as {} at {}", service.name, plan.peer, plan.p2p_addr());
                return Ok(PeerAddr::new(plan.peer.clone(), vec![plan.p2p_addr()]));
            }
            if tokio::time::Instant::now() >= deadline {
                let tail = self.log_tail(&name).await;
                self.stop_instance(instance).await;
                return Err(format!(
                    "instance of {} was not reachable within {:?}{tail}",
                    service.name, cfg.ready_timeout
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), ended_rx.changed()).await;
        }
    }

    /// Watch for the container's end, which the receiver reports: while starting it
    /// fails the start; once `up`, unless the allocator is `stopping` it, it is an
    /// exit, reported on `exits`.
    fn watch_exit(
        &self,
        instance: InstanceId,
        name: String,
        up: Arc<AtomicBool>,
        stopping: Arc<AtomicBool>,
        exits: ExitSink,
    ) -> watch::Receiver<Option<String>> {
        let (ended_tx, ended_rx) = watch::channel::<Option<String>>(None);
        let (docker, shared) = (self.docker.clone(), Arc::downgrade(&self.shared));
        tokio::spawn(async move {
            let waited = docker.wait_container(&name, None).next().await;
            let reason = match waited {
                Some(Ok(r)) => format!("the container exited with status {}", r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    format!("the container exited with status {code}")
                }
                Some(Err(e)) => format!("the container ended: {e}"),
                None => "the container ended".to_string(),
            };
            let _ = ended_tx.send(Some(reason.clone()));
            if up.load(Ordering::SeqCst) && !stopping.load(Ordering::SeqCst) {
                tracing::info!("instance {instance}: {reason}");
                let driver = shared.upgrade().map(|shared| DockerDriver { docker, shared });
                if let Some(driver) = driver {
                    driver.stop_instance(instance).await;
                }
                exits.exited(instance);
            }
        });
        ended_rx
    }

    /// Whether the container of `instance` is running (for tests and diagnostics).
    pub async fn is_running(&self, instance: InstanceId) -> bool {
        let name = self.container_name(instance);
        match self.docker.inspect_container(&name, None::<InspectContainerOptions>).await {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }
}

impl InstanceDriver for DockerDriver {
    async fn start(&self, instance: InstanceId, service: ServiceInfo, exits: ExitSink) -> Result<PeerAddr, String> {
        self.start_instance(instance, service, exits).await
    }

    async fn stop(&self, instance: InstanceId) {
        self.stop_instance(instance).await
    }

    async fn adopt(&self, exits: ExitSink) -> Vec<AdoptedInstance> {
        DockerDriver::adopt(self, exits).await
    }
}

/// What a container's labels say about the instance it runs, if they say it all.
fn adoptable(labels: &HashMap<String, String>) -> Option<(AdoptedInstance, PathBuf)> {
    let instance = InstanceId(labels.get(LABEL_INSTANCE)?.parse().ok()?);
    let service: ServiceInfo = serde_json::from_str(labels.get(LABEL_SERVICE_INFO)?).ok()?;
    let (peer, addr) = labels.get(LABEL_PEER)?.split_once(' ')?;
    let dir = PathBuf::from(labels.get(LABEL_DIR)?);
    Some((AdoptedInstance { instance, service, peer: PeerAddr::new(peer, vec![addr.to_string()]) }, dir))
}
