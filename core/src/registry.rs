//! The registry role: the authoritative map from service name to [`ServiceInfo`].
//! The store is in memory here; the runtime persists every change it is told of
//! (`Output::PersistRegistry`) and hands the saved entries back at start.

use crate::types::ServiceInfo;
use crate::wire::{Request, Response};
use std::collections::BTreeMap;

/// Longest service name accepted.
pub const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Default)]
pub struct Registry {
    entries: BTreeMap<String, ServiceInfo>,
}

impl Registry {
    /// A registry holding `entries` (as loaded from the store); invalid ones are skipped.
    pub fn new(entries: Vec<ServiceInfo>) -> Self {
        let entries = entries.into_iter().filter(|i| validate(i).is_ok()).map(|i| (i.name.clone(), i)).collect();
        Registry { entries }
    }

    pub fn get(&self, name: &str) -> Option<&ServiceInfo> {
        self.entries.get(name)
    }

    /// Every entry, in name order.
    pub fn entries(&self) -> Vec<ServiceInfo> {
        self.entries.values().cloned().collect()
    }

    /// Serve a registry request. Returns the response and whether the store changed.
    pub fn handle(&mut self, request: Request) -> (Response, bool) {
        match request {
            Request::RegistryGet { name } => (Response::Service { info: self.entries.get(&name).cloned() }, false),
            Request::RegistryList => (Response::Services { infos: self.entries() }, false),
            Request::RegistryPut { info } => match validate(&info) {
                Ok(()) => {
                    let changed = self.entries.get(&info.name) != Some(&info);
                    self.entries.insert(info.name.clone(), info);
                    (Response::Done, changed)
                }
                Err(reason) => (Response::Error { reason }, false),
            },
            Request::RegistryDelete { name } => match self.entries.remove(&name) {
                Some(_) => (Response::Done, true),
                None => (Response::Error { reason: format!("no service named '{name}' is registered") }, false),
            },
            other => (Response::Error { reason: format!("not a registry request: {other:?}") }, false),
        }
    }
}

/// Why an entry cannot be registered, if it cannot.
pub fn validate(info: &ServiceInfo) -> Result<(), String> {
    let name = &info.name;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("service name must be 1 to {MAX_NAME_LEN} bytes long"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("service name '{name}' may only contain ASCII letters, digits, '-', '_' and '.'"));
    }
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
    use crate::types::{ContentHash, RunSpec};
    use std::time::Duration;

    fn info(name: &str) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            hash: ContentHash("abc".into()),
            run: RunSpec::Exec { program: "hello".into(), args: vec![] },
            requirements: Requirements::rtt(Duration::from_millis(5), Duration::from_millis(10)),
            cpu_millis: 100,
            memory_mb: 16,
            stateful: false,
            client_mode: false,
        }
    }

    #[test]
    fn put_get_list_delete() {
        let mut r = Registry::default();
        assert_eq!(r.handle(Request::RegistryPut { info: info("b") }), (Response::Done, true));
        assert_eq!(r.handle(Request::RegistryPut { info: info("a") }), (Response::Done, true));
        assert_eq!(r.handle(Request::RegistryPut { info: info("a") }), (Response::Done, false), "same entry again");
        assert_eq!(r.handle(Request::RegistryGet { name: "a".into() }).0, Response::Service { info: Some(info("a")) });
        assert_eq!(r.handle(Request::RegistryGet { name: "x".into() }).0, Response::Service { info: None });
        assert_eq!(r.handle(Request::RegistryList).0, Response::Services { infos: vec![info("a"), info("b")] });
        assert_eq!(r.handle(Request::RegistryDelete { name: "a".into() }), (Response::Done, true));
        assert!(matches!(r.handle(Request::RegistryDelete { name: "a".into() }), (Response::Error { .. }, false)));
    }

    #[test]
    fn invalid_entries_are_refused_with_a_reason() {
        let mut r = Registry::default();
        let mut bad_name = info("a/b");
        bad_name.name = "a/b".into();
        let mut no_hash = info("x");
        no_hash.hash = ContentHash(String::new());
        let mut inverted = info("y");
        inverted.requirements = Requirements::rtt(Duration::from_millis(20), Duration::from_millis(10));
        for bad in [bad_name, no_hash, inverted, info("")] {
            let (resp, changed) = r.handle(Request::RegistryPut { info: bad });
            assert!(matches!(resp, Response::Error { .. }), "{resp:?}");
            assert!(!changed);
        }
        assert!(r.entries().is_empty());
    }

    #[test]
    fn non_registry_requests_get_an_error() {
        let mut r = Registry::default();
        assert!(matches!(r.handle(Request::IdleQuery).0, Response::Error { .. }));
    }
}
