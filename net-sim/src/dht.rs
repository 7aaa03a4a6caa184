//! The simulation's model of the DHT (provider records only).
//!
//! What it keeps from Kademlia as the production runtime uses it: nodes join through
//! well-known bootstrap nodes; a node announces "I provide key K" and the record
//! expires unless re-announced; a lookup returns the providers known for K, with
//! their addresses; the bootstrap servers replicate records among themselves; a
//! bootstrap that restarts comes back empty.
//!
//! What it simplifies:
//! - only the bootstrap hosts store records, and every bootstrap holds every record
//!   (full replication instead of the k closest peers by XOR distance); there is no
//!   routing table, no iterative lookup, no k-buckets;
//! - a record carries the provider's dialable address (no identify / address book);
//! - a provider sends its record to every bootstrap itself, and the bootstraps also
//!   forward new records to each other at once and push their whole store to each
//!   other every `replicate_interval` (anti-entropy), merging by latest expiry;
//! - a "connection" to a bootstrap is a keepalive exchange over UDP ([`DhtMsg::Hello`]);
//!   a restarted bootstrap answers with a new `epoch`, which counts as a new connection;
//! - records are not signed; a peer may announce anything (as in libp2p-kad).
//!
//! DHT messages travel in the core's frames (`core::wire::encode`) on their own UDP
//! port ([`DHT_PORT`]), beside the nodes' wire traffic.

use crate::trace::{Kind, Trace};
use physarum_core::types::{DhtKey, PeerAddr, PeerId};
use physarum_core::wire;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::time::Instant;
use turmoil::net::UdpSocket;

/// UDP port of the DHT service on bootstrap hosts.
pub const DHT_PORT: u16 = 4001;

/// Largest datagram read.
pub const MAX_DATAGRAM: usize = 256 * 1024;

/// Messages between nodes and bootstrap DHT servers, and among bootstraps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DhtMsg {
    /// Keepalive / connect. Answered with `HelloAck`.
    Hello {
        id: u64,
    },
    /// `epoch` changes whenever the bootstrap restarts.
    HelloAck {
        id: u64,
        epoch: u64,
    },
    /// Store (or refresh) a provider record. Answered with `Ack`.
    AddProvider {
        id: u64,
        key: DhtKey,
        provider: PeerAddr,
    },
    Ack {
        id: u64,
    },
    /// Look up providers. Answered with `Providers`.
    GetProviders {
        id: u64,
        key: DhtKey,
    },
    Providers {
        id: u64,
        providers: Vec<PeerAddr>,
    },
    /// Bootstrap → bootstrap: records with the time each has left to live, in ms.
    Replicate {
        records: Vec<(DhtKey, PeerAddr, u64)>,
    },
}

/// The provider store of one bootstrap.
#[derive(Debug, Default)]
pub struct Store {
    records: BTreeMap<DhtKey, BTreeMap<PeerId, (PeerAddr, Instant)>>,
}

impl Store {
    /// Insert or refresh; keeps the later expiry.
    pub fn put(&mut self, key: DhtKey, provider: PeerAddr, expires: Instant) {
        let entry = self.records.entry(key).or_default();
        match entry.get_mut(&provider.peer) {
            Some((addr, exp)) => {
                if expires >= *exp {
                    *addr = provider;
                    *exp = expires;
                }
            }
            None => {
                entry.insert(provider.peer.clone(), (provider, expires));
            }
        }
    }

    /// Unexpired providers of `key`, ordered by peer id.
    pub fn get(&self, key: &DhtKey, now: Instant) -> Vec<PeerAddr> {
        self.records
            .get(key)
            .map(|m| m.values().filter(|(_, exp)| *exp > now).map(|(a, _)| a.clone()).collect())
            .unwrap_or_default()
    }

    pub fn prune(&mut self, now: Instant) {
        for m in self.records.values_mut() {
            m.retain(|_, (_, exp)| *exp > now);
        }
        self.records.retain(|_, m| !m.is_empty());
    }

    /// Every unexpired record with its remaining lifetime in ms.
    pub fn dump(&self, now: Instant) -> Vec<(DhtKey, PeerAddr, u64)> {
        let mut out = Vec::new();
        for (k, m) in &self.records {
            for (a, exp) in m.values() {
                if *exp > now {
                    out.push((k.clone(), a.clone(), exp.duration_since(now).as_millis() as u64));
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.records.values().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Configuration of a bootstrap DHT server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This bootstrap's host name.
    pub name: String,
    /// The other bootstraps' host names.
    pub peers: Vec<String>,
    pub record_ttl: Duration,
    pub replicate_interval: Duration,
    /// Changes on every restart of the host.
    pub epoch: u64,
}

/// Run a bootstrap's DHT server until the host stops.
pub async fn serve(config: ServerConfig, trace: Trace) -> std::io::Result<()> {
    let socket = Rc::new(UdpSocket::bind(("0.0.0.0", DHT_PORT)).await?);
    let store = Rc::new(RefCell::new(Store::default()));
    trace.here(&config.name, Kind::NodeStarted { incarnation: config.epoch as u32 });

    // Anti-entropy: push the whole store to the other bootstraps periodically.
    let rep = {
        let socket = socket.clone();
        let store = store.clone();
        let config = config.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(config.replicate_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let records = {
                    let mut s = store.borrow_mut();
                    s.prune(now);
                    s.dump(now)
                };
                if records.is_empty() {
                    continue;
                }
                // Keep datagrams modest: chunks of 200 records.
                for chunk in records.chunks(200) {
                    let msg = DhtMsg::Replicate { records: chunk.to_vec() };
                    if let Ok(frame) = wire::encode(&msg) {
                        for p in &config.peers {
                            let _ = socket.send_to(&frame, (p.as_str(), DHT_PORT)).await;
                        }
                    }
                }
            }
        })
    };
    let _guard = AbortOnDrop(vec![rep]);

    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let Ok(Some((msg, _))) = wire::decode::<DhtMsg>(&buf[..n]) else { continue };
        let now = Instant::now();
        let reply = match msg {
            DhtMsg::Hello { id } => Some(DhtMsg::HelloAck { id, epoch: config.epoch }),
            DhtMsg::AddProvider { id, key, provider } => {
                store.borrow_mut().put(key.clone(), provider.clone(), now + config.record_ttl);
                // Forward at once to the other bootstraps (replication).
                let fwd = DhtMsg::Replicate { records: vec![(key, provider, config.record_ttl.as_millis() as u64)] };
                if let Ok(frame) = wire::encode(&fwd) {
                    for p in &config.peers {
                        let _ = socket.send_to(&frame, (p.as_str(), DHT_PORT)).await;
                    }
                }
                Some(DhtMsg::Ack { id })
            }
            DhtMsg::GetProviders { id, key } => {
                let providers = store.borrow().get(&key, now);
                Some(DhtMsg::Providers { id, providers })
            }
            DhtMsg::Replicate { records } => {
                let mut s = store.borrow_mut();
                for (k, a, ttl_ms) in records {
                    let ttl = Duration::from_millis(ttl_ms).min(config.record_ttl);
                    s.put(k, a, now + ttl);
                }
                None
            }
            DhtMsg::HelloAck { .. } | DhtMsg::Ack { .. } | DhtMsg::Providers { .. } => None,
        };
        if let Some(r) = reply {
            send(&socket, &r, from).await;
        }
    }
}

async fn send(socket: &UdpSocket, msg: &DhtMsg, to: SocketAddr) {
    if let Ok(frame) = wire::encode(msg) {
        let _ = socket.send_to(&frame, to).await;
    }
}

/// Aborts the tasks when dropped (a stopped node or instance takes its tasks along).
#[derive(Debug, Default)]
pub struct AbortOnDrop(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::types::ContentHash;

    #[test]
    fn store_expires_and_keeps_latest() {
        let t0 = Instant::now();
        let mut s = Store::default();
        let key = DhtKey::Service(ContentHash("h".into()));
        let a = PeerAddr::new("a", vec!["x:1".into()]);
        s.put(key.clone(), a.clone(), t0 + Duration::from_secs(10));
        s.put(key.clone(), PeerAddr::new("a", vec!["old:1".into()]), t0 + Duration::from_secs(5));
        assert_eq!(s.get(&key, t0), vec![a.clone()]);
        assert_eq!(s.get(&key, t0 + Duration::from_secs(10)), vec![]);
        s.prune(t0 + Duration::from_secs(11));
        assert!(s.is_empty());
    }
}
