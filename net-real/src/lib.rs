//! physarum-net-real: the production runtime (libp2p + hyper) around the core's `Node`.

// Owned by the binaries/driver engineer:
pub mod driver;
pub mod keyfile;
pub mod metrics;
