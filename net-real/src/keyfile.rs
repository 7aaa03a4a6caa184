//! Persistent identity key files.
//!
//! Each daemon keeps its libp2p identity (an ed25519 key pair) in a file, in
//! libp2p's protobuf key encoding, so its peer id survives restarts. The file is
//! created with mode 0600 when missing; a file that exists but does not decode is
//! an error (never silently replaced: that would change the daemon's identity).

use libp2p::identity::Keypair;
use physarum_core::trust::{PublicKey, SecretKey};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a key file could not be read or written.
#[derive(Debug)]
pub enum KeyFileError {
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    Corrupt { path: PathBuf, reason: String },
    Encode { reason: String },
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Io { path, op, source } => {
                write!(f, "cannot {op} key file {}: {source}", path.display())
            }
            KeyFileError::Corrupt { path, reason } => write!(
                f,
                "key file {} is not a valid libp2p identity key ({reason}); \
                 move it away to generate a new identity",
                path.display()
            ),
            KeyFileError::Encode { reason } => write!(f, "cannot encode identity key: {reason}"),
        }
    }
}

impl std::error::Error for KeyFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyFileError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether [`load_or_create`] found an existing key or made a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    Loaded,
    Created,
}

/// Read the key in `path`, or generate an ed25519 key and write it there (mode
/// 0600, parent directories created) when the file does not exist.
pub fn load_or_create(path: &Path) -> Result<(Keypair, KeyOrigin), KeyFileError> {
    match fs::read(path) {
        Ok(bytes) => Ok((decode(path, &bytes)?, KeyOrigin::Loaded)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            match write_new(path, &key) {
                Ok(()) => Ok((key, KeyOrigin::Created)),
                // Someone else created it between our read and our write: use theirs.
                Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok((load(path)?, KeyOrigin::Loaded))
                }
                Err(e) => Err(e),
            }
        }
        Err(source) => Err(KeyFileError::Io { path: path.to_path_buf(), op: "read", source }),
    }
}

/// Read an existing key file.
pub fn load(path: &Path) -> Result<Keypair, KeyFileError> {
    let bytes = fs::read(path).map_err(|source| KeyFileError::Io { path: path.to_path_buf(), op: "read", source })?;
    decode(path, &bytes)
}

/// Generate a fresh ed25519 key and write it to `path`, which must not exist.
/// The allocator uses this to know an instance's peer id before starting it.
pub fn generate_to(path: &Path) -> Result<Keypair, KeyFileError> {
    let key = Keypair::generate_ed25519();
    write_new(path, &key)?;
    Ok(key)
}

/// Write `key` to a new file at `path` with mode 0600. Fails if the file exists.
/// The file is written under a temporary name and linked into place, so a crash
/// never leaves a half-written key at `path`.
pub fn write_new(path: &Path, key: &Keypair) -> Result<(), KeyFileError> {
    let bytes = key.to_protobuf_encoding().map_err(|e| KeyFileError::Encode { reason: e.to_string() })?;
    let io = |op: &'static str| move |source| KeyFileError::Io { path: path.to_path_buf(), op, source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    let tmp = tmp_path(path);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut file = opts.open(&tmp).map_err(io("create"))?;
        file.write_all(&bytes).map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))?;
        // hard_link fails when `path` exists: never overwrite an identity.
        fs::hard_link(&tmp, path).map_err(io("create"))
    })();
    let _ = fs::remove_file(&tmp);
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, KeyFileError> {
    Keypair::from_protobuf_encoding(bytes)
        .map_err(|e| KeyFileError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })
}

/// The base58 peer id of a key, as the core names peers.
pub fn peer_id_string(key: &Keypair) -> String {
    key.public().to_peer_id().to_base58()
}

/// The ed25519 signing key inside a key file's key pair: an allocator signs its
/// instances' certificates with its identity, an operator signs with an operator key
/// (a key file of the same format, `physarum keygen`).
pub fn signing_key(key: &Keypair) -> Result<SecretKey, String> {
    let ed = key.clone().try_into_ed25519().map_err(|_| "not an ed25519 key".to_string())?;
    let secret: [u8; 32] = ed.secret().as_ref().try_into().map_err(|_| "malformed ed25519 secret".to_string())?;
    Ok(SecretKey::from_bytes(secret))
}

/// The ed25519 public key a peer id carries (ed25519 peer ids embed their key), for
/// granting an allocator known only by its peer id.
pub fn public_key_of_peer(peer: &str) -> Result<PublicKey, String> {
    let id: libp2p::PeerId = peer.parse().map_err(|e| format!("{peer:?} is not a peer id: {e}"))?;
    let multihash = id.as_ref();
    let public = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest())
        .map_err(|_| format!("peer id {peer} does not embed its public key (not an ed25519 identity)"))?;
    let ed = public.try_into_ed25519().map_err(|_| format!("peer id {peer} is not an ed25519 identity"))?;
    Ok(PublicKey(ed.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("physarum-keyfile-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn created_when_missing_then_loaded_with_the_same_identity() {
        let dir = tempdir("roundtrip");
        let path = dir.join("sub/dir/node.key");
        let (a, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, KeyOrigin::Created);
        let (b, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(a.key_type(), libp2p::identity::KeyType::Ed25519);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn created_with_owner_only_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir("mode");
        let path = dir.join("node.key");
        load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error_and_is_left_alone() {
        let dir = tempdir("corrupt");
        let path = dir.join("node.key");
        fs::write(&path, b"not a key at all").unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("node.key") && msg.contains("not a valid libp2p identity key"), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), b"not a key at all");
        // An empty file too.
        fs::write(&path, b"").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generate_to_refuses_to_overwrite_and_peer_id_is_known_in_advance() {
        let dir = tempdir("generate");
        let path = dir.join("instance.key");
        let key = generate_to(&path).unwrap();
        let expected = peer_id_string(&key);
        assert!(expected.starts_with("12D3KooW"), "{expected}");
        assert_eq!(peer_id_string(&load(&path).unwrap()), expected);
        let err = generate_to(&path).unwrap_err();
        assert!(matches!(&err, KeyFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists));
        assert_eq!(peer_id_string(&load(&path).unwrap()), expected);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_path_is_an_io_error() {
        let dir = tempdir("dir");
        // A directory where the file should be.
        let err = load_or_create(&dir).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { op: "read", .. }), "{err:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peer_id_names_the_public_key_its_signing_key_signs_with() {
        let key = Keypair::generate_ed25519();
        let public = public_key_of_peer(&peer_id_string(&key)).unwrap();
        assert_eq!(signing_key(&key).unwrap().public(), public);
        assert!(public_key_of_peer("not-a-peer").is_err());
    }
}
