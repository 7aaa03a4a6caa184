//! Front end + tunnel over in-memory streams and loopback TCP, with a fake network
//! and a fake core (no libp2p, no `Node`).

use crate::front::{self, FrontCtx};
use crate::node_loop::{Command, NodeHandle, RuntimeConfig};
use crate::transport::{InboundTunnel, TcpConnector, Transport};
use crate::tunnel::{self, TunnelPool};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use physarum_core::io::{Input, Outcome};
use physarum_core::trust::{Credentials, Issuer, Operators, SecretKey, SignedEntry, TrustConfig};
use physarum_core::types::{ContentHash, DhtKey, PeerAddr, PeerId};
use physarum_core::wire::{Request as WireRequest, Response as WireResponse};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::DuplexStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::LocalSet;

/// An in-memory network: `open_tunnel` makes a duplex pipe and hands the far end to
/// the named peer's tunnel server.
#[derive(Clone, Default)]
struct FakeNet {
    peers: Rc<RefCell<BTreeMap<String, mpsc::UnboundedSender<InboundTunnel<DuplexStream>>>>>,
    opened: Rc<Cell<usize>>,
    /// Silently drop the far end of this many next streams (libp2p-stream's failure mode).
    drop_next: Rc<Cell<usize>>,
    advertised: Rc<RefCell<Vec<DhtKey>>>,
}

impl Transport for FakeNet {
    type Stream = DuplexStream;
    fn local_peer(&self) -> PeerId {
        PeerId("A".into())
    }
    async fn find_providers(&self, _: DhtKey, _: Duration) -> Result<Vec<PeerAddr>, String> {
        Ok(vec![])
    }
    async fn advertise(&self, key: DhtKey) -> Result<(), String> {
        self.advertised.borrow_mut().push(key);
        Ok(())
    }
    async fn probe(&self, _: PeerAddr, _: Duration) -> Result<Duration, String> {
        Ok(Duration::from_millis(1))
    }
    async fn send_request(&self, _: PeerAddr, _: WireRequest, _: Duration) -> Result<WireResponse, String> {
        Err("no".into())
    }
    async fn open_tunnel(&self, peer: PeerAddr) -> Result<DuplexStream, String> {
        self.opened.set(self.opened.get() + 1);
        let (near, far) = tokio::io::duplex(64 * 1024);
        if self.drop_next.get() > 0 {
            self.drop_next.set(self.drop_next.get() - 1);
            drop(far);
            return Ok(near);
        }
        let peers = self.peers.borrow();
        let tx = peers.get(&peer.peer.0).ok_or("unknown peer")?;
        tx.send(InboundTunnel { from: PeerId("A".into()), stream: far }).map_err(|_| "peer gone".to_string())?;
        Ok(near)
    }
}

/// The application: echoes what it got, or streams a download on `/download?n=BYTES`,
/// or sends one chunk and waits on `/gated` until the test releases the rest.
async fn start_app(gate: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let gate = gate.clone();
            tokio::task::spawn_local(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let gate = gate.clone();
                    async move { Ok::<_, Infallible>(app(req, gate).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

type AppBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn app(req: Request<Incoming>, gate: std::sync::Arc<tokio::sync::Notify>) -> Response<AppBody> {
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    if let Some(n) = path.strip_prefix("/download?n=") {
        let n: usize = n.parse().unwrap();
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let frames = futures::stream::iter((0..n.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(n - i * chunk.len());
            Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
        }));
        return Response::new(StreamBody::new(frames).boxed_unsync());
    }
    if path == "/hang" {
        // Takes the request and never answers: a dead instance or a silently dead link.
        std::future::pending::<()>().await;
    }
    if path == "/gated" {
        let first = futures::stream::once(async { Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first;"))) });
        let rest = futures::stream::once(async move {
            gate.notified().await;
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"rest")))
        });
        return Response::new(StreamBody::new(futures::StreamExt::chain(first, rest)).boxed_unsync());
    }
    let method = req.method().to_string();
    let secret = req.headers().contains_key("x-secret");
    let kept = req.headers().get("x-kept").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let sum: u64 = body.iter().map(|&b| b as u64).sum();
    let text = format!("{method} {path} len={} sum={sum} secret={secret} kept={kept}", body.len());
    let mut resp = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    resp.headers_mut().insert("connection", "x-app-private".parse().unwrap());
    resp.headers_mut().insert("x-app-private", "1".parse().unwrap());
    resp
}

/// The operator every test node trusts.
fn operator() -> SecretKey {
    SecretKey::from_bytes([1; 32])
}

fn trust() -> TrustConfig {
    TrustConfig::new(Operators::new(vec![operator().public()]), 0)
}

/// Credentials for `peer` serving `hash`, signed by `by`.
fn credentials(by: &SecretKey, peer: &str, hash: &str) -> Credentials {
    Issuer::operator(by.clone()).issue(PeerId(peer.into()), ContentHash(hash.into()), u64::MAX)
}

fn new_pool(net: &FakeNet) -> Rc<TunnelPool<FakeNet>> {
    Rc::new(TunnelPool::new(net.clone(), &RuntimeConfig::default(), trust(), tokio::time::Instant::now()))
}

/// Instance proxy `peer` on `net`: serves `service` by forwarding to `app`, showing `creds`.
fn serve_as<C: crate::transport::Connector>(
    net: &FakeNet,
    peer: &str,
    service: &str,
    app: C,
    creds: Option<Credentials>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    net.peers.borrow_mut().insert(peer.into(), tx);
    let (handle, mut cmds) = NodeHandle::for_test(PeerId(peer.into()));
    tokio::task::spawn_local(async move { while cmds.recv().await.is_some() {} });
    let cell = Rc::new(RefCell::new(creds));
    let config = RuntimeConfig::default();
    let limits = Rc::new(crate::limits::Limits::new(&config));
    let l4 = Rc::new(crate::l4::L4Ctx::new(handle, new_pool(net), limits, config.l4, Some(Rc::from(service))));
    tokio::task::spawn_local(tunnel::serve_tunnels(rx, l4, app, cell, Duration::from_secs(5)));
}

/// Instance proxy "B" on `net`: serves `hello` by forwarding to the app at `app`.
fn serve_hello_as_b(net: &FakeNet, app: SocketAddr) {
    serve_as(net, "B", "hello", TcpConnector(app), Some(credentials(&operator(), "B", "hash-hello")));
}

/// Connects to the app at a fixed address, counting the connections it makes.
#[derive(Clone)]
struct CountingConnector(SocketAddr, Rc<Cell<usize>>);

impl crate::transport::Connector for CountingConnector {
    type Conn = TcpStream;
    async fn connect(&self) -> std::io::Result<TcpStream> {
        self.1.set(self.1.get() + 1);
        TcpStream::connect(self.0).await
    }
}

struct Harness {
    front: SocketAddr,
    net: FakeNet,
    route_failures: Rc<RefCell<Vec<(PeerId, String)>>>,
    /// Peers reported to the core as untrusted.
    untrusted: Rc<RefCell<Vec<PeerId>>>,
    /// Connections the impostors made to their application (they must make none).
    impostor_app_connections: Rc<Cell<usize>>,
    gate: std::sync::Arc<tokio::sync::Notify>,
    pool: Rc<TunnelPool<FakeNet>>,
    /// When set, the next `hello` is routed to a peer that no longer exists (a cached
    /// instance that died), as the real core would before it learns of the death.
    next_hello_to_dead: Rc<Cell<bool>>,
}

/// Proxy "A" (front end + fake core) and instance proxy "B" (serving `hello`,
/// forwarding to the app). Services: `hello` → B; `wrong` → B (which rejects the
/// hello); `gone` → 404; `ghost` → a peer that does not exist.
async fn harness() -> Harness {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let app_addr = start_app(gate.clone()).await;
    let net = FakeNet::default();
    serve_hello_as_b(&net, app_addr);
    // Impostors of the service with hash `hash-hello` (named `impostors` in the path):
    // no credentials, a stranger's, and B's (copied) credentials; B2 is genuine.
    let impostor_app_connections = Rc::new(Cell::new(0));
    let stranger = SecretKey::from_bytes([66; 32]);
    let impostors = [
        ("bare", None),
        ("self-signed", Some(credentials(&stranger, "self-signed", "hash-hello"))),
        ("copycat", Some(credentials(&operator(), "B", "hash-hello"))),
    ];
    for (name, creds) in impostors {
        serve_as(&net, name, "impostors", CountingConnector(app_addr, impostor_app_connections.clone()), creds);
    }
    let genuine = Some(credentials(&operator(), "B2", "hash-hello"));
    serve_as(&net, "B2", "impostors", TcpConnector(app_addr), genuine);

    let (a_handle, mut a_cmds) = NodeHandle::for_test(PeerId("A".into()));
    let route_failures = Rc::new(RefCell::new(Vec::new()));
    let failures = route_failures.clone();
    let untrusted = Rc::new(RefCell::new(Vec::new()));
    let untrusted_seen = untrusted.clone();
    let mut impostor_turn = 0;
    let next_hello_to_dead = Rc::new(Cell::new(false));
    let to_dead = next_hello_to_dead.clone();
    tokio::task::spawn_local(async move {
        while let Some(cmd) = a_cmds.recv().await {
            match cmd {
                Command::Http { service, reply, .. } => {
                    let to = |peer: &str| Outcome::Route {
                        instance: PeerAddr::new(peer, vec![]),
                        service: ContentHash(format!("hash-{service}")),
                        try_timeout: Duration::from_secs(10),
                    };
                    let outcome = match service.as_str() {
                        "hello" if to_dead.replace(false) => to("dead"),
                        // The core offers each impostor in turn, then the real instance.
                        "impostors" => {
                            impostor_turn += 1;
                            let peer = ["bare", "self-signed", "copycat"].get(impostor_turn - 1).unwrap_or(&"B2");
                            Outcome::Route {
                                instance: PeerAddr::new(*peer, vec![]),
                                service: ContentHash("hash-hello".into()),
                                try_timeout: Duration::from_secs(10),
                            }
                        }
                        "hello" | "wrong" => to("B"),
                        "ghost" => to("nobody"),
                        _ => Outcome::Fail { status: 404, reason: format!("unknown service {service}") },
                    };
                    let _ = reply.send(outcome);
                }
                Command::Input(Input::RouteFailed { peer, reason, .. }) => failures.borrow_mut().push((peer, reason)),
                Command::Input(Input::Untrusted { peer, .. }) => untrusted_seen.borrow_mut().push(peer),
                Command::Input(_) => {}
            }
        }
    });
    let pool = new_pool(&net);
    let config = RuntimeConfig::default();
    let limits = Rc::new(crate::limits::Limits::new(&config));
    let l4 = Rc::new(crate::l4::L4Ctx::new(a_handle.clone(), pool.clone(), limits.clone(), config.l4, None));
    let ctx = Rc::new(FrontCtx {
        handle: a_handle,
        l4,
        pool: pool.clone(),
        observer: Rc::new(()),
        request_deadline: Duration::from_secs(5),
        limits,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    tokio::task::spawn_local(front::serve(listener, ctx));
    Harness { front, net, route_failures, untrusted, impostor_app_connections, gate, pool, next_hello_to_dead }
}

async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<AppBody> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::task::spawn_local(conn);
    sender
}

fn get(path: &str) -> Request<AppBody> {
    Request::get(path).header("host", "proxy").body(Full::new(Bytes::new()).boxed_unsync()).unwrap()
}

async fn text(resp: Response<Incoming>) -> String {
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// Run `f` on a current_thread runtime inside a LocalSet, bounded in time; every
/// task it spawned dies with the LocalSet.
fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = LocalSet::new();
    rt.block_on(local.run_until(async {
        tokio::time::timeout(Duration::from_secs(60), f).await.expect("test timed out");
    }));
}

#[test]
fn get_with_query_and_headers_is_forwarded_and_hop_by_hop_headers_are_dropped() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        let req = Request::get("/hello/a/b?x=1&y=%20z")
            .header("connection", "x-secret")
            .header("x-secret", "1")
            .header("x-kept", "yes")
            .body(Full::new(Bytes::new()).boxed_unsync())
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp.headers().contains_key("x-app-private"));
        assert_eq!(text(resp).await, "GET /a/b?x=1&y=%20z len=0 sum=0 secret=false kept=yes");
        // Bare service path → "/".
        let resp = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(text(resp).await, "GET / len=0 sum=0 secret=false kept=");
    });
}

#[test]
fn a_post_body_streams_through_intact() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        let n = 8 * 1024 * 1024 + 17;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let sum: u64 = data.iter().map(|&b| b as u64).sum();
        let frames = futures::stream::iter(
            data.chunks(100_000)
                .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(c))))
                .collect::<Vec<_>>(),
        );
        let req = Request::post("/hello/upload").body(StreamBody::new(frames).boxed_unsync()).unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(text(resp).await, format!("POST /upload len={n} sum={sum} secret=false kept="));
    });
}

#[test]
fn a_large_download_streams_and_is_not_buffered_whole() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        // Streaming: the first chunk arrives while the app still holds back the rest.
        let resp = c.send_request(get("/hello/gated")).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first;");
        h.gate.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"rest");
        // Volume: 64 MiB through, counted chunk by chunk.
        let n = 64 * 1024 * 1024 + 3;
        let resp = c.send_request(get(&format!("/hello/download?n={n}"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                assert!(d.iter().all(|&b| b == 7));
                got += d.len();
            }
        }
        assert_eq!(got, n);
    });
}

#[test]
fn streams_are_reused_across_requests() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        for i in 0..5 {
            let resp = c.send_request(get(&format!("/hello/r{i}"))).await.unwrap();
            assert_eq!(resp.status(), 200);
            text(resp).await;
            // Wait for the stream to be back in the pool before the next request.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while h.pool.idle_count(&PeerId("B".into()), "hello") == 0 {
                assert!(tokio::time::Instant::now() < deadline, "stream never returned to the pool");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(h.net.opened.get(), 1);
    });
}

#[test]
fn a_stream_dropped_silently_on_first_use_is_retried_on_a_fresh_one() {
    run(async {
        let h = harness().await;
        h.net.drop_next.set(1);
        let mut c = client(h.front).await;
        let resp = c.send_request(get("/hello/x")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(h.net.opened.get(), 2);
        assert!(h.route_failures.borrow().is_empty());
    });
}

#[test]
fn core_failures_and_bad_paths_get_a_status_and_a_plain_text_reason() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        let resp = c.send_request(get("/gone/x")).await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(text(resp).await, "unknown service gone\n");
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), 400);
        assert!(text(resp).await.contains("/<service>/<path>"));
    });
}

#[test]
fn a_failure_to_forward_answers_502_and_reports_the_peer() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        // B serves `hello`, so it rejects a tunnel for `wrong`.
        let resp = c.send_request(get("/wrong/x")).await.unwrap();
        assert_eq!(resp.status(), 502);
        let body = text(resp).await;
        assert!(body.contains("rejected") && body.contains("hello"), "{body}");
        // No such peer at all.
        let resp = c.send_request(get("/ghost/x")).await.unwrap();
        assert_eq!(resp.status(), 502);
        // Nothing was sent either time, so the core was asked once more, and the
        // (fake) core chose the same bad peer again.
        let failures = h.route_failures.borrow();
        let peers: Vec<&str> = failures.iter().map(|(p, _)| p.0.as_str()).collect();
        assert_eq!(peers, vec!["B", "B", "nobody", "nobody"]);
    });
}

#[test]
fn an_unreachable_application_is_a_502_from_the_instance() {
    run(async {
        // An address nothing listens on: bind, note, close.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let net = FakeNet::default();
        serve_hello_as_b(&net, dead);
        let pool = new_pool(&net);
        let req = Request::get("/x").body(empty_incoming().await.into()).unwrap();
        let resp =
            pool.send(&PeerAddr::new("B", vec![]), "hello", &ContentHash("hash-hello".into()), req).await.unwrap();
        assert_eq!(resp.status(), 502);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("cannot reach the service"));
    });
}

/// An empty `Incoming` body (only hyper makes those): a request through a tiny
/// in-memory server that hands its body out.
async fn empty_incoming() -> Incoming {
    let (a, b) = tokio::io::duplex(1024);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Rc::new(RefCell::new(Some(tx)));
    tokio::task::spawn_local(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.borrow_mut().take() {
                let _ = tx.send(req.into_body());
            }
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(b), svc).await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(a)).await.unwrap();
    tokio::task::spawn_local(conn);
    tokio::task::spawn_local(async move {
        let _ = sender.send_request(Request::get("/").body(Full::new(Bytes::new())).unwrap()).await;
    });
    rx.await.unwrap()
}

/// The node loop around the real core: a registry node advertises its rendezvous key,
/// answers a peer's request through the loop, and re-advertises on a bootstrap
/// (re)connect.
#[test]
fn the_node_loop_runs_the_core_answers_peers_and_executes_outputs() {
    use crate::node_loop::NodeRuntime;
    use crate::transport::{inbound_channel, InboundRequest, NetEvent};
    use physarum_core::config::NodeConfig;
    use physarum_core::perf::Requirements;
    use physarum_core::types::RunSpec;
    use physarum_core::types::ServiceInfo;
    run(async {
        let net = FakeNet::default();
        let (senders, inbound) = inbound_channel::<DuplexStream>();
        let info = ServiceInfo {
            name: "hello".into(),
            hash: ContentHash("h1".into()),
            run: RunSpec::Exec { program: "hello".into(), args: vec![], env: vec![] },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        };
        let mut config = NodeConfig::new(PeerId("A".into()), Requirements::default());
        let entry = SignedEntry::sign("hello".into(), 1, Some(info), &operator());
        config.registry = Some(vec![entry.clone()]);
        config.trust = trust();
        let running = NodeRuntime::new(config, 1, net.clone(), inbound, RuntimeConfig::default()).spawn();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !net.advertised.borrow().contains(&DhtKey::Registry) {
            assert!(tokio::time::Instant::now() < deadline, "never advertised");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = WireRequest::RegistryGet { name: "hello".into() };
        senders.requests.send(InboundRequest { from: PeerId("B".into()), request, reply }).unwrap();
        assert_eq!(answer.await.unwrap(), WireResponse::Entry { entry: Some(Box::new(entry)) });
        let before = net.advertised.borrow().len();
        senders.events.send(NetEvent::BootstrapConnected).unwrap();
        while net.advertised.borrow().len() == before {
            assert!(tokio::time::Instant::now() < deadline, "not re-advertised after a bootstrap connect");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(running);
    });
}

/// A network for the node loop around the real core: a registry peer `R` that knows
/// `hello`, one instance `B` of it, and probes that, once `hold_probes` is set, hang
/// until released (or the core's timeout).
#[derive(Clone, Default)]
struct ScriptedNet {
    info: Rc<RefCell<Option<physarum_core::types::ServiceInfo>>>,
    hold_probes: Rc<Cell<bool>>,
    release: std::sync::Arc<tokio::sync::Notify>,
    probes_pending: Rc<Cell<usize>>,
    probes_started: Rc<Cell<usize>>,
}

impl Transport for ScriptedNet {
    type Stream = DuplexStream;
    fn local_peer(&self) -> PeerId {
        PeerId("A".into())
    }
    async fn find_providers(&self, key: DhtKey, _: Duration) -> Result<Vec<PeerAddr>, String> {
        Ok(match key {
            DhtKey::Registry => vec![PeerAddr::new("R", vec![])],
            DhtKey::Service(_) => vec![PeerAddr::new("B", vec![])],
            DhtKey::Allocators => vec![],
        })
    }
    async fn advertise(&self, _: DhtKey) -> Result<(), String> {
        Ok(())
    }
    async fn probe(&self, _: PeerAddr, _: Duration) -> Result<Duration, String> {
        self.probes_started.set(self.probes_started.get() + 1);
        if self.hold_probes.get() {
            self.probes_pending.set(self.probes_pending.get() + 1);
            self.release.notified().await;
            self.probes_pending.set(self.probes_pending.get() - 1);
        }
        Ok(Duration::from_millis(1))
    }
    async fn send_request(&self, _: PeerAddr, request: WireRequest, _: Duration) -> Result<WireResponse, String> {
        match request {
            WireRequest::RegistryGet { name } => Ok(WireResponse::Entry {
                entry: self.info.borrow().clone().map(|i| Box::new(SignedEntry::sign(name, 1, Some(i), &operator()))),
            }),
            other => Err(format!("unexpected {other:?}")),
        }
    }
    async fn open_tunnel(&self, _: PeerAddr) -> Result<DuplexStream, String> {
        Err("no tunnels here".into())
    }
}

/// Routing to a cached instance is decided while a probe of that very instance is
/// still outstanding: the loop never waits for network operations.
#[test]
fn routing_to_a_cached_peer_does_not_wait_behind_a_probe() {
    use crate::node_loop::NodeRuntime;
    use crate::transport::inbound_channel;
    use physarum_core::config::NodeConfig;
    use physarum_core::perf::{PerfLimits, Requirements};
    use physarum_core::types::{RunSpec, ServiceInfo};
    run(async {
        let net = ScriptedNet::default();
        *net.info.borrow_mut() = Some(ServiceInfo {
            name: "hello".into(),
            hash: ContentHash("h1".into()),
            run: RunSpec::Exec { program: "hello".into(), args: vec![], env: vec![] },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        });
        let (_senders, inbound) = inbound_channel::<DuplexStream>();
        let reqs = Requirements {
            soft: PerfLimits::rtt(Duration::from_millis(100)),
            hard: PerfLimits::rtt(Duration::from_secs(30)),
        };
        let mut config = NodeConfig::new(PeerId("A".into()), reqs);
        config.trust = trust();
        let running = NodeRuntime::new(config, 1, net.clone(), inbound, RuntimeConfig::default()).spawn();
        let handle = running.handle();
        let routed_to_b =
            |o: Option<Outcome>| matches!(o, Some(Outcome::Route { instance, .. }) if instance.peer.0 == "B");
        // Discovery: registry, providers, probe → B, now cached.
        assert!(routed_to_b(handle.request("hello".into(), Duration::from_secs(10)).await));
        // From now on probes hang; wait until the peer cache's periodic probe of B is out.
        net.hold_probes.set(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while net.probes_pending.get() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no periodic probe");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = net.probes_started.get();
        for _ in 0..5 {
            assert!(routed_to_b(handle.request("hello".into(), Duration::from_secs(10)).await));
        }
        // Every answer came while that probe was still outstanding.
        assert!(net.probes_pending.get() >= 1);
        assert!(net.probes_started.get() >= started);
        net.release.notify_waiters();
        drop(running);
    });
}

#[test]
fn an_instance_that_never_answers_gets_504_by_the_deadline_and_is_reported() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        let started = tokio::time::Instant::now();
        let resp = c.send_request(get("/hello/hang")).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(resp.status(), 504);
        assert!(text(resp).await.contains("deadline"));
        // The harness's request deadline is 5 s; the answer comes at it, not long after.
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(7), "answered after {waited:?}");
        let failures = h.route_failures.borrow().clone();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, PeerId("B".into()));
    });
}

#[test]
fn a_dead_cached_instance_is_evicted_and_the_request_served_by_the_next_choice() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        h.next_hello_to_dead.set(true);
        let resp = c.send_request(get("/hello/after-death")).await.unwrap();
        assert_eq!(resp.status(), 200, "served, not failed");
        assert_eq!(text(resp).await, "GET /after-death len=0 sum=0 secret=false kept=");
        let failures = h.route_failures.borrow();
        let peers: Vec<&str> = failures.iter().map(|(p, _)| p.0.as_str()).collect();
        assert_eq!(peers, vec!["dead"], "the dead peer was reported for eviction");
    });
}

#[test]
fn instances_without_valid_credentials_never_see_a_request_byte() {
    run(async {
        let h = harness().await;
        let mut c = client(h.front).await;
        let resp = c.send_request(get("/impostors/secret?cookie=1")).await.unwrap();
        let status = resp.status();
        let body = text(resp).await;
        assert_eq!(status, 200, "served by the real instance after the impostors were refused: {body}");
        assert_eq!(body, "GET /secret?cookie=1 len=0 sum=0 secret=false kept=");
        let untrusted: Vec<String> = h.untrusted.borrow().iter().map(|p| p.0.clone()).collect();
        assert_eq!(untrusted, vec!["bare", "self-signed", "copycat"], "each impostor reported to the core");
        assert_eq!(h.impostor_app_connections.get(), 0, "no impostor forwarded anything");
        assert!(h.route_failures.borrow().is_empty());
    });
}

/// What the client's check of a new tunnel's credentials costs (two signature checks):
/// `cargo test --release -p physarum-runtime --lib measure_chain_verification -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_chain_verification() {
    use physarum_core::trust::Grant;
    let alloc_key = SecretKey::from_bytes([7; 32]);
    let grant = Grant::sign(PeerId("alloc".into()), alloc_key.public(), &operator());
    let creds = Issuer::allocator(alloc_key, grant).unwrap().issue(PeerId("i".into()), ContentHash("h".into()), 9);
    let ops = trust().operators;
    let n = 2000;
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        assert!(ops.verify_credentials(&creds, &PeerId("i".into()), &ContentHash("h".into()), 0).is_ok());
        took.push(t0.elapsed());
    }
    took.sort();
    println!("chain verification: p50 {:?}, p99 {:?} ({n} runs)", took[n / 2], took[n * 99 / 100]);
}

/// A UDP echo on loopback (the application of an L4 sidecar).
async fn start_udp_echo() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// L4 sessions a sidecar began and ended.
type SessionCount = Rc<Cell<(usize, usize)>>;

/// Sidecar "B" serving `echo` (UDP at `app`) and a client L4 context on "A" routed
/// to it; B's sessions (begun, ended) are counted.
fn l4_pair(
    net: &FakeNet,
    app: SocketAddr,
    config: crate::l4::L4Config,
) -> (Rc<crate::l4::L4Ctx<FakeNet>>, SessionCount) {
    l4_pair_with(net, TcpConnector(app), Some(credentials(&operator(), "B", "hash-echo")), config)
}

/// As [`l4_pair`], with any connector and the credentials B shows.
fn l4_pair_with<C: crate::transport::Connector>(
    net: &FakeNet,
    app: C,
    creds: Option<Credentials>,
    config: crate::l4::L4Config,
) -> (Rc<crate::l4::L4Ctx<FakeNet>>, SessionCount) {
    let (tx, rx) = mpsc::unbounded_channel();
    net.peers.borrow_mut().insert("B".into(), tx);
    let (b_handle, mut b_cmds) = NodeHandle::for_test(PeerId("B".into()));
    let sessions = Rc::new(Cell::new((0, 0)));
    let counted = sessions.clone();
    tokio::task::spawn_local(async move {
        while let Some(cmd) = b_cmds.recv().await {
            let (begun, ended) = counted.get();
            match cmd {
                Command::Input(Input::TunnelServed) => counted.set((begun + 1, ended)),
                Command::Input(Input::TunnelDone) => counted.set((begun, ended + 1)),
                _ => {}
            }
        }
    });
    let runtime = RuntimeConfig::default();
    let limits = Rc::new(crate::limits::Limits::new(&runtime));
    let b = Rc::new(crate::l4::L4Ctx::new(
        b_handle,
        new_pool(net),
        limits.clone(),
        runtime.l4.clone(),
        Some(Rc::from("echo")),
    ));
    let creds = Rc::new(RefCell::new(creds));
    tokio::task::spawn_local(tunnel::serve_tunnels(rx, b, app, creds, Duration::from_secs(5)));
    let (a_handle, mut a_cmds) = NodeHandle::for_test(PeerId("A".into()));
    tokio::task::spawn_local(async move {
        while let Some(cmd) = a_cmds.recv().await {
            if let Command::Http { reply, .. } = cmd {
                let _ = reply.send(Outcome::Route {
                    instance: PeerAddr::new("B", vec![]),
                    service: ContentHash("hash-echo".into()),
                    try_timeout: Duration::from_secs(10),
                });
            }
        }
    });
    let a = Rc::new(crate::l4::L4Ctx::new(a_handle, new_pool(net), limits, config, None));
    (a, sessions)
}

async fn udp_map(ctx: &Rc<crate::l4::L4Ctx<FakeNet>>) -> SocketAddr {
    let resp = crate::l4::control(ctx, &hyper::Method::GET, "/udp/echo").await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).trim().parse().unwrap()
}

async fn udp_echo_through(socket: &tokio::net::UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(msg, to).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let got = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(buf[..got.0].to_vec())
}

#[test]
fn udp_flows_are_bounded_and_end_when_idle() {
    run(async {
        let net = FakeNet::default();
        let app = start_udp_echo().await;
        let config = crate::l4::L4Config {
            max_udp_flows: 2,
            udp_flow_idle: Duration::from_millis(300),
            ..crate::l4::L4Config::default()
        };
        let (a, sessions) = l4_pair(&net, app, config);
        let mapped = udp_map(&a).await;
        // The mapping's own trial set-up came and went.
        let c1 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c2 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c3 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(udp_echo_through(&c1, mapped, b"one").await.as_deref(), Some(&b"one"[..]));
        assert_eq!(udp_echo_through(&c2, mapped, b"two").await.as_deref(), Some(&b"two"[..]));
        // A third client address while two flows live: its datagrams are dropped.
        c3.send_to(b"three", mapped).await.unwrap();
        let mut buf = [0u8; 16];
        let third = tokio::time::timeout(Duration::from_millis(200), c3.recv_from(&mut buf)).await;
        assert!(third.is_err(), "a flow past the bound was carried");
        // Idle past the limit, both flows end (their sessions at B with them) ...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sessions.get().0 != sessions.get().1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (begun, ended) = sessions.get();
        assert_eq!(begun, ended, "sessions still open after the idle limit: {begun} begun, {ended} ended");
        assert_eq!(begun, 3, "the trial set-up and two flows");
        // ... and a new client address gets a flow again.
        assert_eq!(udp_echo_through(&c3, mapped, b"again").await.as_deref(), Some(&b"again"[..]));
    });
}

#[test]
fn an_l4_session_never_reaches_an_instance_that_fails_the_trust_check() {
    run(async {
        let net = FakeNet::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let connections = Rc::new(Cell::new(0));
        // Signed by a key that is not an operator's.
        let rogue = credentials(&SecretKey::from_bytes([9; 32]), "B", "hash-echo");
        let connector = CountingConnector(app, connections.clone());
        let (a, sessions) = l4_pair_with(&net, connector, Some(rogue), crate::l4::L4Config::default());
        let resp = crate::l4::control(&a, &hyper::Method::GET, "/tcp/echo").await;
        assert_eq!(resp.status(), 502);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("no trusted instance"), "{body:?}");
        // Nothing reached the application, and no session began at the impostor.
        assert_eq!(connections.get(), 0);
        assert_eq!(sessions.get(), (0, 0));
    });
}
