//! Where a registry keeps its entries, behind one trait:
//! - [`embedded`]: a JSON file in the data directory (`physarum dev`, a single registry);
//! - `etcd` (with the `etcd` cargo feature): an etcd cluster shared by any number of
//!   registry daemons (`registry --store etcd://HOST:PORT[,HOST:PORT…]`).
//!
//! Either way the node's in-memory [`physarum_core::registry::Registry`] answers
//! reads, and a write is acknowledged only once the store has it. Entries are the
//! operator-signed blobs; whatever a store hands back is verified again by the
//! core, so the store never has to be trusted to say what runs.

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;

pub use embedded::{RegistryStore, StoreWriter};

use anyhow::{bail, Result};
use physarum_core::trust::SignedEntry;
use physarum_core::types::PeerId;
use physarum_core::wire::{Request, Response};
use physarum_runtime::transport::InboundRequest;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

/// What `registry --store` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// The file in `--data-dir`.
    Embedded,
    /// An etcd cluster, by its members' client addresses (`HOST:PORT`).
    Etcd { endpoints: Vec<String> },
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            return Ok(StoreSpec::Embedded);
        }
        let Some(list) = s.strip_prefix("etcd://") else {
            return Err(format!("unknown store {s:?}: expected \"embedded\" or etcd://HOST:PORT[,HOST:PORT...]"));
        };
        let endpoints: Vec<String> = list.split(',').map(str::trim).map(str::to_string).collect();
        for e in &endpoints {
            let port = e.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err(format!("invalid etcd endpoint {e:?} in {s:?}: expected HOST:PORT"));
            }
        }
        Ok(StoreSpec::Etcd { endpoints })
    }
}

/// Hands requests to the registry's node, as if a peer had sent them.
#[derive(Clone, Debug)]
pub struct NodeFeed {
    tx: UnboundedSender<InboundRequest>,
    /// This registry's own peer id (what the node sees as the sender of what the store feeds it).
    local: PeerId,
}

impl NodeFeed {
    pub fn new(tx: UnboundedSender<InboundRequest>, local: PeerId) -> NodeFeed {
        NodeFeed { tx, local }
    }

    /// Pass a peer's request on unchanged (the node answers it).
    pub fn forward(&self, request: InboundRequest) {
        let _ = self.tx.send(request);
    }

    /// Offer `entry` to the node's copy, as a put: the core verifies it and keeps it
    /// only when it is newer than what it holds. Its answer; `None` once the node is gone.
    pub async fn put(&self, entry: SignedEntry) -> Option<Response> {
        let (reply, answer) = oneshot::channel();
        let request = Request::RegistryPut { entry: Box::new(entry) };
        self.tx.send(InboundRequest { from: self.local.clone(), request, reply }).ok()?;
        answer.await.ok()
    }
}

/// A registry's store.
pub trait Store: Clone + Send + Sync + 'static {
    /// Store `entry` (a peer's `RegistryPut`) if the registry's rules admit it
    /// against what the store holds, and bring the node's copy up to date; the
    /// answer for the peer. Acknowledged (`Done`) only once the store has it.
    fn put(&self, entry: SignedEntry, node: NodeFeed) -> impl Future<Output = Response> + Send;
    /// The node's full contents after a change (from the core's `PersistRegistry`).
    fn persist(&self, entries: Vec<SignedEntry>);
    /// Whether reads may be out of date right now (cut off from the store's quorum).
    fn stale(&self) -> bool {
        false
    }
}

/// The embedded store: the node decides the write, then it is on disk before the answer.
#[derive(Clone)]
pub struct EmbeddedStore {
    writer: Arc<StoreWriter>,
}

impl EmbeddedStore {
    pub fn new(store: RegistryStore) -> EmbeddedStore {
        EmbeddedStore { writer: Arc::new(StoreWriter::spawn(store)) }
    }
}

impl Store for EmbeddedStore {
    fn put(&self, entry: SignedEntry, node: NodeFeed) -> impl Future<Output = Response> + Send {
        let writer = self.writer.clone();
        async move {
            let answer = node.put(entry).await.unwrap_or_else(shutting_down);
            if answer != Response::Done {
                return answer;
            }
            // The core handed the new contents over (`persist`) before it answered.
            match writer.flush().await {
                Ok(()) => Response::Done,
                Err(e) => Response::Error { reason: format!("not stored: {e}") },
            }
        }
    }

    fn persist(&self, entries: Vec<SignedEntry>) {
        self.writer.persist(entries)
    }
}

fn shutting_down() -> Response {
    Response::Error { reason: "the registry is shutting down".into() }
}

/// Refuse a store spec this build cannot serve.
pub fn check_supported(spec: &StoreSpec) -> Result<()> {
    if matches!(spec, StoreSpec::Etcd { .. }) && !cfg!(feature = "etcd") {
        bail!(
            "this registry was built without etcd support: build it with \
             `cargo build --release -p physarum --features etcd` (needs protoc: scripts/etcd.sh installs it)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse_or_say_why_not() {
        assert_eq!("embedded".parse::<StoreSpec>(), Ok(StoreSpec::Embedded));
        assert_eq!(
            "etcd://10.0.0.1:2379,h2:2379".parse::<StoreSpec>(),
            Ok(StoreSpec::Etcd { endpoints: vec!["10.0.0.1:2379".into(), "h2:2379".into()] })
        );
        for bad in ["etcd://", "etcd://h", "etcd://h:x", "etcd://:1", "file:///x", ""] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad}");
        }
        assert!("etcd://h:99999".parse::<StoreSpec>().unwrap_err().contains("HOST:PORT"));
    }
}
