//! Identifiers and the service description shared by every machine.

use crate::perf::Requirements;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's identity as the runtime names it (libp2p's base58 peer id in production,
/// the host name in the simulation). Opaque to the core.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerId(pub String);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A peer and the addresses it can be dialled at (multiaddrs in production).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerAddr {
    pub peer: PeerId,
    pub addrs: Vec<String>,
}

impl PeerAddr {
    pub fn new(peer: impl Into<String>, addrs: Vec<String>) -> Self {
        PeerAddr { peer: PeerId(peer.into()), addrs }
    }
}

/// A service's identifier: the hash of what runs it, so a modified image has another
/// hash. Instances advertise themselves in the DHT under it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContentHash(pub String);

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an allocator runs for a service. Only ever taken from the registry, never
/// from the peer asking for an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunSpec {
    /// An executable on the allocator's machine, with its arguments and environment.
    Exec {
        program: String,
        args: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
    },
    /// A container image (the Docker driver).
    Image { image: String },
}

/// A registry entry: everything known about a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub hash: ContentHash,
    pub run: RunSpec,
    /// Limits clients hold instances to; unset fields fall back to the node's defaults.
    pub requirements: Requirements,
    /// CPU the instance needs, in thousandths of a core.
    pub cpu_millis: u32,
    /// Memory the instance needs, in MiB.
    pub memory_mb: u32,
    pub stateful: bool,
    /// The instance only makes requests: its sidecar runs in anonymous mode.
    #[serde(default)]
    pub client_mode: bool,
}

/// A service's content hash: SHA3-256 over everything that decides what runs — the
/// run spec (program path, arguments, environment, or image reference) and the
/// digest of the artifact itself (`artifact`: the program's bytes hashed, empty for
/// images) — so services differing in any of these never share an identity.
pub fn content_hash(run: &RunSpec, artifact: &str) -> ContentHash {
    use sha3::{Digest, Sha3_256};
    let mut h = Sha3_256::new();
    h.update(b"physarum/run-spec/v1\0");
    h.update(postcard::to_allocvec(run).unwrap_or_default());
    h.update(artifact.as_bytes());
    ContentHash(hex::encode(h.finalize()))
}

/// Keys nodes advertise and look up in the DHT.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DhtKey {
    /// Instances of the service with this content hash.
    Service(ContentHash),
    /// The rendezvous key every allocator advertises.
    Allocators,
    /// The rendezvous key every registry instance advertises.
    Registry,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A client HTTP request, numbered by the runtime's front end.
    ReqId
);
id_type!(
    /// An operation the core asked the runtime to carry out; its result comes back with it.
    OpId
);
id_type!(
    /// A request a peer sent us, numbered by the runtime; the reply names it.
    InboundId
);
id_type!(
    /// An instance an allocator started, numbered by the allocator.
    InstanceId
);
