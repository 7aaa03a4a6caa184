//! The registry role: the authoritative map from service name to an operator-signed
//! entry. The store is in memory here; the runtime persists every change it is
//! told of (`Output::PersistRegistry`) and hands the saved entries back at start.
//! A registry on a shared store (etcd) decides its writes with the same [`admit`]
//! against the shared store's entry, and feeds what the store holds back in as puts.
//!
//! Writes are verified here (signed by a configured operator, a version above the
//! one held, within the size limits); readers verify again themselves, so a rogue
//! node answering as a registry can withhold entries but not forge them.

use crate::trust::{Operators, SignedEntry};
use crate::types::ServiceInfo;
use crate::wire::{Request, Response};
use std::collections::BTreeMap;

/// Longest service name accepted.
pub const MAX_NAME_LEN: usize = 128;
/// Largest signed entry accepted, encoded.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Most names held (services and removal markers together).
pub const MAX_ENTRIES: usize = 1024;
/// A `RegistryList` page stops adding entries past this many encoded bytes, so a
/// page always fits in one frame.
pub const MAX_PAGE_BYTES: usize = 512 * 1024;

#[derive(Debug, Default)]
pub struct Registry {
    operators: Operators,
    /// Every name's latest signed entry, removals included (they keep their version,
    /// so an older entry cannot be replayed over a removal).
    entries: BTreeMap<String, SignedEntry>,
}

impl Registry {
    /// A registry holding `entries` (as loaded from the store); entries that do not
    /// verify against `operators` are skipped.
    pub fn new(operators: Operators, entries: Vec<SignedEntry>) -> Self {
        let entries = entries
            .into_iter()
            .filter(|e| check(&operators, e).is_ok())
            .map(|e| (e.name.clone(), e))
            .take(MAX_ENTRIES)
            .collect();
        Registry { operators, entries }
    }

    /// The service registered under `name`, if any (not a removal).
    pub fn get(&self, name: &str) -> Option<&ServiceInfo> {
        self.entries.get(name).and_then(|e| e.info.as_ref())
    }

    /// Every signed entry, removals included, in name order (what the store keeps).
    pub fn entries(&self) -> Vec<SignedEntry> {
        self.entries.values().cloned().collect()
    }

    /// Serve a registry request. Returns the response and whether the store changed.
    pub fn handle(&mut self, request: Request) -> (Response, bool) {
        match request {
            Request::RegistryGet { name } => (
                Response::Entry { entry: self.entries.get(&name).filter(|e| e.info.is_some()).cloned().map(Box::new) },
                false,
            ),
            Request::RegistryList { after } => (self.page(after), false),
            Request::RegistryPut { entry } => match self.put(*entry) {
                Ok(changed) => (Response::Done, changed),
                Err(reason) => (Response::Error { reason }, false),
            },
            other => (Response::Error { reason: format!("not a registry request: {other:?}") }, false),
        }
    }

    fn put(&mut self, entry: SignedEntry) -> Result<bool, String> {
        let changed = admit(&self.operators, self.entries.get(&entry.name), self.entries.len(), &entry)?;
        if changed {
            self.entries.insert(entry.name.clone(), entry);
        }
        Ok(changed)
    }

    fn page(&self, after: Option<String>) -> Response {
        use std::ops::Bound;
        let start = match &after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut next = None;
        for entry in self.entries.range((start, Bound::Unbounded)).map(|(_, e)| e) {
            if entry.info.is_none() {
                continue;
            }
            let size = encoded_len(entry);
            if !entries.is_empty() && bytes + size > MAX_PAGE_BYTES {
                next = entries.last().map(|e: &SignedEntry| e.name.clone());
                break;
            }
            bytes += size;
            entries.push(entry.clone());
        }
        Response::Entries { entries, next }
    }
}

/// Whether `entry` may replace `held` (the entry stored under its name, if any) in a
/// store that holds `names_held` names: `Ok(true)` to store it, `Ok(false)` when it
/// is exactly what is held, else why not. Every store decides writes with this,
/// the in-memory one here and a shared one (etcd) alike.
pub fn admit(
    operators: &Operators,
    held: Option<&SignedEntry>,
    names_held: usize,
    entry: &SignedEntry,
) -> Result<bool, String> {
    check(operators, entry)?;
    let name = &entry.name;
    match held {
        Some(held) if held == entry => Ok(false),
        Some(held) if entry.version <= held.version => Err(format!(
            "refused: version {} of '{name}' is not newer than the stored version {}",
            entry.version, held.version
        )),
        Some(held) if held.info.is_none() && entry.info.is_none() => {
            Err(format!("no service named '{name}' is registered"))
        }
        None if entry.info.is_none() => Err(format!("no service named '{name}' is registered")),
        None if names_held >= MAX_ENTRIES => {
            Err(format!("refused: the registry holds its maximum of {MAX_ENTRIES} names"))
        }
        _ => Ok(true),
    }
}

fn encoded_len(entry: &SignedEntry) -> usize {
    postcard::to_allocvec(entry).map_or(usize::MAX, |v| v.len())
}

/// Why `entry` cannot be stored, if it cannot: its signature, then its size and
/// content (also what a shared store's contents are checked with when read back).
pub fn check(operators: &Operators, entry: &SignedEntry) -> Result<(), String> {
    operators.verify_entry(entry).map_err(|e| format!("refused: {e}"))?;
    let size = encoded_len(entry);
    if size > MAX_ENTRY_BYTES {
        return Err(format!("refused: the entry is {size} bytes, more than the limit of {MAX_ENTRY_BYTES}"));
    }
    validate_name(&entry.name)?;
    match &entry.info {
        Some(info) => validate(info),
        None => Ok(()),
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("service name must be 1 to {MAX_NAME_LEN} bytes long"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("service name '{name}' may only contain ASCII letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Why an entry cannot be registered, if it cannot.
pub fn validate(info: &ServiceInfo) -> Result<(), String> {
    let name = &info.name;
    validate_name(name)?;
    if info.hash.0.is_empty() {
        return Err(format!("service '{name}' has an empty content hash"));
    }
    if let (Some(soft), Some(hard)) = (info.requirements.soft.rtt, info.requirements.hard.rtt) {
        if soft > hard {
            return Err(format!("service '{name}': soft RTT {soft:?} is above hard RTT {hard:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::Requirements;
    use crate::trust::SecretKey;
    use crate::types::{ContentHash, RunSpec};
    use std::time::Duration;

    fn op() -> SecretKey {
        SecretKey::from_bytes([1; 32])
    }

    fn info(name: &str) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            hash: ContentHash("abc".into()),
            run: RunSpec::Exec { program: "hello".into(), args: vec![], env: vec![] },
            requirements: Requirements::rtt(Duration::from_millis(5), Duration::from_millis(10)),
            cpu_millis: 100,
            memory_mb: 16,
            stateful: false,
            client_mode: false,
        }
    }

    fn signed(name: &str, version: u64) -> SignedEntry {
        SignedEntry::sign(name.into(), version, Some(info(name)), &op())
    }

    fn removal(name: &str, version: u64) -> SignedEntry {
        SignedEntry::sign(name.into(), version, None, &op())
    }

    fn registry() -> Registry {
        Registry::new(Operators::new(vec![op().public()]), vec![])
    }

    fn put(r: &mut Registry, entry: SignedEntry) -> (Response, bool) {
        r.handle(Request::RegistryPut { entry: Box::new(entry) })
    }

    fn refused(resp: &Response, needle: &str) -> bool {
        matches!(resp, Response::Error { reason } if reason.contains(needle))
    }

    #[test]
    fn put_get_list_remove() {
        let mut r = registry();
        assert_eq!(put(&mut r, signed("b", 1)), (Response::Done, true));
        assert_eq!(put(&mut r, signed("a", 1)), (Response::Done, true));
        assert_eq!(put(&mut r, signed("a", 1)), (Response::Done, false), "same entry again");
        assert_eq!(
            r.handle(Request::RegistryGet { name: "a".into() }).0,
            Response::Entry { entry: Some(Box::new(signed("a", 1))) }
        );
        assert_eq!(r.handle(Request::RegistryGet { name: "x".into() }).0, Response::Entry { entry: None });
        assert_eq!(
            r.handle(Request::RegistryList { after: None }).0,
            Response::Entries { entries: vec![signed("a", 1), signed("b", 1)], next: None }
        );
        assert_eq!(put(&mut r, removal("a", 2)), (Response::Done, true));
        assert_eq!(r.handle(Request::RegistryGet { name: "a".into() }).0, Response::Entry { entry: None });
        assert!(r.get("a").is_none());
        assert!(refused(&put(&mut r, removal("a", 3)).0, "no service named 'a'"));
        assert!(refused(&put(&mut r, removal("zz", 1)).0, "no service named 'zz'"));
        // The removal is kept, so the old entry cannot come back; a newer one can.
        assert!(refused(&put(&mut r, signed("a", 1)).0, "not newer"));
        assert_eq!(put(&mut r, signed("a", 5)), (Response::Done, true));
    }

    #[test]
    fn only_newer_versions_replace_an_entry() {
        let mut r = registry();
        put(&mut r, signed("a", 10));
        let (resp, changed) = put(&mut r, signed("a", 9));
        assert!(refused(&resp, "version 9 of 'a' is not newer than the stored version 10"), "{resp:?}");
        assert!(!changed);
        assert!(refused(&put(&mut r, SignedEntry::sign("a".into(), 10, None, &op())).0, "not newer"));
        assert_eq!(put(&mut r, signed("a", 11)), (Response::Done, true));
    }

    #[test]
    fn writes_need_a_listed_operator_and_a_valid_signature() {
        let mut r = registry();
        let stranger = SignedEntry::sign("a".into(), 1, Some(info("a")), &SecretKey::from_bytes([2; 32]));
        assert!(refused(&put(&mut r, stranger).0, "not a configured operator"));
        let mut forged = signed("a", 1);
        forged.info.as_mut().unwrap().run = RunSpec::Exec { program: "/bin/sh".into(), args: vec![], env: vec![] };
        assert!(refused(&put(&mut r, forged).0, "signature does not verify"));
        let mut unsigned = signed("a", 1);
        unsigned.signature.clear();
        assert!(refused(&put(&mut r, unsigned).0, "unsigned"));
        let mut open = Registry::new(Operators::default(), vec![]);
        assert!(refused(&put(&mut open, signed("a", 1)).0, "no operator keys are configured"));
        assert!(r.entries().is_empty() && open.entries().is_empty());
    }

    #[test]
    fn oversized_entries_and_too_many_names_are_refused_at_once() {
        let mut r = registry();
        let mut big = info("big");
        big.run = RunSpec::Exec { program: "x".repeat(MAX_ENTRY_BYTES), args: vec![], env: vec![] };
        let (resp, changed) = put(&mut r, SignedEntry::sign("big".into(), 1, Some(big), &op()));
        assert!(refused(&resp, "more than the limit of 65536"), "{resp:?}");
        assert!(!changed);
        for i in 0..MAX_ENTRIES {
            assert_eq!(put(&mut r, signed(&format!("s{i}"), 1)).0, Response::Done);
        }
        assert!(refused(&put(&mut r, signed("one-more", 1)).0, "maximum of 1024"));
        assert_eq!(put(&mut r, signed("s0", 2)).0, Response::Done, "replacing still works when full");
    }

    #[test]
    fn lists_come_in_pages_that_fit_a_frame() {
        let mut r = registry();
        let fat = |name: &str| {
            let mut i = info(name);
            i.run = RunSpec::Exec { program: "p".repeat(60 * 1024), args: vec![], env: vec![] };
            SignedEntry::sign(name.into(), 1, Some(i), &op())
        };
        let all: Vec<SignedEntry> = (0..20).map(|i| fat(&format!("f{i:02}"))).collect();
        for e in &all {
            assert_eq!(put(&mut r, e.clone()).0, Response::Done);
        }
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let Response::Entries { entries, next } = r.handle(Request::RegistryList { after }).0 else { panic!() };
            let frame = crate::wire::encode(&Response::Entries { entries: entries.clone(), next: next.clone() });
            assert!(frame.is_ok(), "every page fits in a frame");
            assert!(!entries.is_empty());
            got.extend(entries);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, all);
    }

    #[test]
    fn invalid_entries_are_refused_with_a_reason() {
        let mut r = registry();
        let mut no_hash = info("x");
        no_hash.hash = ContentHash(String::new());
        let mut inverted = info("y");
        inverted.requirements = Requirements::rtt(Duration::from_millis(20), Duration::from_millis(10));
        let bad = [
            SignedEntry::sign("a/b".into(), 1, Some(info("a/b")), &op()),
            SignedEntry::sign("x".into(), 1, Some(no_hash), &op()),
            SignedEntry::sign("y".into(), 1, Some(inverted), &op()),
            SignedEntry::sign(String::new(), 1, Some(info("")), &op()),
        ];
        for entry in bad {
            let (resp, changed) = put(&mut r, entry);
            assert!(matches!(resp, Response::Error { .. }), "{resp:?}");
            assert!(!changed);
        }
        assert!(r.entries().is_empty());
    }

    #[test]
    fn stored_entries_that_do_not_verify_are_not_loaded() {
        let mut tampered = signed("b", 1);
        tampered.version = 2;
        let r = Registry::new(Operators::new(vec![op().public()]), vec![signed("a", 1), tampered]);
        assert!(r.get("a").is_some());
        assert!(r.get("b").is_none());
    }

    #[test]
    fn non_registry_requests_get_an_error() {
        let mut r = registry();
        assert!(matches!(r.handle(Request::IdleQuery { credentials: None }).0, Response::Error { .. }));
    }
}
