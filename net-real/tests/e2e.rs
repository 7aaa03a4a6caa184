//! The production stack in one process: libp2p nodes on 127.0.0.1 (port 0), each
//! running the core's `Node` through the shared runtime. A bootstrap, a registry, an
//! instance proxy in service mode in front of a tiny HTTP app, and a client proxy
//! whose front end is asked for `/hello/...`: registry lookup, DHT discovery, probes,
//! routing and the tunnel all happen for real.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use libp2p::identity::Keypair;
use physarum_core::config::NodeConfig;
use physarum_core::perf::{PerfLimits, Requirements};
use physarum_core::trust::{Issuer, Operators, SecretKey, SignedEntry, TrustConfig};
use physarum_core::types::{ContentHash, RunSpec, ServiceInfo};
use physarum_net_real::{Backoff, P2p, P2pOptions};
use physarum_runtime::transport::TcpConnector;
use physarum_runtime::{NodeRuntime, Running, RuntimeConfig, Transport};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn opts(bootstraps: Vec<libp2p::Multiaddr>) -> P2pOptions {
    let mut o = P2pOptions::new(Keypair::generate_ed25519());
    o.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    o.bootstraps = bootstraps;
    o.backoff = Backoff { initial: Duration::from_millis(50), startup_attempts: 3, cap: Duration::from_secs(1) };
    o.handshake_timeout = Duration::from_secs(1);
    o
}

fn requirements() -> Requirements {
    Requirements {
        soft: PerfLimits::rtt(Duration::from_millis(100)),
        hard: PerfLimits::rtt(Duration::from_millis(1000)),
    }
}

/// The operator every node of these clusters trusts.
fn operator() -> SecretKey {
    SecretKey::from_bytes([1; 32])
}

fn hello_entry() -> SignedEntry {
    SignedEntry::sign("hello".into(), 1, Some(hello_info()), &operator())
}

fn hello_info() -> ServiceInfo {
    ServiceInfo {
        name: "hello".into(),
        hash: ContentHash("hello-hash".into()),
        run: RunSpec::Exec { program: "hello".into(), args: vec![], env: vec![] },
        requirements: Requirements::default(),
        cpu_millis: 0,
        memory_mb: 0,
        stateful: false,
        client_mode: false,
    }
}

async fn start(bootstraps: Vec<libp2p::Multiaddr>, configure: impl FnOnce(&mut NodeConfig)) -> (P2p, NodeRuntime<P2p>) {
    let (p2p, inbound) = P2p::start(opts(bootstraps)).await.unwrap();
    let mut config = NodeConfig::new(p2p.local_peer(), requirements());
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    config.trust = TrustConfig::new(Operators::new(vec![operator().public()]), unix);
    configure(&mut config);
    let rt = NodeRuntime::new(config, 7, p2p.clone(), inbound, RuntimeConfig::default());
    (p2p, rt)
}

type AppBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// `n` bytes of 7s, generated chunk by chunk as the reader asks for them.
fn download(n: usize) -> AppBody {
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let frames = futures::stream::iter((0..n.div_ceil(chunk.len())).map(move |i| {
        let len = chunk.len().min(n - i * chunk.len());
        Ok::<_, Infallible>(hyper::body::Frame::data(chunk.slice(..len)))
    }));
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// Peak resident memory of this process so far (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// GET `path` and count the body's bytes as they arrive.
async fn download_through(front: SocketAddr, path: &str) -> usize {
    let s = TcpStream::connect(front).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::task::spawn_local(conn);
    let req = Request::get(path).header("host", "x").body(Full::new(Bytes::new())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got += d.len();
        }
    }
    got
}

async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::task::spawn_local(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    if let Some(n) = pq.strip_prefix("/download?n=") {
                        return Ok::<_, Infallible>(Response::new(download(n.parse().unwrap())));
                    }
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let text = format!("Hello, world {pq} {}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)).boxed_unsync()))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

async fn post(front: SocketAddr, path: &str, body: &'static str) -> Result<(u16, String), String> {
    let s = TcpStream::connect(front).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.map_err(|e| e.to_string())?;
    tokio::task::spawn_local(conn);
    let req = Request::post(path).header("host", "proxy").body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

#[test]
fn a_request_reaches_an_instance_over_libp2p() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        tokio::time::timeout(Duration::from_secs(90), scenario()).await.expect("test timed out");
    });
}

struct Cluster {
    front: SocketAddr,
    app: SocketAddr,
    client: P2p,
    instance: P2p,
    _boot: P2p,
    _running: Vec<Running<P2p>>,
}

async fn cluster() -> Cluster {
    let (boot, _boot_inbound) = P2p::start(opts(vec![])).await.unwrap();
    let boots = boot.dial_addrs();
    let mut running: Vec<Running<P2p>> = Vec::new();

    let (_r, reg) = start(boots.clone(), |c| c.registry = Some(vec![hello_entry()])).await;
    running.push(reg.spawn());

    let app = app().await;
    let (instance, inst) = start(boots.clone(), |c| {
        c.serve = Some("hello".into());
        c.trust.issuer = Some(Issuer::operator(operator()));
    })
    .await;
    running.push(inst.with_app(TcpConnector(app)).spawn());

    let (client, rt) = start(boots.clone(), |_| {}).await;
    let mut rt = rt.spawn();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    rt.serve_http(listener);
    running.push(rt);
    Cluster { front, app, client, instance, _boot: boot, _running: running }
}

/// Retry until the instance serves (advertisements take a moment to reach the DHT).
async fn first_request(front: SocketAddr) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = Instant::now();
    let mut last: String;
    loop {
        match post(front, "/hello/greet?x=1", "body!").await {
            Ok((200, text)) => {
                assert_eq!(text, "Hello, world /greet?x=1 body!");
                return first.elapsed();
            }
            Ok((status, text)) => last = format!("{status} {text}"),
            Err(e) => last = e,
        }
        assert!(Instant::now() < deadline, "never served; last answer: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario() {
    let c = cluster().await;
    eprintln!("first request served after {:?}", first_request(c.front).await);
    // Now from the peer cache.
    let t = Instant::now();
    let (status, text) = post(c.front, "/hello/again", "").await.unwrap();
    assert_eq!((status, text.as_str()), (200, "Hello, world /again "));
    eprintln!("cached request took {:?}", t.elapsed());
    // Unknown service: the registry says so.
    let (status, text) = post(c.front, "/nosuch/x", "").await.unwrap();
    assert_eq!(status, 404, "{text}");
    // 64 clients at once: the pool opens a burst of tunnel streams; none may be lost.
    let answers = futures::future::join_all((0..64).map(|i| async move {
        let path = format!("/hello/c{i}");
        post(c.front, &path, "").await
    }))
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a, Ok((200, format!("Hello, world /c{i} "))));
    }
    // A large download streams through both proxies and the libp2p tunnel.
    let n = 32 * 1024 * 1024 + 5;
    assert_eq!(download_through(c.front, &format!("/hello/download?n={n}")).await, n);
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    format!("p50 {:?} p99 {:?} (n={})", at(0.5), at(0.99), v.len())
}

async fn timed_requests(addr: SocketAddr, path: &str, n: usize) -> Vec<Duration> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::task::spawn_local(conn);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = Request::get(path).header("host", "x").body(Full::new(Bytes::new())).unwrap();
        let t = Instant::now();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        out.push(t.elapsed());
    }
    out
}

/// Not a test: measurements. Run with
/// `cargo test -p physarum-net-real --test e2e -- --ignored --nocapture measure`.
/// Every node runs on this one thread, so the proxied figures include the work of
/// both proxies and the app; compare them side by side, not with other machines.
#[test]
#[ignore]
fn measure_latency_and_probes() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let c = cluster().await;
        first_request(c.front).await;
        let n = 2000;
        let direct = timed_requests(c.app, "/x", n).await;
        let proxied = timed_requests(c.front, "/hello/x", n).await;
        eprintln!("direct to the app:        {}", percentiles(direct));
        eprintln!("through both proxies:     {}", percentiles(proxied));
        let mut probes = Vec::new();
        for _ in 0..500 {
            probes.push(c.client.probe(c.instance.peer_addr(), Duration::from_secs(1)).await.unwrap());
        }
        eprintln!("probe (wire Ping over request-response): {}", percentiles(probes));
        // libp2p ping's own measurement on the same connection (5 s interval).
        let deadline = Instant::now() + Duration::from_secs(12);
        let mut pings = Vec::new();
        while Instant::now() < deadline && pings.len() < 2 {
            if let Some((_, Some(rtt))) =
                c.client.connected_peers().into_iter().find(|(p, _)| *p == c.instance.peer_id())
            {
                if pings.last() != Some(&rtt) {
                    pings.push(rtt);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("libp2p ping samples on the same connection: {pings:?}");
        // Memory while 1 GiB streams through (app, both proxies and the client all
        // live in this process, so this bounds the proxies' share from above).
        let before = peak_rss_kib();
        let n = 1usize << 30;
        let t = Instant::now();
        assert_eq!(download_through(c.front, &format!("/hello/download?n={n}")).await, n);
        let took = t.elapsed();
        eprintln!(
            "1 GiB through both proxies in {took:?} ({:.0} MiB/s); peak RSS {} MiB before, {} MiB after",
            1024.0 / took.as_secs_f64(),
            before / 1024,
            peak_rss_kib() / 1024
        );
    });
}
