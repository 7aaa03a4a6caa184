//! What every driver gives an instance, whichever way it runs it: the identity key
//! generated in advance (so the peer id is known before the instance starts), the
//! ports, the original's environment (`PROXY_IP, PROXY_PORT, SERVICE_PORT,
//! METRICS_PORT, P2P_BOOTSTRAPS, P2P_PSK`) and the sidecar proxy's command line.
//! Credentials an instance is handed belong here too, so both drivers get them.

use crate::keyfile;
use crate::ports::free_ports;
use physarum_core::types::ServiceInfo;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// The name of the identity key file in an instance directory.
pub const IDENTITY_KEY: &str = "identity.key";

/// What the allocator hands every instance it starts.
#[derive(Clone, Debug)]
pub struct InstanceContext {
    /// The address instances listen on for P2P and are reported at (`PROXY_IP`).
    pub host_ip: IpAddr,
    /// `P2P_BOOTSTRAPS` for instances (include the allocator's own address).
    pub bootstraps: Vec<String>,
    /// `P2P_PSK` for instances.
    pub psk: Option<String>,
    /// Operators' public keys, passed to each sidecar (`--operator`) so that it can
    /// check the credentials its allocator gives it.
    pub operators: Vec<String>,
}

/// One instance's identity and ports, made before it starts.
#[derive(Clone, Debug)]
pub struct InstancePlan {
    pub peer: String,
    pub ip: IpAddr,
    pub proxy_port: u16,
    pub service_port: u16,
    pub metrics_port: u16,
    pub p2p_port: u16,
    /// The service's sidecar only makes requests (anonymous mode): nothing is
    /// served, so the application need not listen.
    pub client_mode: bool,
}

impl InstancePlan {
    /// Generate the identity key in `dir` and pick four ports free on the host now.
    pub fn prepare(dir: &Path, ctx: &InstanceContext, service: &ServiceInfo) -> Result<InstancePlan, String> {
        let key = keyfile::generate_to(&dir.join(IDENTITY_KEY)).map_err(|e| e.to_string())?;
        let ports = free_ports(ctx.host_ip, 4).map_err(|e| format!("cannot pick ports: {e}"))?;
        Ok(InstancePlan {
            peer: keyfile::peer_id_string(&key),
            ip: ctx.host_ip,
            proxy_port: ports[0],
            service_port: ports[1],
            metrics_port: ports[2],
            p2p_port: ports[3],
            client_mode: service.client_mode,
        })
    }

    /// The multiaddr the sidecar listens on and is reported at.
    pub fn p2p_addr(&self) -> String {
        multiaddr(self.ip, self.p2p_port)
    }

    /// The original's environment, for the application and the sidecar alike.
    pub fn env(&self, ctx: &InstanceContext) -> Vec<(String, String)> {
        let mut env = vec![
            ("PROXY_IP".to_string(), self.ip.to_string()),
            ("PROXY_PORT".to_string(), self.proxy_port.to_string()),
            ("SERVICE_PORT".to_string(), self.service_port.to_string()),
            ("METRICS_PORT".to_string(), self.metrics_port.to_string()),
            ("P2P_BOOTSTRAPS".to_string(), ctx.bootstraps.join(" ")),
        ];
        if let Some(psk) = &ctx.psk {
            env.push(("P2P_PSK".to_string(), psk.clone()));
        }
        env
    }

    /// The sidecar proxy's arguments: service mode for `service`, or anonymous mode
    /// (metrics on METRICS_PORT) for a client-mode service. `key` and `config_file`
    /// are paths as the sidecar sees them.
    pub fn sidecar_args(
        &self,
        ctx: &InstanceContext,
        service: &ServiceInfo,
        key: &Path,
        config_file: Option<&Path>,
    ) -> Vec<String> {
        let mut args = vec!["--key".to_string(), key.display().to_string(), "--listen".to_string(), self.p2p_addr()];
        for b in &ctx.bootstraps {
            args.extend(["--bootstrap".to_string(), b.clone()]);
        }
        for op in &ctx.operators {
            args.extend(["--operator".to_string(), op.clone()]);
        }
        if let Some(conf) = config_file {
            args.extend(["--configfile".to_string(), conf.display().to_string()]);
        }
        if self.client_mode {
            args.extend(["--metrics".to_string(), self.metrics_addr().to_string(), self.proxy_port.to_string()]);
        } else {
            args.extend([
                self.proxy_port.to_string(),
                service.name.clone(),
                self.service_addr().to_string(),
                self.metrics_port.to_string(),
            ]);
        }
        args
    }

    /// Where the application listens (service mode).
    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.service_port)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.metrics_port)
    }

    /// The instance is reachable: its application accepts connections (unless it
    /// is a client), the sidecar's P2P port accepts connections and its metrics
    /// endpoint (opened once its node runs) answers.
    pub async fn is_ready(&self) -> bool {
        (self.client_mode || connects(self.service_addr()).await)
            && connects(SocketAddr::new(self.ip, self.p2p_port)).await
            && crate::metrics::endpoint_answers(self.metrics_addr(), std::time::Duration::from_millis(500)).await
    }
}

/// A fresh, empty instance directory.
pub fn fresh_dir(work_dir: &Path, tag: &str) -> Result<PathBuf, String> {
    let dir = work_dir.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn multiaddr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("/ip4/{ip}/tcp/{port}"),
        IpAddr::V6(ip) => format!("/ip6/{ip}/tcp/{port}"),
    }
}

async fn connects(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(std::time::Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// What this machine offers instances: CPU in thousandths of a core (the cores
/// this process may use) and memory in MiB (`MemTotal` of /proc/meminfo).
pub fn host_capacity() -> (u64, u64) {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_total_kib(&t)).unwrap_or(0);
    (cores * 1000, mem_kib / 1024)
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::perf::Requirements;
    use physarum_core::types::{ContentHash, RunSpec};

    fn service(client_mode: bool) -> ServiceInfo {
        ServiceInfo {
            name: "svc".into(),
            hash: ContentHash("h".into()),
            run: RunSpec::Image { image: "img".into() },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode,
        }
    }

    fn plan(client_mode: bool) -> InstancePlan {
        InstancePlan {
            peer: "P".into(),
            ip: "10.0.0.2".parse().unwrap(),
            proxy_port: 1,
            service_port: 2,
            metrics_port: 3,
            p2p_port: 4,
            client_mode,
        }
    }

    fn ctx() -> InstanceContext {
        InstanceContext {
            host_ip: "10.0.0.2".parse().unwrap(),
            bootstraps: vec!["/b1".into(), "/b2".into()],
            psk: Some("pw".into()),
            operators: vec!["ab".into()],
        }
    }

    #[test]
    fn service_mode_sidecar_serves_the_service_and_client_mode_only_requests() {
        let args = plan(false).sidecar_args(&ctx(), &service(false), Path::new("/k"), Some(Path::new("/c.json")));
        assert_eq!(
            args.join(" "),
            "--key /k --listen /ip4/10.0.0.2/tcp/4 --bootstrap /b1 --bootstrap /b2 --operator ab --configfile /c.json 1 svc 127.0.0.1:2 3"
        );
        let args = plan(true).sidecar_args(&ctx(), &service(true), Path::new("/k"), None);
        assert_eq!(
            args.join(" "),
            "--key /k --listen /ip4/10.0.0.2/tcp/4 --bootstrap /b1 --bootstrap /b2 --operator ab --metrics 127.0.0.1:3 1"
        );
    }

    #[test]
    fn the_environment_is_the_originals() {
        let env = plan(false).env(&ctx());
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PROXY_IP"), Some("10.0.0.2"));
        assert_eq!(get("PROXY_PORT"), Some("1"));
        assert_eq!(get("SERVICE_PORT"), Some("2"));
        assert_eq!(get("METRICS_PORT"), Some("3"));
        assert_eq!(get("P2P_BOOTSTRAPS"), Some("/b1 /b2"));
        assert_eq!(get("P2P_PSK"), Some("pw"));
        let no_psk = plan(false).env(&InstanceContext { psk: None, ..ctx() });
        assert!(no_psk.iter().all(|(k, _)| k != "P2P_PSK"));
    }

    #[test]
    fn capacity_comes_from_the_host() {
        assert_eq!(mem_total_kib("MemTotal:       24684000 kB\nMemFree: 1 kB\n"), Some(24684000));
        assert_eq!(mem_total_kib("garbage"), None);
        let (cpu, mem) = host_capacity();
        assert!(cpu >= 1000 && cpu % 1000 == 0, "{cpu}");
        assert!(mem > 0, "{mem}");
    }
}
