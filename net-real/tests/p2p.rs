//! Two or three libp2p nodes in one process on 127.0.0.1 (port 0): discovery,
//! request-response, tunnels, private networks. Every wait polls against a deadline.

use futures::StreamExt;
use libp2p::identity::Keypair;
use physarum_core::types::{ContentHash, DhtKey};
use physarum_core::wire::{Request, Response};
use physarum_net_real::{Backoff, P2p, P2pOptions, TunnelStream};
use physarum_runtime::transport::{Inbound, NetEvent};
use physarum_runtime::Transport;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn opts(bootstraps: Vec<libp2p::Multiaddr>, psk: Option<&str>) -> P2pOptions {
    let mut o = P2pOptions::new(Keypair::generate_ed25519());
    o.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    o.bootstraps = bootstraps;
    o.psk = psk.map(str::to_string);
    o.backoff = Backoff { initial: Duration::from_millis(50), startup_attempts: 3, cap: Duration::from_secs(1) };
    o.handshake_timeout = Duration::from_secs(1);
    o
}

async fn node(bootstraps: Vec<libp2p::Multiaddr>, psk: Option<&str>) -> (P2p, Inbound<TunnelStream>) {
    P2p::start(opts(bootstraps, psk)).await.expect("node starts")
}

/// Answer every peer request the way a registry with no entries would.
fn answer_requests(mut inbound: Inbound<TunnelStream>) -> Inbound<TunnelStream> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut requests = std::mem::replace(&mut inbound.requests, rx);
    drop(tx);
    tokio::spawn(async move {
        while let Some(r) = requests.recv().await {
            let answer = match r.request {
                Request::RegistryList { .. } => Response::Entries { entries: vec![], next: None },
                other => Response::Error { reason: format!("unexpected {other:?}") },
            };
            let _ = r.reply.send(answer);
        }
    });
    inbound
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("test timed out")
}

#[tokio::test]
async fn a_node_connects_to_its_bootstrap_and_reports_it() {
    bounded(async {
        let (boot, _bi) = node(vec![], None).await;
        // One configured bootstrap is down: the node still starts through the other.
        let dead = P2p::start(opts(vec![], None)).await.unwrap().0;
        let mut boots = dead.dial_addrs();
        drop(dead);
        boots.extend(boot.dial_addrs());
        let (_x, mut xi) = node(boots, None).await;
        assert_eq!(xi.events.recv().await, Some(NetEvent::BootstrapConnected));
        let deadline = Instant::now() + Duration::from_secs(10);
        while boot.connected_peers().is_empty() {
            assert!(Instant::now() < deadline, "bootstrap never saw the node");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn providers_are_found_through_the_bootstrap() {
    bounded(async {
        let (boot, _bi) = node(vec![], None).await;
        let (x, _xi) = node(boot.dial_addrs(), None).await;
        let (y, _yi) = node(boot.dial_addrs(), None).await;
        let key = DhtKey::Service(ContentHash("abc".into()));
        x.advertise(key.clone()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let found = loop {
            let found = y.find_providers(key.clone(), Duration::from_secs(2)).await.unwrap();
            if !found.is_empty() {
                break found;
            }
            assert!(Instant::now() < deadline, "providers never found");
            // The record may not have reached the bootstrap yet: advertise again.
            x.advertise(key.clone()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].peer, x.local_peer());
        assert!(!found[0].addrs.is_empty(), "the provider comes with its addresses");
        // Another key: nobody.
        let none = y.find_providers(DhtKey::Allocators, Duration::from_secs(2)).await.unwrap();
        assert!(none.is_empty());
        // And the provider is directly usable: probe it.
        let rtt = y.probe(found[0].clone(), Duration::from_secs(2)).await.unwrap();
        assert!(rtt < Duration::from_secs(1));
    })
    .await
}

#[tokio::test]
async fn requests_and_probes_round_trip() {
    bounded(async {
        let (x, xi) = node(vec![], None).await;
        let _xi = answer_requests(xi);
        let (y, _yi) = node(x.dial_addrs(), None).await;
        let resp =
            y.send_request(x.peer_addr(), Request::RegistryList { after: None }, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp, Response::Entries { entries: vec![], next: None });
        let rtt = y.probe(x.peer_addr(), Duration::from_secs(2)).await.unwrap();
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
        // A probe also learns the peer's data plane, before any tunnel is opened.
        let until = Instant::now() + Duration::from_secs(5);
        while y.tunnels_direct_to(&x.peer_id()).is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(y.tunnels_direct_to(&x.peer_id()), Some(true));
        assert_eq!(y.tunnels_opened(), (0, 0));
        // A peer that does not exist fails, within the timeout.
        let ghost = P2p::start(opts(vec![], None)).await.unwrap().0;
        let gone = ghost.peer_addr();
        drop(ghost);
        tokio::time::sleep(Duration::from_millis(100)).await; // let its listener close
        let err = y
            .send_request(gone.clone(), Request::RegistryList { after: None }, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(!err.is_empty());
        assert!(y.probe(gone, Duration::from_secs(2)).await.is_err());
    })
    .await
}

#[tokio::test]
async fn tunnel_streams_on_the_data_plane_carry_bytes_both_ways_and_none_is_lost() {
    tunnels_carry_bytes_and_none_is_lost(true).await
}

/// A peer without a data plane gets its tunnels over the swarm, as libp2p streams.
#[tokio::test]
async fn tunnel_streams_on_the_swarm_carry_bytes_both_ways_and_none_is_lost() {
    tunnels_carry_bytes_and_none_is_lost(false).await
}

async fn tunnels_carry_bytes_and_none_is_lost(data_plane: bool) {
    bounded(async {
        let mut o = opts(vec![], None);
        if !data_plane {
            o.data_plane_port = None;
        }
        let (x, mut xi) = P2p::start(o).await.expect("node starts");
        assert_eq!(x.data_plane_addr().is_some(), data_plane);
        let (y, _yi) = node(x.dial_addrs(), None).await;
        // Echo server on x: every stream echoes until EOF.
        tokio::spawn(async move {
            while let Some(t) = xi.tunnels.recv().await {
                tokio::spawn(async move {
                    let mut s = t.stream;
                    let mut buf = vec![0u8; 16 * 1024];
                    // Tunnel streams may hold written bytes until flushed (Noise frames).
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        // 1 MiB through one stream.
        let mut s = y.open_tunnel(x.peer_addr()).await.unwrap();
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 253) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut s);
        let writer = async {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
        };
        let mut back = vec![0u8; data.len()];
        let reader = async { r.read_exact(&mut back).await.unwrap() };
        tokio::join!(writer, reader);
        assert!(back == data);
        assert_eq!(y.tunnels_direct_to(&x.peer_id()), Some(data_plane), "the tunnel took the expected path");
        let (direct, swarm) = y.tunnels_opened();
        assert_eq!((direct, swarm), (data_plane as u64, !data_plane as u64), "counted on its path");
        // 64 streams opened at once: every one is accepted (libp2p-stream's own accept
        // would drop some; ours must not). Each opener still retries like the runtime
        // does, and counts how often it had to.
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let opened = futures::stream::iter(0..64u32)
            .map(|i| {
                let y = y.clone();
                let x = x.peer_addr();
                let lost = lost.clone();
                async move {
                    for _ in 0..5 {
                        let mut s = y.open_tunnel(x.clone()).await.unwrap();
                        s.write_all(&i.to_be_bytes()).await.unwrap();
                        s.flush().await.unwrap();
                        let mut b = [0u8; 4];
                        match s.read_exact(&mut b).await {
                            Ok(_) => return u32::from_be_bytes(b),
                            Err(_) => {
                                lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                    panic!("stream {i} lost 5 times");
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<u32>>()
            .await;
        let mut opened = opened;
        opened.sort();
        assert_eq!(opened, (0..64).collect::<Vec<_>>());
        assert_eq!(lost.load(std::sync::atomic::Ordering::Relaxed), 0, "streams lost on first use");
    })
    .await
}

#[tokio::test]
async fn a_wrong_private_network_key_cannot_connect() {
    bounded(async {
        let (boot, mut bi) = node(vec![], Some("right passphrase")).await;
        // Same key: fine, and tunnels run on the data plane under the same key.
        let (ok, _oi) = node(boot.dial_addrs(), Some("right passphrase")).await;
        let mut tunnel = ok.open_tunnel(boot.peer_addr()).await.expect("a tunnel opens");
        assert_eq!(ok.tunnels_direct_to(&boot.peer_id()), Some(true));
        tunnel.write_all(b"x").await.unwrap();
        tunnel.flush().await.unwrap();
        let mut inbound = bi.tunnels.recv().await.expect("the tunnel arrives").stream;
        let mut b = [0u8; 1];
        inbound.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
        // Another key, or none: a clear error after the start-up attempts.
        for psk in [Some("wrong passphrase"), None] {
            let err = P2p::start(opts(boot.dial_addrs(), psk)).await.unwrap_err().to_string();
            assert!(err.contains("could not connect to any bootstrap"), "{err}");
            assert!(err.contains("P2P_PSK"), "{err}");
        }
    })
    .await
}

#[tokio::test]
async fn a_lost_bootstrap_is_reconnected_and_reported_again() {
    bounded(async {
        // Restart the bootstrap on the same port with the same identity.
        let key = Keypair::generate_ed25519();
        let mut bo = opts(vec![], None);
        bo.keypair = key.clone();
        let (boot, _bi) = P2p::start(bo.clone()).await.unwrap();
        let addrs = boot.dial_addrs();
        let (_x, mut xi) = node(addrs.clone(), None).await;
        assert_eq!(xi.events.recv().await, Some(NetEvent::BootstrapConnected));
        drop(boot);
        drop(_bi);
        bo.listen = boot_listen(&addrs);
        let deadline = Instant::now() + Duration::from_secs(20);
        let (_boot2, _bi2) = loop {
            // The old listener may take a moment to release the port.
            match P2p::start(bo.clone()).await {
                Ok(b) => break b,
                Err(e) => {
                    assert!(Instant::now() < deadline, "bootstrap could not restart: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let again = tokio::time::timeout(Duration::from_secs(20), xi.events.recv()).await.expect("reconnected");
        assert_eq!(again, Some(NetEvent::BootstrapConnected));
    })
    .await
}

fn boot_listen(dial: &[libp2p::Multiaddr]) -> Vec<libp2p::Multiaddr> {
    dial.iter()
        .map(|a| {
            let mut a = a.clone();
            a.pop();
            a
        })
        .collect()
}

#[tokio::test]
async fn bootstrap_connections_outlive_the_idle_timeout_other_connections_do_not() {
    bounded(async {
        let short = |bootstraps| {
            let mut o = opts(bootstraps, None);
            o.idle_connection_timeout = Duration::from_millis(300);
            o
        };
        let (boot, _bi) = P2p::start(short(vec![])).await.unwrap();
        let (x, mut xi) = P2p::start(short(boot.dial_addrs())).await.unwrap();
        assert_eq!(xi.events.recv().await, Some(NetEvent::BootstrapConnected));
        // y talks to x once (a probe), then leaves the connection idle.
        let (y, _yi) = P2p::start(short(vec![])).await.unwrap();
        y.probe(x.peer_addr(), Duration::from_secs(2)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while y.connected_peers().iter().any(|(p, _)| *p == x.peer_id()) {
            assert!(Instant::now() < deadline, "an idle connection was never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Meanwhile x's bootstrap connection stayed up (held by the keep-alive stream).
        assert!(x.connected_peers().iter().any(|(p, _)| *p == boot.peer_id()));
        assert!(xi.events.try_recv().is_err(), "the bootstrap connection was lost and re-made");
    })
    .await
}
