//! One readable log line per notable event of the core: allocations, refusals,
//! evictions with their reason, switches, retry refusals, application health, and
//! the allocator's starts, culls and losses at INFO; routine ones (cache hits,
//! probes, discoveries that found something) at DEBUG. Filter with
//! `RUST_LOG=physarum_net_real::event_log=info`.

use physarum_core::io::Event;

pub fn log_event(event: &Event) {
    match event {
        Event::Allocated { service, allocator, instance } => {
            tracing::info!(%service, peer = %instance, %allocator, "allocated a new instance");
        }
        Event::AllocationRefused { service, allocator, reason } => {
            tracing::info!(%service, peer = %allocator, "allocator refused: {reason}");
        }
        Event::Evicted { service, peer, reason } => {
            tracing::info!(%service, %peer, "evicted from the peer cache: {reason}");
        }
        Event::Switched { service, from, to } => {
            tracing::info!(%service, peer = %to, %from, "switched to a better instance");
        }
        Event::Untrusted { service, peer, reason } => {
            tracing::warn!(%service, %peer, "instance refused, not trusted: {reason}");
        }
        Event::RetryRefused { service } => {
            tracing::info!(%service, "retry refused: the retry budget is spent");
        }
        Event::AppHealth { service, answering: false } => {
            tracing::warn!(%service, "the application does not answer: probes and idle queries now say so");
        }
        Event::AppHealth { service, answering: true } => {
            tracing::info!(%service, "the application answers again");
        }
        Event::InstanceStarting { instance, service } => {
            tracing::info!(%service, %instance, "starting an instance");
        }
        Event::InstanceUp { instance, service, peer } => {
            tracing::info!(%service, %peer, %instance, "instance up");
        }
        Event::InstanceCulled { instance, service, reason } => {
            tracing::info!(%service, %instance, "culled: {reason}");
        }
        Event::InstanceGone { instance, service, reason } => {
            tracing::info!(%service, %instance, "instance gone: {reason}");
        }
        Event::DiscoveryFinished { service, took, allocated, found: false } => {
            tracing::info!(%service, allocated, "no instance found or allocated after {took:?}");
        }
        Event::DiscoveryFinished { service, took, allocated, found: true } => {
            tracing::debug!(%service, allocated, "instance chosen after {took:?}");
        }
        // The front end logs each retry with the peer it goes to.
        Event::Retried { service } => tracing::debug!(%service, "retrying"),
        Event::CacheHit { service, instance } => tracing::debug!(%service, peer = %instance, "cache hit"),
        Event::Selected { service, instance, rtt } => {
            tracing::debug!(%service, peer = %instance, ?rtt, "instance selected")
        }
        Event::SeekBetter { service, peer } => {
            tracing::debug!(%service, %peer, "over the soft limit for a while: looking for a better instance")
        }
        Event::Probed { peer, rtt } => tracing::debug!(%peer, ?rtt, "probed"),
    }
}
