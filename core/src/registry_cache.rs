//! A client-side cache of registry answers: TTL'd positive entries, short negative
//! entries ("no such service"), and single-flight queries — however many callers
//! ask for one name at once, the registry is asked once.

use crate::config::RegistryCacheConfig;
use crate::time::Instant;
use crate::types::ServiceInfo;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What a name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Found(ServiceInfo),
    /// The registry has no such service.
    Unknown,
    /// The registry could not be asked (unreachable, timed out, malformed answer).
    Unavailable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryCacheOutput {
    /// Ask the registry about `name`; report with [`RegistryCache::answer`].
    Query { name: String },
    /// A query finished: everyone waiting for `name` gets this.
    Resolved { name: String, resolution: Resolution },
}

#[derive(Clone, Debug)]
struct Cached {
    /// `None`: the registry said there is no such service.
    info: Option<ServiceInfo>,
    expires: Instant,
}

#[derive(Debug)]
pub struct RegistryCache {
    config: RegistryCacheConfig,
    cached: BTreeMap<String, Cached>,
    in_flight: BTreeSet<String>,
    out: VecDeque<RegistryCacheOutput>,
}

impl RegistryCache {
    pub fn new(config: RegistryCacheConfig) -> Self {
        RegistryCache { config, cached: BTreeMap::new(), in_flight: BTreeSet::new(), out: VecDeque::new() }
    }

    /// Resolve `name`: the answer at once when a fresh one is cached, else `None`
    /// and a later [`RegistryCacheOutput::Resolved`] (one query however many ask).
    pub fn lookup(&mut self, now: Instant, name: &str) -> Option<Resolution> {
        if let Some(c) = self.cached.get(name) {
            if now < c.expires {
                return Some(match &c.info {
                    Some(info) => Resolution::Found(info.clone()),
                    None => Resolution::Unknown,
                });
            }
            self.cached.remove(name);
        }
        if self.in_flight.insert(name.to_string()) {
            self.out.push_back(RegistryCacheOutput::Query { name: name.to_string() });
        }
        None
    }

    /// The registry answered about `name`: `Ok(None)` = no such service. Failures
    /// are passed on but not cached, so the next lookup asks again.
    pub fn answer(&mut self, now: Instant, name: &str, result: Result<Option<ServiceInfo>, String>) {
        if !self.in_flight.remove(name) {
            return;
        }
        let resolution = match result {
            Ok(Some(info)) => {
                self.cached
                    .insert(name.to_string(), Cached { info: Some(info.clone()), expires: now + self.config.ttl });
                Resolution::Found(info)
            }
            Ok(None) => {
                self.cached.insert(name.to_string(), Cached { info: None, expires: now + self.config.negative_ttl });
                Resolution::Unknown
            }
            Err(e) => Resolution::Unavailable(e),
        };
        self.out.push_back(RegistryCacheOutput::Resolved { name: name.to_string(), resolution });
    }

    /// Drop what a newer registry write made stale (e.g. after a local delete).
    pub fn invalidate(&mut self, name: &str) {
        self.cached.remove(name);
    }

    /// Forget expired entries (they would be refreshed on lookup anyway; this bounds memory).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.cached.retain(|_, c| now < c.expires);
    }

    pub fn poll_output(&mut self) -> Option<RegistryCacheOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.cached.values().map(|c| c.expires).min()
    }

    pub fn is_querying(&self, name: &str) -> bool {
        self.in_flight.contains(name)
    }
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
            hash: ContentHash(format!("h-{name}")),
            run: RunSpec::Exec { program: "hello".into(), args: vec![], env: vec![] },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        }
    }

    fn drain(c: &mut RegistryCache) -> Vec<RegistryCacheOutput> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    const T0: Instant = Instant::ZERO;

    #[test]
    fn concurrent_lookups_make_one_query_and_all_get_the_answer() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        for _ in 0..5 {
            assert_eq!(c.lookup(T0, "a"), None);
        }
        assert_eq!(drain(&mut c), vec![RegistryCacheOutput::Query { name: "a".into() }]);
        c.answer(T0, "a", Ok(Some(info("a"))));
        assert_eq!(
            drain(&mut c),
            vec![RegistryCacheOutput::Resolved { name: "a".into(), resolution: Resolution::Found(info("a")) }]
        );
        assert_eq!(c.lookup(T0, "a"), Some(Resolution::Found(info("a"))));
    }

    #[test]
    fn positive_entries_live_for_the_ttl() {
        let cfg = RegistryCacheConfig::default();
        let mut c = RegistryCache::new(cfg.clone());
        c.lookup(T0, "a");
        c.answer(T0, "a", Ok(Some(info("a"))));
        drain(&mut c);
        let just_before = Instant::from_micros(cfg.ttl.as_micros() as u64 - 1);
        assert_eq!(c.lookup(just_before, "a"), Some(Resolution::Found(info("a"))));
        assert_eq!(c.lookup(T0 + cfg.ttl, "a"), None, "expired at the TTL");
        assert_eq!(drain(&mut c), vec![RegistryCacheOutput::Query { name: "a".into() }]);
    }

    #[test]
    fn unknown_services_are_remembered_briefly() {
        let cfg = RegistryCacheConfig::default();
        let mut c = RegistryCache::new(cfg.clone());
        c.lookup(T0, "nope");
        c.answer(T0, "nope", Ok(None));
        drain(&mut c);
        assert_eq!(c.lookup(T0 + Duration::from_secs(1), "nope"), Some(Resolution::Unknown));
        assert_eq!(c.lookup(T0 + cfg.negative_ttl, "nope"), None);
    }

    #[test]
    fn failures_are_not_cached() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        c.lookup(T0, "a");
        c.answer(T0, "a", Err("unreachable".into()));
        assert_eq!(
            drain(&mut c)[1..],
            [RegistryCacheOutput::Resolved {
                name: "a".into(),
                resolution: Resolution::Unavailable("unreachable".into())
            }]
        );
        assert_eq!(c.lookup(T0, "a"), None);
        assert_eq!(drain(&mut c), vec![RegistryCacheOutput::Query { name: "a".into() }]);
    }

    #[test]
    fn unsolicited_answers_are_ignored() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        c.answer(T0, "a", Ok(Some(info("a"))));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.lookup(T0, "a"), None, "an answer nobody asked for is not cached");
    }
}
