//! Command lines of every binary (clap), kept here so they can be tested.

use clap::{Args, Parser, Subcommand};
use physarum_core::trust::PublicKey;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Options every P2P daemon takes.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct NetArgs {
    /// Config file: performance defaults and bootstraps [default: conf/conf.json if present]
    #[arg(long = "configfile", value_name = "PATH")]
    pub configfile: Option<PathBuf>,
    /// Bootstrap node multiaddr (/ip4/IP/tcp/PORT/p2p/PEER_ID); repeatable. Overrides
    /// the config file's, which override $P2P_BOOTSTRAPS (space-separated)
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Private network passphrase (the key is its SHA3-256) [env: P2P_PSK]
    #[arg(long, value_name = "PASSPHRASE")]
    pub psk: Option<String>,
    /// Identity key file, created when missing (libp2p protobuf encoding, mode 0600)
    /// [default: allocator, bootstrap: $PHYSARUM_HOME or ~/.physarum/<daemon>.key;
    /// registry: DATA_DIR/registry.key; proxy and CLI: a fresh identity per run]
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// P2P listen multiaddr [default: /ip4/0.0.0.0/tcp/0]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Option<String>,
    /// Attempts to reach the bootstraps at start-up (2, 4, 8, 16 s apart) before giving up
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub bootstrap_attempts: u32,
    /// An operator's public key (64 hex digits): who may decide what runs; repeatable,
    /// added to the config file's "Operators"
    #[arg(long = "operator", value_name = "PUBKEY", value_parser = parse_public_key)]
    pub operator: Vec<PublicKey>,
    /// TCP port on the listen address's IP where peers open tunnels to this node, each
    /// on a connection of its own (secured like the P2P connections); 0: any free
    /// port; "off": tunnels run inside the P2P connection (slower; for firewalls that
    /// admit only the P2P port). Peers without one are reached that way anyway
    #[arg(long, value_name = "PORT|off", default_value = "0", value_parser = parse_tunnel_port)]
    pub tunnel_port: TunnelPort,
}

/// `--tunnel-port`: a port (0: any), or no data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelPort(pub Option<u16>);

pub fn parse_tunnel_port(s: &str) -> Result<TunnelPort, String> {
    match s {
        "off" => Ok(TunnelPort(None)),
        port => {
            port.parse().map(|p| TunnelPort(Some(p))).map_err(|_| format!("{s:?} is neither a TCP port nor \"off\""))
        }
    }
}

/// The LCA allocator: starts instances of registered services on this machine
/// when peers ask for them, and culls idle ones.
#[derive(Parser, Debug)]
#[command(name = "allocator", version)]
pub struct AllocatorCli {
    #[command(flatten)]
    pub net: NetArgs,
    /// Prometheus metrics address (:PORT, PORT or IP:PORT)
    #[arg(long, value_name = "ADDR", default_value = ":9101")]
    pub metrics: String,
    /// Directory for instance keys and logs [default: a fresh directory in $TMPDIR]
    #[arg(long, value_name = "DIR")]
    pub instance_dir: Option<PathBuf>,
    /// Address instances listen on for P2P and are announced at
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub instance_ip: IpAddr,
    /// Most instances run at once
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_instances: usize,
    /// Stop instances idle for longer than this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub idle_limit: u64,
    /// Ask instances how long they have been idle every this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub cull_interval: u64,
    /// Give up on an instance not reachable within this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub start_timeout: u64,
    /// The operator's grant naming this allocator (`physarum grant --peer PEER_ID`);
    /// without one its instances would not be trusted, so it is required
    #[arg(long, value_name = "FILE")]
    pub grant: PathBuf,
    /// A directory whose programs services may run; repeatable (none: only images)
    #[arg(long = "exec-root", value_name = "DIR")]
    pub exec_root: Vec<PathBuf>,
    /// The user instances run as when the allocator runs as root
    #[arg(long, value_name = "USER", default_value = "nobody")]
    pub run_as: String,
    /// How instances run: registered executables as child processes, or
    /// registered images as Docker containers (host networking)
    #[arg(long, value_enum, default_value_t = DriverKind::Process)]
    pub driver: DriverKind,
}

/// The allocator's instance driver.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Process,
    Docker,
}

/// The proxy: forwards `METHOD /<service>/<rest>` requests on 127.0.0.1:PORT to an
/// instance of <service>, finding or allocating one. With SERVICE and ADDRESS it
/// also serves that service (service mode): it advertises it and forwards tunnelled
/// requests to ADDRESS.
#[derive(Parser, Debug)]
#[command(name = "proxy", version)]
pub struct ProxyCli {
    #[command(flatten)]
    pub net: NetArgs,
    /// Address the HTTP proxy listens on
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// How long a resolved service name is trusted, in seconds
    #[arg(long = "rcache-ttl", value_name = "SECS", default_value_t = 3600)]
    pub rcache_ttl: u64,
    /// Prometheus metrics address in anonymous mode (service mode uses METRICS_PORT)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// HTTP port to listen on
    #[arg(value_name = "PORT")]
    pub port: u16,
    /// Service mode: the registered name of the service this proxy serves
    #[arg(value_name = "SERVICE", requires = "address")]
    pub service: Option<String>,
    /// Service mode: where the service listens: IP (port 8080) or IP:PORT
    #[arg(value_name = "ADDRESS", value_parser = parse_service_address)]
    pub address: Option<SocketAddr>,
    /// Service mode: port of the metrics endpoint (also reports idle time)
    #[arg(value_name = "METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Service mode, started by hand: certify this sidecar with an operator key
    /// (instances an allocator starts are certified by the allocator)
    #[arg(long, value_name = "KEYFILE", requires = "service")]
    pub operator_key: Option<PathBuf>,
}

/// The registry service: maps service names to what runs them, persisted in DATA_DIR.
#[derive(Parser, Debug)]
#[command(name = "registry", version)]
pub struct RegistryCli {
    #[command(flatten)]
    pub net: NetArgs,
    /// Where the registry keeps its data (registry.json) and, by default, its key
    #[arg(long, value_name = "DIR", default_value = "registry-data")]
    pub data_dir: PathBuf,
    /// Where entries are kept: "embedded" (registry.json in --data-dir) or an etcd
    /// cluster shared by several registries, etcd://HOST:PORT[,HOST:PORT...]
    #[arg(long, value_name = "STORE", default_value = "embedded")]
    pub store: crate::store::StoreSpec,
    /// Prometheus metrics address
    #[arg(long, value_name = "ADDR", default_value = ":9102")]
    pub metrics: String,
}

/// A bootstrap node: a DHT server everybody joins through; pings its peers and
/// exports their RTTs as metrics.
#[derive(Parser, Debug)]
#[command(name = "bootstrap", version)]
pub struct BootstrapCli {
    #[command(flatten)]
    pub net: NetArgs,
    /// Prometheus metrics address
    #[arg(long, value_name = "ADDR", default_value = ":9100")]
    pub metrics: String,
    /// Ping every connected peer this often, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub ping_interval: u64,
}

/// The demo service: answers `Hello, world`.
#[derive(Parser, Debug)]
#[command(name = "hello", version)]
pub struct HelloCli {
    /// Port to listen on
    #[arg(long, env = "SERVICE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub bind: IpAddr,
}

/// physarum: decentralized service discovery and on-demand allocation.
#[derive(Parser, Debug)]
#[command(name = "physarum", version)]
pub struct PhysarumCli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage the service registry
    Registry {
        #[command(flatten)]
        net: NetArgs,
        /// Give up after this many seconds
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        timeout: u64,
        #[command(subcommand)]
        op: RegistryOp,
    },
    /// Run a whole cluster on this machine: bootstrap, registry, allocators and a proxy
    Dev(DevArgs),
    /// Measure the data plane beside nginx, cold start, discovery, failover,
    /// footprint and simulation speed on loopback; print one Markdown table
    Bench(BenchArgs),
    /// Run the allocator (as the `allocator` binary)
    Allocator(AllocatorCli),
    /// Run a proxy (as the `proxy` binary); `l4-proxy` is the same, as the original named it
    #[command(alias = "l4-proxy")]
    Proxy(ProxyCli),
    /// Run the registry service (as the `registry` binary)
    RegistryService(RegistryCli),
    /// Run a bootstrap node (as the `bootstrap` binary)
    Bootstrap(BootstrapCli),
    /// Run the demo service (as the `hello` binary)
    Hello(HelloCli),
    /// Run the TCP demo service: every byte back on its connection
    TcpEcho(HelloCli),
    /// Run the UDP demo service: every datagram back to its sender
    UdpEcho(HelloCli),
    /// L4 mappings through a proxy
    L4 {
        #[command(subcommand)]
        op: L4Op,
    },
    /// Make an operator key, or print the public key of one
    Keygen {
        /// Write a new operator key to FILE (mode 0600) and print its public key
        #[arg(long, value_name = "FILE", conflicts_with = "public", required_unless_present = "public")]
        out: Option<PathBuf>,
        /// Print the public key of the operator key in FILE
        #[arg(long, value_name = "FILE")]
        public: Option<PathBuf>,
    },
    /// Grant an allocator the right to start instances (prints the grant, or writes it to --out)
    Grant {
        #[arg(long, value_name = "KEYFILE")]
        operator_key: PathBuf,
        /// The allocator's peer id (its log prints it at start)
        #[arg(long, value_name = "PEER_ID")]
        peer: String,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum L4Op {
    /// Map a local port to a service, or a chain of services, and print its address:
    /// `physarum l4 map tcp SERVICE`, `physarum l4 map udp S1 S2`, `physarum l4 map tcp S1 udp S2`
    Map {
        /// The proxy's HTTP address
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:4200")]
        proxy: std::net::SocketAddr,
        /// Give up after this many seconds (a chain may allocate instances first)
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
        /// `tcp` or `udp`, then services; a protocol word applies to the services after it
        #[arg(required = true, num_args = 2.., value_name = "PROTO SERVICE")]
        chain: Vec<String>,
    },
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    /// Register (or replace) a service from a service config file
    Add {
        /// Service config JSON (NetworkSoftReq, NetworkHardReq, CpuReq, MemoryReq, Exec or Image)
        #[arg(value_name = "SERVICE_CONFIG")]
        config: PathBuf,
        /// Service name (overrides the config's "Name")
        #[arg(long)]
        name: Option<String>,
        /// The operator key that signs the entry
        #[arg(long, value_name = "KEYFILE")]
        operator_key: PathBuf,
    },
    /// Show a service
    Get { name: String },
    /// List all services
    List,
    /// Remove a service
    Rm {
        name: String,
        /// The operator key that signs the removal
        #[arg(long, value_name = "KEYFILE")]
        operator_key: PathBuf,
    },
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BenchArgs {
    /// Seconds of each load measurement (each wrk run; the failover's steady GETs
    /// after the kill, 2 to 10)
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub duration: u64,
    /// Interleaved rounds of the proxy-overhead runs; the table shows their median
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Cold-start runs (each a service with no instance yet)
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub cold_runs: usize,
    /// Cluster sizes (physarum nodes) of the discovery measurement, comma-separated
    #[arg(long, value_name = "N,N,..", default_value = "5,20,50")]
    pub discovery: String,
    /// Fresh client proxies timed per cluster size
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub discovery_samples: usize,
    /// Run only these sections, comma-separated: footprint, proxy, cold, discovery, failover, sim
    #[arg(long, value_name = "LIST")]
    pub only: Option<String>,
    /// The scenario whose simulation speed is measured [default: the repository's
    /// scenarios/twenty-nodes-10min.json]
    #[arg(long, value_name = "FILE")]
    pub sim_scenario: Option<PathBuf>,
    /// Also write the report to FILE
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Run the daemons from this `physarum` executable instead of this one (to
    /// compare two builds with the same bench)
    #[arg(long, value_name = "EXE")]
    pub daemons: Option<PathBuf>,
    /// Keep the temporary directory with every daemon's log
    #[arg(long)]
    pub keep: bool,
    /// Passed on to every daemon (`off`: tunnels as streams inside the P2P
    /// connections, to compare the two data planes)
    #[arg(long, value_name = "PORT|off")]
    pub tunnel_port: Option<String>,
}

impl BenchArgs {
    /// The options as given, to print with the results.
    pub fn command_line(&self) -> String {
        let mut s = format!(
            "--duration {} --rounds {} --cold-runs {} --discovery {} --discovery-samples {}",
            self.duration, self.rounds, self.cold_runs, self.discovery, self.discovery_samples
        );
        if let Some(only) = &self.only {
            s.push_str(&format!(" --only {only}"));
        }
        if let Some(port) = &self.tunnel_port {
            s.push_str(&format!(" --tunnel-port {port}"));
        }
        s
    }
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct DevArgs {
    /// Port of the anonymous proxy
    #[arg(long, default_value_t = 4200)]
    pub port: u16,
    /// Number of allocators
    #[arg(long, default_value_t = 1)]
    pub allocators: usize,
    /// Registry data directory [default: a temporary directory, removed at exit]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Private network passphrase for the cluster [default: none]
    #[arg(long, value_name = "PASSPHRASE")]
    pub psk: Option<String>,
    /// How the allocators run instances: `docker` builds the demo image when it is
    /// missing (images/build.sh) and registers it instead of the executable
    #[arg(long, value_enum, default_value_t = DriverKind::Process)]
    pub driver: DriverKind,
}

/// ADDRESS of the proxy's service mode: an IP (port 8080), or IP:PORT; `localhost` is 127.0.0.1.
pub fn parse_service_address(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let s = s.strip_prefix("localhost").map(|rest| format!("127.0.0.1{rest}")).unwrap_or_else(|| s.to_string());
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 8080));
    }
    Err(format!("invalid service address {s:?}: expected an IP address, or IP:PORT"))
}

/// An operator public key on the command line.
pub fn parse_public_key(s: &str) -> Result<PublicKey, String> {
    s.parse()
}

/// The default P2P listen address.
pub fn default_listen() -> String {
    format!("/ip4/{}/tcp/0", Ipv4Addr::UNSPECIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_line_is_well_formed() {
        AllocatorCli::command().debug_assert();
        ProxyCli::command().debug_assert();
        RegistryCli::command().debug_assert();
        BootstrapCli::command().debug_assert();
        HelloCli::command().debug_assert();
        PhysarumCli::command().debug_assert();
    }

    #[test]
    fn allocator_options_are_the_originals() {
        let a = AllocatorCli::try_parse_from([
            "allocator",
            "--configfile",
            "c.json",
            "--bootstrap",
            "/ip4/1.2.3.4/tcp/1/p2p/A",
            "--bootstrap",
            "/ip4/1.2.3.4/tcp/2/p2p/B",
            "--psk",
            "pw",
            "--key",
            "k",
            "--grant",
            "g.json",
        ])
        .unwrap();
        assert_eq!(a.net.configfile, Some(PathBuf::from("c.json")));
        assert_eq!(a.net.bootstrap.len(), 2);
        assert_eq!(a.net.psk.as_deref(), Some("pw"));
        assert_eq!(a.net.key, Some(PathBuf::from("k")));
        assert_eq!(a.metrics, ":9101");
        assert_eq!(a.driver, DriverKind::Process);
        let a = AllocatorCli::try_parse_from(["allocator", "--grant", "g", "--driver", "docker"]).unwrap();
        assert_eq!(a.driver, DriverKind::Docker);
        assert!(AllocatorCli::try_parse_from(["allocator", "--grant", "g", "--driver", "vm"]).is_err());
    }

    #[test]
    fn proxy_modes_parse() {
        let p = ProxyCli::try_parse_from(["proxy", "1234"]).unwrap();
        assert_eq!((p.port, p.service.as_deref(), p.address), (1234, None, None));
        assert_eq!(p.rcache_ttl, 3600);
        assert_eq!(p.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let p = ProxyCli::try_parse_from(["proxy", "1234", "hello-world-server", "10.11.17.10"]).unwrap();
        assert_eq!(p.service.as_deref(), Some("hello-world-server"));
        assert_eq!(p.address, Some("10.11.17.10:8080".parse().unwrap()));
        let p = ProxyCli::try_parse_from(["proxy", "--rcache-ttl", "5", "1", "s", "127.0.0.1:9", "7"]).unwrap();
        assert_eq!((p.rcache_ttl, p.address, p.metrics_port), (5, Some("127.0.0.1:9".parse().unwrap()), Some(7)));
        // SERVICE needs ADDRESS; bad ports and addresses are refused.
        assert!(ProxyCli::try_parse_from(["proxy", "1", "s"]).is_err());
        assert!(ProxyCli::try_parse_from(["proxy", "70000"]).is_err());
        assert!(ProxyCli::try_parse_from(["proxy", "1", "s", "not-an-ip"]).is_err());
        assert!(ProxyCli::try_parse_from(["proxy"]).is_err());
    }

    #[test]
    fn service_addresses() {
        assert_eq!(parse_service_address("10.0.0.1").unwrap(), "10.0.0.1:8080".parse().unwrap());
        assert_eq!(parse_service_address("10.0.0.1:81").unwrap(), "10.0.0.1:81".parse().unwrap());
        assert_eq!(parse_service_address("localhost").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(parse_service_address("localhost:3").unwrap(), "127.0.0.1:3".parse().unwrap());
        assert_eq!(parse_service_address("[::1]:3").unwrap(), "[::1]:3".parse().unwrap());
        assert!(parse_service_address("10.0.0.1:99999").is_err());
        assert!(parse_service_address("").is_err());
    }

    #[test]
    fn physarum_subcommands_parse() {
        let c = PhysarumCli::try_parse_from([
            "physarum",
            "registry",
            "add",
            "svc.json",
            "--name",
            "x",
            "--operator-key",
            "op.key",
        ])
        .unwrap();
        match c.command {
            Command::Registry { op, .. } => assert_eq!(
                op,
                RegistryOp::Add { config: "svc.json".into(), name: Some("x".into()), operator_key: "op.key".into() }
            ),
            other => panic!("{other:?}"),
        }
        assert!(PhysarumCli::try_parse_from(["physarum", "registry", "add", "svc.json"]).is_err(), "unsigned add");
        let c = PhysarumCli::try_parse_from([
            "physarum",
            "registry",
            "--bootstrap",
            "/b",
            "rm",
            "x",
            "--operator-key",
            "k",
        ])
        .unwrap();
        assert!(
            matches!(c.command, Command::Registry { op: RegistryOp::Rm { .. }, ref net, .. } if net.bootstrap == ["/b"])
        );
        let c = PhysarumCli::try_parse_from(["physarum", "dev", "--allocators", "2"]).unwrap();
        assert!(matches!(c.command, Command::Dev(DevArgs { allocators: 2, port: 4200, .. })));
        assert!(PhysarumCli::try_parse_from(["physarum", "registry", "frobnicate"]).is_err());
        // Every daemon is also a subcommand, with the same options.
        let c = PhysarumCli::try_parse_from(["physarum", "proxy", "--rcache-ttl", "9", "1234", "svc", "127.0.0.1"])
            .unwrap();
        assert!(matches!(c.command, Command::Proxy(ProxyCli { port: 1234, rcache_ttl: 9, .. })));
        let c = PhysarumCli::try_parse_from(["physarum", "registry-service", "--data-dir", "d"]).unwrap();
        assert!(
            matches!(c.command, Command::RegistryService(RegistryCli { ref data_dir, .. }) if data_dir.as_os_str() == "d")
        );
        let c = PhysarumCli::try_parse_from(["physarum", "allocator", "--metrics", ":1", "--grant", "g"]).unwrap();
        assert!(matches!(c.command, Command::Allocator(AllocatorCli { ref metrics, .. }) if metrics == ":1"));
        assert!(PhysarumCli::try_parse_from(["physarum", "bootstrap"]).is_ok());
        assert!(PhysarumCli::try_parse_from(["physarum", "hello", "--port", "1"]).is_ok());
        assert!(PhysarumCli::try_parse_from(["physarum", "allocator"]).is_err(), "an allocator needs a grant");
        assert!(PhysarumCli::try_parse_from(["physarum", "keygen", "--out", "k"]).is_ok());
        assert!(PhysarumCli::try_parse_from(["physarum", "keygen"]).is_err());
        let key = "00".repeat(32);
        assert!(PhysarumCli::try_parse_from(["physarum", "proxy", "--operator", "abc", "1"]).is_err(), "bad key");
        let _ = key;
    }

    #[test]
    fn hello_port() {
        let h = HelloCli::try_parse_from(["hello", "--port", "9"]).unwrap();
        assert_eq!(h.port, 9);
    }
}
