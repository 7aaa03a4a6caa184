//! A client-side cache of registry answers, with single-flight queries: however many
//! callers ask for one name at once, the registry is asked once.
//!
//! Freshness: a name in use is asked about again every `refresh` (about a second)
//! in the background while its cached answer keeps being served, so a changed or
//! removed entry reaches every client and allocator within about that. A name not
//! in use is not refreshed; its next lookup asks first. When no registry answers,
//! the cached entry keeps being served (for up to `ttl` since a registry last
//! confirmed it), so clients ride out the loss of every registry.

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
    /// The registry could not be asked (unreachable, timed out, malformed answer)
    /// and nothing usable is cached.
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
    /// When a registry last answered about this name.
    confirmed: Instant,
    /// The last lookup.
    used: Instant,
    /// When the last refresh failed: until `refresh` later the cached answer is
    /// served without asking again.
    failed: Option<Instant>,
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

    fn expires(&self, c: &Cached) -> Instant {
        c.confirmed + if c.info.is_some() { self.config.ttl } else { self.config.negative_ttl }
    }

    fn in_use(&self, c: &Cached, now: Instant) -> bool {
        now < c.used + self.config.in_use
    }

    /// Whether `c` is refreshed in the background: a found service that is still in
    /// use when its refresh comes due. (`poll_timeout` and `handle_timeout` both go
    /// by this, so every deadline reported is acted on.)
    fn refreshed(&self, c: &Cached) -> bool {
        c.info.is_some() && self.refresh_due(c) < c.used + self.config.in_use
    }

    /// When `c` is next due for a refresh (positive entries only).
    fn refresh_due(&self, c: &Cached) -> Instant {
        let due = c.confirmed + self.config.refresh;
        match c.failed {
            Some(f) => due.max(f + self.config.refresh),
            None => due,
        }
    }

    fn query(&mut self, name: &str) {
        if self.in_flight.insert(name.to_string()) {
            self.out.push_back(RegistryCacheOutput::Query { name: name.to_string() });
        }
    }

    /// Resolve `name`: the answer at once when one is cached that may be served, else
    /// `None` and a later [`RegistryCacheOutput::Resolved`] (one query however many ask).
    pub fn lookup(&mut self, now: Instant, name: &str) -> Option<Resolution> {
        if let Some(c) = self.cached.get(name) {
            if now >= self.expires(c) {
                self.cached.remove(name);
            } else {
                let was_in_use = self.in_use(c, now);
                let ask_first = c.info.is_some() && !was_in_use && now >= self.refresh_due(c);
                let answer = match &c.info {
                    Some(info) => Resolution::Found(info.clone()),
                    None => Resolution::Unknown,
                };
                if let Some(c) = self.cached.get_mut(name) {
                    c.used = now;
                }
                // A name in use is kept fresh by `handle_timeout`; one coming back
                // into use after a pause may be out of date, so it is asked about
                // first (unless that is already under way).
                if !ask_first || self.in_flight.contains(name) {
                    return Some(answer);
                }
                self.query(name);
                return None;
            }
        }
        self.query(name);
        None
    }

    /// The registry answered about `name`: `Ok(None)` = no such service. A failure
    /// keeps a cached entry serving (and is what waiters get); with nothing cached
    /// it is passed on but not cached, so the next lookup asks again.
    pub fn answer(&mut self, now: Instant, name: &str, result: Result<Option<ServiceInfo>, String>) {
        if !self.in_flight.remove(name) {
            return;
        }
        let used = self.cached.get(name).map_or(now, |c| c.used);
        let resolution = match result {
            Ok(info) => {
                let resolution = match &info {
                    Some(info) => Resolution::Found(info.clone()),
                    None => Resolution::Unknown,
                };
                self.cached.insert(name.to_string(), Cached { info, confirmed: now, used, failed: None });
                resolution
            }
            Err(e) => match self.cached.get_mut(name) {
                Some(Cached { info: Some(info), failed, .. }) => {
                    *failed = Some(now);
                    Resolution::Found(info.clone())
                }
                _ => Resolution::Unavailable(e),
            },
        };
        self.out.push_back(RegistryCacheOutput::Resolved { name: name.to_string(), resolution });
    }

    /// Drop what a newer registry write made stale (e.g. after a local delete).
    /// The cached entry of `name`, if one is held (no freshness check, no refresh).
    pub fn peek(&self, name: &str) -> Option<&ServiceInfo> {
        self.cached.get(name).and_then(|c| c.info.as_ref())
    }

    pub fn invalidate(&mut self, name: &str) {
        self.cached.remove(name);
    }

    /// Forget expired entries, and ask again about names in use whose answer is due
    /// for a refresh.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<String> =
            self.cached.iter().filter(|(_, c)| now >= self.expires(c)).map(|(n, _)| n.clone()).collect();
        for name in expired {
            self.cached.remove(&name);
        }
        let due: Vec<String> = self
            .cached
            .iter()
            .filter(|(n, c)| self.refreshed(c) && now >= self.refresh_due(c) && !self.in_flight.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.query(&name);
        }
    }

    pub fn poll_output(&mut self) -> Option<RegistryCacheOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.cached
            .iter()
            .map(|(name, c)| {
                let expires = self.expires(c);
                match self.refreshed(c) && !self.in_flight.contains(name) {
                    true => expires.min(self.refresh_due(c)),
                    false => expires,
                }
            })
            .min()
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

    fn resolved(name: &str, resolution: Resolution) -> RegistryCacheOutput {
        RegistryCacheOutput::Resolved { name: name.into(), resolution }
    }

    fn query(name: &str) -> RegistryCacheOutput {
        RegistryCacheOutput::Query { name: name.into() }
    }

    fn at(ms: u64) -> Instant {
        T0 + Duration::from_millis(ms)
    }

    /// A cache that resolved `a` at T0.
    fn with_a(cfg: RegistryCacheConfig) -> RegistryCache {
        let mut c = RegistryCache::new(cfg);
        c.lookup(T0, "a");
        c.answer(T0, "a", Ok(Some(info("a"))));
        drain(&mut c);
        c
    }

    #[test]
    fn concurrent_lookups_make_one_query_and_all_get_the_answer() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        for _ in 0..5 {
            assert_eq!(c.lookup(T0, "a"), None);
        }
        assert_eq!(drain(&mut c), vec![query("a")]);
        c.answer(T0, "a", Ok(Some(info("a"))));
        assert_eq!(drain(&mut c), vec![resolved("a", Resolution::Found(info("a")))]);
        assert_eq!(c.lookup(T0, "a"), Some(Resolution::Found(info("a"))));
    }

    #[test]
    fn a_name_in_use_is_refreshed_in_the_background_and_changes_are_seen() {
        let cfg = RegistryCacheConfig::default();
        let mut c = with_a(cfg.clone());
        assert_eq!(c.poll_timeout(), Some(T0 + cfg.refresh), "the refresh is the next deadline");
        c.handle_timeout(at(999));
        assert!(drain(&mut c).is_empty(), "not due yet");
        c.handle_timeout(T0 + cfg.refresh);
        assert_eq!(drain(&mut c), vec![query("a")]);
        // While the refresh is under way the cached answer is served at once.
        assert_eq!(c.lookup(at(1100), "a"), Some(Resolution::Found(info("a"))));
        assert!(drain(&mut c).is_empty(), "no second query");
        let mut changed = info("a");
        changed.hash = ContentHash("h-a-v2".into());
        c.answer(at(1200), "a", Ok(Some(changed.clone())));
        drain(&mut c);
        assert_eq!(c.lookup(at(1300), "a"), Some(Resolution::Found(changed)));
        assert_eq!(c.poll_timeout(), Some(at(2200)));
    }

    #[test]
    fn a_removed_service_is_unknown_after_the_refresh() {
        let cfg = RegistryCacheConfig::default();
        let mut c = with_a(cfg.clone());
        c.handle_timeout(T0 + cfg.refresh);
        assert_eq!(drain(&mut c), vec![query("a")]);
        c.answer(T0 + cfg.refresh, "a", Ok(None));
        assert_eq!(drain(&mut c), vec![resolved("a", Resolution::Unknown)]);
        assert_eq!(c.lookup(T0 + cfg.refresh, "a"), Some(Resolution::Unknown));
    }

    #[test]
    fn cached_entries_keep_serving_while_no_registry_answers_for_up_to_the_ttl() {
        let cfg = RegistryCacheConfig { in_use: Duration::from_secs(7200), ..RegistryCacheConfig::default() };
        let mut c = with_a(cfg.clone());
        let mut now = T0;
        // Every refresh fails; the entry keeps serving and is retried once per `refresh`.
        while now + cfg.refresh < T0 + cfg.ttl {
            now += cfg.refresh;
            c.handle_timeout(now);
            assert_eq!(drain(&mut c), vec![query("a")], "at {now:?}");
            c.answer(now, "a", Err("unreachable".into()));
            assert_eq!(drain(&mut c), vec![resolved("a", Resolution::Found(info("a")))]);
            assert_eq!(c.lookup(now, "a"), Some(Resolution::Found(info("a"))));
            assert!(drain(&mut c).is_empty(), "failed just now: no new query");
        }
        c.handle_timeout(T0 + cfg.ttl);
        assert_eq!(c.lookup(T0 + cfg.ttl, "a"), None, "unconfirmed for the ttl: dropped");
        assert_eq!(drain(&mut c), vec![query("a")]);
    }

    #[test]
    fn a_name_out_of_use_is_not_refreshed_and_is_asked_about_on_its_next_lookup() {
        let cfg = RegistryCacheConfig::default();
        let mut c = with_a(cfg.clone());
        let mut now = T0;
        let mut queries = 0;
        while now < T0 + cfg.in_use * 3 {
            now += Duration::from_millis(100);
            c.handle_timeout(now);
            for o in drain(&mut c) {
                assert_eq!(o, query("a"));
                queries += 1;
                c.answer(now, "a", Ok(Some(info("a"))));
            }
            drain(&mut c);
        }
        assert!(queries <= 60, "refreshed only while in use ({queries} refreshes)");
        assert!(queries >= 55, "refreshed about every second while in use ({queries} refreshes)");
        // Back in use after the pause: ask first; if no registry answers, the cached entry.
        assert_eq!(c.lookup(now, "a"), None);
        assert_eq!(drain(&mut c), vec![query("a")]);
        c.answer(now, "a", Err("unreachable".into()));
        assert_eq!(drain(&mut c), vec![resolved("a", Resolution::Found(info("a")))]);
        assert_eq!(c.lookup(now, "a"), Some(Resolution::Found(info("a"))));
    }

    #[test]
    fn unknown_services_are_remembered_briefly() {
        let cfg = RegistryCacheConfig::default();
        let mut c = RegistryCache::new(cfg.clone());
        c.lookup(T0, "nope");
        c.answer(T0, "nope", Ok(None));
        drain(&mut c);
        assert_eq!(c.lookup(T0 + cfg.negative_ttl / 2, "nope"), Some(Resolution::Unknown));
        assert_eq!(c.lookup(T0 + cfg.negative_ttl, "nope"), None);
        c.handle_timeout(T0 + cfg.negative_ttl);
        assert_eq!(drain(&mut c), vec![query("nope")], "unknown names are not refreshed, only asked again");
    }

    #[test]
    fn failures_are_not_cached() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        c.lookup(T0, "a");
        c.answer(T0, "a", Err("unreachable".into()));
        assert_eq!(drain(&mut c)[1..], [resolved("a", Resolution::Unavailable("unreachable".into()))]);
        assert_eq!(c.lookup(T0, "a"), None);
        assert_eq!(drain(&mut c), vec![query("a")]);
    }

    #[test]
    fn unsolicited_answers_are_ignored() {
        let mut c = RegistryCache::new(RegistryCacheConfig::default());
        c.answer(T0, "a", Ok(Some(info("a"))));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.lookup(T0, "a"), None, "an answer nobody asked for is not cached");
    }
}
