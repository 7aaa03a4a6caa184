//! Operator keys and allocator grants: `physarum keygen` and `physarum grant`, and
//! loading both for the daemons. An operator key is a key file of the same format
//! as every daemon's identity (libp2p's ed25519 protobuf encoding, mode 0600); a
//! grant is the JSON of a [`Grant`].

use anyhow::{bail, Context, Result};
use physarum_core::trust::{Grant, Operators, SecretKey};
use physarum_core::types::PeerId;
use physarum_net_real::keyfile;
use std::path::Path;

/// `physarum keygen --out FILE`: a new operator key, written to `out`.
pub fn keygen(out: &Path) -> Result<SecretKey> {
    let key = keyfile::generate_to(out).with_context(|| format!("cannot create the operator key {}", out.display()))?;
    keyfile::signing_key(&key).map_err(anyhow::Error::msg)
}

/// An operator key file's signing key.
pub fn load_operator_key(path: &Path) -> Result<SecretKey> {
    let key = keyfile::load(path).with_context(|| format!("cannot load the operator key {}", path.display()))?;
    keyfile::signing_key(&key).map_err(anyhow::Error::msg).with_context(|| format!("operator key {}", path.display()))
}

/// `physarum grant`: the operator's statement that the allocator `peer` may start instances.
pub fn grant(operator_key: &Path, peer: &str) -> Result<Grant> {
    let operator = load_operator_key(operator_key)?;
    let allocator_key = keyfile::public_key_of_peer(peer).map_err(anyhow::Error::msg)?;
    Ok(Grant::sign(PeerId(peer.to_string()), allocator_key, &operator))
}

pub fn write_grant(grant: &Grant, out: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(grant).context("cannot encode the grant")?;
    std::fs::write(out, text + "\n").with_context(|| format!("cannot write the grant {}", out.display()))
}

/// Read a grant file and check it is one this allocator (`me`) can work under.
pub fn load_grant(path: &Path, me: &PeerId, operators: &Operators) -> Result<Grant> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the grant {}", path.display()))?;
    let grant: Grant = serde_json::from_str(&text).with_context(|| format!("{} is not a grant", path.display()))?;
    if grant.allocator != *me {
        bail!(
            "the grant {} is for allocator {}, this allocator is {me} (make one with `physarum grant --peer {me}`)",
            path.display(),
            grant.allocator
        );
    }
    operators.verify_grant(&grant).with_context(|| format!("the grant {} is not valid here", path.display()))?;
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    #[test]
    fn keys_grants_and_their_errors() {
        let dir = std::env::temp_dir().join(format!("physarum-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let op_path = dir.join("operator.key");
        let public = keygen(&op_path).unwrap().public();
        assert_eq!(load_operator_key(&op_path).unwrap().public(), public);
        assert!(keygen(&op_path).is_err(), "an existing key is never overwritten");

        let alloc = Keypair::generate_ed25519();
        let me = PeerId(keyfile::peer_id_string(&alloc));
        let g = grant(&op_path, &me.0).unwrap();
        let path = dir.join("grant.json");
        write_grant(&g, &path).unwrap();
        let ops = Operators::new(vec![public]);
        assert_eq!(load_grant(&path, &me, &ops).unwrap(), g);
        let other = PeerId(keyfile::peer_id_string(&Keypair::generate_ed25519()));
        assert!(format!("{:#}", load_grant(&path, &other, &ops).unwrap_err()).contains("is for allocator"));
        let strangers = Operators::new(vec![SecretKey::from_bytes([3; 32]).public()]);
        assert!(format!("{:#}", load_grant(&path, &me, &strangers).unwrap_err()).contains("not a configured operator"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
