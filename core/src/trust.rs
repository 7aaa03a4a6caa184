//! Who may decide what runs, and who may serve it (DESIGN.md §7).
//!
//! A PSK keeps strangers off the network; it says nothing about who decides. Here:
//! - operators hold Ed25519 keys, and every node is configured with their public
//!   keys ([`Operators`]);
//! - a registry entry is signed by an operator over the whole entry and a version
//!   that only grows ([`SignedEntry`]); registries, clients and allocators each
//!   verify it, so no node in between has to be trusted;
//! - an allocator holds an operator's [`Grant`] naming its peer id and key, and
//!   signs a short-lived [`InstanceCert`] for each instance it starts; a hand-started
//!   sidecar may instead hold a certificate signed by an operator directly;
//! - a client checks operator → allocator → instance ([`Operators::verify_credentials`])
//!   before it sends a request byte to an instance.
//!
//! Everything is a pure function of bytes, keys and a wall-clock second passed in,
//! so the simulation runs rogue nodes against the same code production uses.

use crate::time::Instant;
use crate::types::{ContentHash, PeerId, ServiceInfo};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Domain separation: a signature made for one kind of statement never verifies as another.
const ENTRY_DOMAIN: &[u8] = b"physarum/registry-entry/v1\0";
const GRANT_DOMAIN: &[u8] = b"physarum/allocator-grant/v1\0";
const CERT_DOMAIN: &[u8] = b"physarum/instance-cert/v1\0";

/// How far a certificate's expiry may lie behind our clock (machines' clocks differ).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How long an instance certificate is valid; allocators renew it at every cull round.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(600);

/// An Ed25519 public key (an operator's, or an allocator's libp2p identity key),
/// written as 64 hex digits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s.trim()).map_err(|e| format!("not a public key (64 hex digits expected): {e}"))?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("a public key has 32 bytes, this one {}", b.len()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 public key".to_string())?;
        Ok(PublicKey(bytes))
    }
}

/// An Ed25519 signing key: an operator's (from `physarum keygen`) or an allocator's
/// identity. Never printed.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&secret))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    fn sign(&self, domain: &[u8], body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(domain.len() + body.len());
        msg.extend_from_slice(domain);
        msg.extend_from_slice(body);
        self.0.sign(&msg).to_bytes().to_vec()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

/// Why a signed statement was not accepted. The messages say which check failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustError {
    /// No operator keys are configured, so nothing can be verified.
    NoOperators,
    Unsigned,
    /// Signed by a key that is not one of the configured operators.
    UnlistedKey(PublicKey),
    BadSignature(&'static str),
    /// A statement about something else than what it is used for.
    Mismatch(String),
    Expired {
        not_after: u64,
        now: u64,
    },
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::NoOperators => f.write_str(
                "no operator keys are configured: add \"Operators\": [\"<public key>\"] to conf.json or pass \
                 --operator <public key> (make a key with `physarum keygen --out operator.key`)",
            ),
            TrustError::Unsigned => f.write_str("the entry is unsigned: sign it with --operator-key KEYFILE"),
            TrustError::UnlistedKey(k) => write!(f, "signed by key {k}, which is not a configured operator"),
            TrustError::BadSignature(what) => write!(f, "the {what} signature does not verify"),
            TrustError::Mismatch(m) => f.write_str(m),
            TrustError::Expired { not_after, now } => {
                write!(f, "the instance certificate expired at {not_after} (now {now}, unix seconds)")
            }
        }
    }
}

impl std::error::Error for TrustError {}

fn verify(key: &PublicKey, domain: &[u8], body: &[u8], signature: &[u8], what: &'static str) -> Result<(), TrustError> {
    let key = VerifyingKey::from_bytes(&key.0).map_err(|_| TrustError::BadSignature(what))?;
    let sig: [u8; 64] = signature.try_into().map_err(|_| TrustError::BadSignature(what))?;
    let mut msg = Vec::with_capacity(domain.len() + body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(body);
    key.verify_strict(&msg, &Signature::from_bytes(&sig)).map_err(|_| TrustError::BadSignature(what))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard of plain data never fails, and is canonical for a given value.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// A registry entry as an operator signed it. `info: None` marks a removal (a
/// signed tombstone), so an older entry cannot be replayed over it either.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    pub name: String,
    /// Grows with every change; a registry refuses a version not above the one it holds.
    pub version: u64,
    pub info: Option<ServiceInfo>,
    pub signer: PublicKey,
    /// Empty when unsigned.
    pub signature: Vec<u8>,
}

impl SignedEntry {
    pub fn sign(name: String, version: u64, info: Option<ServiceInfo>, key: &SecretKey) -> Self {
        let signature = key.sign(ENTRY_DOMAIN, &encode(&(&name, version, &info)));
        SignedEntry { name, version, info, signer: key.public(), signature }
    }

    fn body(&self) -> Vec<u8> {
        encode(&(&self.name, self.version, &self.info))
    }
}

/// An operator's statement that the allocator with this peer id and key may start
/// instances (`physarum grant`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub allocator: PeerId,
    /// The allocator's identity key; it signs the certificates of its instances.
    pub allocator_key: PublicKey,
    pub operator: PublicKey,
    pub signature: Vec<u8>,
}

impl Grant {
    pub fn sign(allocator: PeerId, allocator_key: PublicKey, operator: &SecretKey) -> Self {
        let signature = operator.sign(GRANT_DOMAIN, &encode(&(&allocator, &allocator_key)));
        Grant { allocator, allocator_key, operator: operator.public(), signature }
    }

    fn body(&self) -> Vec<u8> {
        encode(&(&self.allocator, &self.allocator_key))
    }
}

/// A statement that `instance` serves `service` until `not_after` (unix seconds),
/// signed by an allocator (under a [`Grant`]) or by an operator directly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCert {
    pub instance: PeerId,
    pub service: ContentHash,
    pub not_after: u64,
    pub issuer: PublicKey,
    pub signature: Vec<u8>,
}

impl InstanceCert {
    fn body(&self) -> Vec<u8> {
        encode(&(&self.instance, &self.service, self.not_after))
    }
}

/// What an instance shows a client before serving it: its certificate and, when an
/// allocator issued it, the allocator's grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub grant: Option<Grant>,
    pub cert: InstanceCert,
}

/// Signs instance certificates: an allocator (its identity key and its grant) or an
/// operator starting a sidecar by hand (its own key, no grant).
#[derive(Clone, Debug)]
pub struct Issuer {
    key: SecretKey,
    grant: Option<Grant>,
}

impl Issuer {
    /// An allocator's issuer. The grant must name `key`'s public key.
    pub fn allocator(key: SecretKey, grant: Grant) -> Result<Self, TrustError> {
        if grant.allocator_key != key.public() {
            return Err(TrustError::Mismatch(format!(
                "the grant is for allocator key {}, this allocator's key is {}",
                grant.allocator_key,
                key.public()
            )));
        }
        Ok(Issuer { key, grant: Some(grant) })
    }

    /// An operator certifying an instance directly.
    pub fn operator(key: SecretKey) -> Self {
        Issuer { key, grant: None }
    }

    pub fn issue(&self, instance: PeerId, service: ContentHash, not_after: u64) -> Credentials {
        let mut cert = InstanceCert { instance, service, not_after, issuer: self.key.public(), signature: Vec::new() };
        cert.signature = self.key.sign(CERT_DOMAIN, &cert.body());
        Credentials { grant: self.grant.clone(), cert }
    }
}

/// The operators' public keys every node is configured with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operators(Vec<PublicKey>);

impl Operators {
    pub fn new(mut keys: Vec<PublicKey>) -> Self {
        keys.sort();
        keys.dedup();
        Operators(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    fn listed(&self, key: &PublicKey) -> Result<(), TrustError> {
        if self.0.is_empty() {
            return Err(TrustError::NoOperators);
        }
        match self.0.binary_search(key) {
            Ok(_) => Ok(()),
            Err(_) => Err(TrustError::UnlistedKey(*key)),
        }
    }

    /// An entry signed by a listed operator, unaltered, whose service carries its name.
    pub fn verify_entry(&self, entry: &SignedEntry) -> Result<(), TrustError> {
        if self.0.is_empty() {
            return Err(TrustError::NoOperators);
        }
        if entry.signature.is_empty() {
            return Err(TrustError::Unsigned);
        }
        self.listed(&entry.signer)?;
        verify(&entry.signer, ENTRY_DOMAIN, &entry.body(), &entry.signature, "entry")?;
        match &entry.info {
            Some(info) if info.name != entry.name => {
                Err(TrustError::Mismatch(format!("the entry for '{}' describes service '{}'", entry.name, info.name)))
            }
            _ => Ok(()),
        }
    }

    /// A grant signed by a listed operator.
    pub fn verify_grant(&self, grant: &Grant) -> Result<(), TrustError> {
        self.listed(&grant.operator)?;
        verify(&grant.operator, GRANT_DOMAIN, &grant.body(), &grant.signature, "grant")
    }

    /// `credentials` show that `instance` may serve `service` at `unix_now`: the
    /// chain operator → allocator → instance (or operator → instance) holds.
    pub fn verify_credentials(
        &self,
        credentials: &Credentials,
        instance: &PeerId,
        service: &ContentHash,
        unix_now: u64,
    ) -> Result<(), TrustError> {
        let cert = &credentials.cert;
        match &credentials.grant {
            Some(grant) => {
                self.verify_grant(grant)?;
                if cert.issuer != grant.allocator_key {
                    return Err(TrustError::Mismatch(format!(
                        "the certificate was signed by {}, not by the granted allocator {}",
                        cert.issuer, grant.allocator
                    )));
                }
            }
            None => self.listed(&cert.issuer)?,
        }
        verify(&cert.issuer, CERT_DOMAIN, &cert.body(), &cert.signature, "instance certificate")?;
        if cert.instance != *instance {
            return Err(TrustError::Mismatch(format!(
                "the certificate is for instance {}, the peer is {instance}",
                cert.instance
            )));
        }
        if cert.service != *service {
            return Err(TrustError::Mismatch(format!(
                "the certificate is for service hash {}, not {service}",
                cert.service
            )));
        }
        if unix_now > cert.not_after.saturating_add(CLOCK_SKEW.as_secs()) {
            return Err(TrustError::Expired { not_after: cert.not_after, now: unix_now });
        }
        Ok(())
    }
}

/// Trust settings of a node.
#[derive(Clone, Debug)]
pub struct TrustConfig {
    pub operators: Operators,
    /// Unix seconds at the core's `Instant::ZERO`: certificates expire in wall time,
    /// the core counts its own time, and the runtime says how the two line up.
    pub unix_at_zero: u64,
    /// Signs certificates: the allocator's identity and grant, or an operator's key
    /// for a hand-started sidecar.
    pub issuer: Option<Issuer>,
    pub cert_lifetime: Duration,
}

impl TrustConfig {
    pub fn new(operators: Operators, unix_at_zero: u64) -> Self {
        TrustConfig { operators, unix_at_zero, issuer: None, cert_lifetime: DEFAULT_CERT_LIFETIME }
    }

    /// Wall-clock unix seconds at the core's `now`.
    pub fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_at_zero.saturating_add(now.as_micros() / 1_000_000)
    }

    /// Credentials for `instance` serving `service`, valid for the configured
    /// lifetime from `now`; `None` without an issuer.
    pub fn issue(&self, now: Instant, instance: PeerId, service: ContentHash) -> Option<Credentials> {
        let not_after = self.unix_secs(now).saturating_add(self.cert_lifetime.as_secs());
        Some(self.issuer.as_ref()?.issue(instance, service, not_after))
    }
}

/// Whether an allocator may run `program`: an absolute path inside one of `roots`,
/// with no `.`/`..` components that could climb out. (The process driver checks the
/// resolved path again, against symlinks.)
pub fn program_within(program: &str, roots: &[String]) -> Result<(), String> {
    if roots.is_empty() {
        return Err("this allocator runs no programs: start it with --exec-root DIR".into());
    }
    if !program.starts_with('/') {
        return Err(format!("program {program:?} is not an absolute path"));
    }
    if program.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("program {program:?} has '.' or '..' in its path"));
    }
    let inside = roots.iter().any(|root| {
        let root = root.trim_end_matches('/');
        program.strip_prefix(root).is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
    });
    match inside {
        true => Ok(()),
        false => Err(format!("program {program} is outside this allocator's exec roots ({})", roots.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::Requirements;
    use crate::types::RunSpec;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes([n; 32])
    }

    fn info(name: &str) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            hash: ContentHash("h".into()),
            run: RunSpec::Exec { program: "/opt/hello".into(), args: vec![], env: vec![] },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        }
    }

    #[test]
    fn entries_verify_only_with_a_listed_key_and_unaltered() {
        let ops = Operators::new(vec![key(1).public()]);
        let good = SignedEntry::sign("a".into(), 1, Some(info("a")), &key(1));
        assert_eq!(ops.verify_entry(&good), Ok(()));

        let stranger = SignedEntry::sign("a".into(), 1, Some(info("a")), &key(2));
        assert_eq!(ops.verify_entry(&stranger), Err(TrustError::UnlistedKey(key(2).public())));

        let mut unsigned = good.clone();
        unsigned.signature.clear();
        assert_eq!(ops.verify_entry(&unsigned), Err(TrustError::Unsigned));

        // Every signed field is covered.
        let mut run = good.clone();
        run.info.as_mut().unwrap().run = RunSpec::Exec { program: "/bin/sh".into(), args: vec![], env: vec![] };
        let mut version = good.clone();
        version.version = 2;
        let mut name = good.clone();
        name.name = "b".into();
        let mut reqs = good.clone();
        reqs.info.as_mut().unwrap().memory_mb = 1;
        let mut removed = good.clone();
        removed.info = None;
        for tampered in [run, version, name, reqs, removed] {
            assert_eq!(ops.verify_entry(&tampered), Err(TrustError::BadSignature("entry")), "{tampered:?}");
        }

        let mut renamed = SignedEntry::sign("a".into(), 1, Some(info("b")), &key(1));
        assert!(matches!(ops.verify_entry(&renamed), Err(TrustError::Mismatch(_))));
        renamed.signature = vec![0; 10];
        assert_eq!(ops.verify_entry(&renamed), Err(TrustError::BadSignature("entry")));
        assert_eq!(Operators::default().verify_entry(&good), Err(TrustError::NoOperators));
    }

    #[test]
    fn the_chain_operator_allocator_instance_is_checked_link_by_link() {
        let ops = Operators::new(vec![key(1).public()]);
        let alloc_key = key(7);
        let grant = Grant::sign(PeerId("alloc".into()), alloc_key.public(), &key(1));
        let issuer = Issuer::allocator(alloc_key.clone(), grant.clone()).unwrap();
        let hash = ContentHash("h".into());
        let me = PeerId("inst".into());
        let creds = issuer.issue(me.clone(), hash.clone(), 1000);
        assert_eq!(ops.verify_credentials(&creds, &me, &hash, 1000), Ok(()));
        assert_eq!(ops.verify_credentials(&creds, &me, &hash, 1000 + CLOCK_SKEW.as_secs()), Ok(()));
        assert!(matches!(ops.verify_credentials(&creds, &me, &hash, 1061), Err(TrustError::Expired { .. })));
        assert!(matches!(
            ops.verify_credentials(&creds, &PeerId("evil".into()), &hash, 0),
            Err(TrustError::Mismatch(_))
        ));
        assert!(matches!(
            ops.verify_credentials(&creds, &me, &ContentHash("other".into()), 0),
            Err(TrustError::Mismatch(_))
        ));

        // A grant from a stranger, a forged grant, a certificate from another key.
        let rogue_grant = Grant::sign(PeerId("alloc".into()), alloc_key.public(), &key(9));
        let rogue = Issuer::allocator(alloc_key.clone(), rogue_grant).unwrap().issue(me.clone(), hash.clone(), 1000);
        assert_eq!(ops.verify_credentials(&rogue, &me, &hash, 0), Err(TrustError::UnlistedKey(key(9).public())));
        let mut forged = creds.clone();
        forged.grant.as_mut().unwrap().allocator_key = key(8).public();
        assert_eq!(ops.verify_credentials(&forged, &me, &hash, 0), Err(TrustError::BadSignature("grant")));
        let other_signer = Issuer::operator(key(8)).issue(me.clone(), hash.clone(), 1000);
        let mut swapped = creds.clone();
        swapped.cert = other_signer.cert;
        assert!(matches!(ops.verify_credentials(&swapped, &me, &hash, 0), Err(TrustError::Mismatch(_))));
        let mut stretched = creds.clone();
        stretched.cert.not_after = u64::MAX;
        assert_eq!(
            ops.verify_credentials(&stretched, &me, &hash, 0),
            Err(TrustError::BadSignature("instance certificate"))
        );

        // An operator may certify an instance directly; a non-operator may not.
        let direct = Issuer::operator(key(1)).issue(me.clone(), hash.clone(), 1000);
        assert_eq!(ops.verify_credentials(&direct, &me, &hash, 0), Ok(()));
        let selfmade = Issuer::operator(key(5)).issue(me.clone(), hash.clone(), 1000);
        assert_eq!(ops.verify_credentials(&selfmade, &me, &hash, 0), Err(TrustError::UnlistedKey(key(5).public())));

        assert!(Issuer::allocator(key(8), grant).is_err(), "a grant for another key is refused at start");
    }

    #[test]
    fn public_keys_round_trip_as_hex_and_bad_text_is_refused() {
        let k = key(3).public();
        assert_eq!(k.to_string().parse::<PublicKey>(), Ok(k));
        assert!("zz".parse::<PublicKey>().is_err());
        assert!("abcd".parse::<PublicKey>().is_err());
        assert!(!format!("{:?}", key(3)).contains(&hex::encode([3u8; 32])), "secrets are never printed");
    }

    #[test]
    fn programs_run_only_from_exec_roots() {
        let roots = vec!["/opt/svc/".to_string(), "/srv".to_string()];
        assert_eq!(program_within("/opt/svc/hello", &roots), Ok(()));
        assert_eq!(program_within("/srv/a/b", &roots), Ok(()));
        for bad in ["/bin/sh", "/opt/svc", "/opt/svc/", "/opt/svcx/a", "/opt/svc/../../bin/sh", "opt/svc/a", "/srv/./a"]
        {
            assert!(program_within(bad, &roots).is_err(), "{bad}");
        }
        assert!(program_within("/opt/svc/hello", &[]).is_err());
    }
}
