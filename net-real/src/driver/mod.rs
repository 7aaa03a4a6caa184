//! Instance drivers: how an allocator runs instances, behind the
//! `physarum_runtime::transport::InstanceDriver` trait. [`process`] runs a registered
//! executable plus a sidecar proxy as child processes (the default); [`docker`] runs a
//! registered image as a container. What both hand an instance is [`instance`].

pub mod docker;
pub mod instance;
pub mod leftovers;
pub mod process;

pub use docker::{DockerDriver, DockerDriverConfig};
pub use process::{ProcessDriver, ProcessDriverConfig};

use physarum_core::types::{InstanceId, PeerAddr, ServiceInfo};
use physarum_runtime::transport::{AdoptedInstance, ExitSink, InstanceDriver};

/// The driver an allocator was started with (`--driver`).
#[derive(Clone, Debug)]
pub enum AnyDriver {
    Process(ProcessDriver),
    Docker(DockerDriver),
}

impl AnyDriver {
    /// Instances currently tracked (starting or running).
    pub fn running(&self) -> Vec<InstanceId> {
        match self {
            AnyDriver::Process(d) => d.running(),
            AnyDriver::Docker(d) => d.running(),
        }
    }

    /// Stop every instance.
    pub async fn shutdown(&self) {
        match self {
            AnyDriver::Process(d) => d.shutdown().await,
            AnyDriver::Docker(d) => d.shutdown().await,
        }
    }
}

impl InstanceDriver for AnyDriver {
    async fn start(&self, instance: InstanceId, service: ServiceInfo, exits: ExitSink) -> Result<PeerAddr, String> {
        match self {
            AnyDriver::Process(d) => d.start(instance, service, exits).await,
            AnyDriver::Docker(d) => d.start(instance, service, exits).await,
        }
    }

    async fn stop(&self, instance: InstanceId) {
        match self {
            AnyDriver::Process(d) => d.stop(instance).await,
            AnyDriver::Docker(d) => d.stop(instance).await,
        }
    }

    async fn adopt(&self, exits: ExitSink) -> Vec<AdoptedInstance> {
        match self {
            // Its leftovers were reclaimed at start-up: their sidecars died with the
            // allocator that was their parent.
            AnyDriver::Process(_) => Vec::new(),
            AnyDriver::Docker(d) => d.adopt(exits).await,
        }
    }
}

use sha3::{Digest, Sha3_256};
use std::path::Path;

/// The content hash the registry stores for an executable: SHA3-256 of its bytes,
/// lowercase hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex(&Sha3_256::digest(bytes))
}

/// [`hash_bytes`] of a file's contents.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    Ok(hash_bytes(&std::fs::read(path)?))
}

/// The content hash of a container image reference: SHA3-256 of the reference text.
pub fn hash_image_ref(image: &str) -> String {
    hash_bytes(image.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Make a child process receive SIGTERM when this process dies, however it dies
/// (Linux `PR_SET_PDEATHSIG`), so a killed daemon leaves no orphans. Spawn such
/// children from a thread that lives as long as the process (the main thread or a
/// runtime worker), since the signal follows the death of the spawning thread.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha3_256_hex() {
        // SHA3-256 of the empty string (FIPS 202 test vector).
        assert_eq!(hash_bytes(b""), "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a");
        assert_eq!(hash_image_ref("abc"), "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532");
        assert_eq!(hash_bytes(b"abc").len(), 64);
    }
}
