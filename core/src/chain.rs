//! The life of one link of an L4 chain, decided by the hop that owns it: the
//! client's proxy owns the link to the first hop, each hop's sidecar the link to the
//! next. The runtime sets the rest of the chain up, probes and moves bytes; this
//! machine decides when to probe, when the next hop has failed, whether the link is
//! repaired or the session reset, and when to give up.
//!
//! - **Set-up**: [`LinkOutput::Setup`] asks the runtime to find or allocate the next
//!   hop and have it set up the rest; a failed attempt is tried again after
//!   [`LinkConfig::retry_delay`], up to [`LinkConfig::setup_attempts`] times, unless
//!   it cannot succeed (a client error such as an unknown service). Then
//!   [`LinkOutput::Failed`] names the hop and the reason.
//! - **Watching**: while up, the next hop is probed every
//!   [`LinkConfig::probe_interval`] with its service's hard RTT limit as timeout. A
//!   probe that fails, answers over the hard limit, or is overdue (the runtime never
//!   answered) is a failure of the hop, as is the stream to it breaking.
//! - **Repair**: a failed hop is evicted ([`LinkOutput::Evict`]) and the rest of the
//!   chain set up again from this hop; the upstream side (the client's socket) is
//!   kept. What the design guarantees for data in flight:
//!   - UDP: the link is always repaired; datagrams in flight through the failed hop
//!     are lost, as on any UDP path.
//!   - TCP: a byte stream must not lose bytes silently. The runtime says whether data
//!     was *in flight* when the hop failed: bytes sent towards the next hop since the
//!     last bytes that came back from it (a request not yet answered). With nothing
//!     in flight the link is repaired and the client's connection goes on (the new
//!     hop's application sees a new connection); with data in flight the upstream
//!     connection is reset ([`LinkOutput::Reset`]), never continued with a gap.
//! - **Teardown**: when the upstream side leaves, [`LinkOutput::Teardown`]; nothing
//!   follows a teardown, a reset or a final failure.

use crate::time::Instant;
use crate::types::PeerId;
use crate::wire::{HopChoice, L4Proto};
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// How often the next hop is probed (the original: every second).
    pub probe_interval: Duration,
    /// Attempts to place the next hop, at set-up and at each repair.
    pub setup_attempts: u32,
    /// Wait between two attempts.
    pub retry_delay: Duration,
    /// Repairs one session may make; past it the session fails (a chain that keeps
    /// failing is not retried forever).
    pub max_repairs: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            probe_interval: Duration::from_secs(1),
            setup_attempts: 3,
            retry_delay: Duration::from_millis(500),
            max_repairs: 16,
        }
    }
}

/// The rest of the chain, set up: the next hop's instance, every hop's choice, and
/// the hard RTT limit of the next hop's service (the probes' timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub peer: PeerId,
    pub hops: Vec<HopChoice>,
    pub hard: Duration,
}

/// Why the rest of the chain could not be set up: which hop (0 = the next one),
/// its service, an HTTP-like status (4xx: asking again cannot help) and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupError {
    pub hop: usize,
    pub service: String,
    pub status: u16,
    pub reason: String,
}

impl SetupError {
    fn retryable(&self) -> bool {
        !(400..500).contains(&self.status)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkInput {
    /// Time passed (a deadline from `poll_timeout`).
    Tick,
    /// The set-up asked for with [`LinkOutput::Setup`] ended.
    SetupDone(Result<Placed, SetupError>),
    /// Probe `id` answered (`rtt`) or failed (`None`). `in_flight`: whether data was
    /// in flight towards the next hop at this moment.
    ProbeDone { id: u64, rtt: Option<Duration>, in_flight: bool },
    /// The stream to the next hop failed.
    Broken { reason: String, in_flight: bool },
    /// The next hop ended its stream before this side ended its own: a server
    /// closing first, or a hop that went away (a killed process's connection ends
    /// the same way). With TCP data in flight the upstream is reset; otherwise the
    /// next hop is probed at once, and the end passed upstream only if it answers.
    DownstreamEnded { in_flight: bool },
    /// The upstream side (the client, or the previous hop) left.
    UpstreamGone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOutput {
    /// Find or allocate the next hop and set the rest of the chain up through it.
    Setup { attempt: u32 },
    /// Measure the RTT to the next hop; answer with [`LinkInput::ProbeDone`].
    Probe { id: u64, peer: PeerId, timeout: Duration },
    /// The next hop failed: drop its stream, and evict it from the peer cache.
    Evict { peer: PeerId, reason: String },
    /// Data may flow over the stream of the last set-up.
    Ready { hops: Vec<HopChoice>, repaired: bool },
    /// The next hop ended its side and still answers: pass the end upstream.
    EndUpstream,
    /// End the session by resetting the upstream side (TCP data was in flight).
    Reset { reason: String },
    /// End the session: the chain cannot be placed (or replaced).
    Failed(SetupError),
    /// End the session: close the stream to the next hop.
    Teardown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// A set-up is running (`repair`: the link was up before).
    Setting { attempt: u32, repair: bool },
    /// Waiting to try the set-up again.
    Waiting { until: Instant, attempt: u32, repair: bool },
    /// Up through `peer`; the next probe is due at `next_probe`, or probe
    /// `in_flight` was sent and is overdue at `overdue`. `ending`: the next hop
    /// ended its side; the probe out confirms it is alive.
    Up { peer: PeerId, hard: Duration, next_probe: Instant, probe: Option<(u64, Instant)>, ending: bool },
    /// Over: nothing more comes out.
    Closed,
}

/// One link of a chain. Drive it like the other machines: `handle_input`, drain
/// `poll_output`, sleep until `poll_timeout`.
#[derive(Clone, Debug)]
pub struct Link {
    config: LinkConfig,
    proto: L4Proto,
    state: State,
    repairs: u32,
    next_probe_id: u64,
    out: VecDeque<LinkOutput>,
}

impl Link {
    /// A link for data of `proto` whose set-up starts now.
    pub fn new(config: LinkConfig, proto: L4Proto) -> Link {
        let mut out = VecDeque::new();
        out.push_back(LinkOutput::Setup { attempt: 1 });
        Link { config, proto, state: State::Setting { attempt: 1, repair: false }, repairs: 0, next_probe_id: 0, out }
    }

    /// Whether the session is over (nothing more will come out).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether data may flow now.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Repairs made so far.
    pub fn repairs(&self) -> u32 {
        self.repairs
    }

    pub fn poll_output(&mut self) -> Option<LinkOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Waiting { until, .. } => Some(*until),
            State::Up { probe: Some((_, overdue)), .. } => Some(*overdue),
            State::Up { next_probe, probe: None, .. } => Some(*next_probe),
            State::Setting { .. } | State::Closed => None,
        }
    }

    pub fn handle_input(&mut self, now: Instant, input: LinkInput) {
        match input {
            LinkInput::Tick => {}
            LinkInput::SetupDone(result) => self.setup_done(now, result),
            LinkInput::ProbeDone { id, rtt, in_flight } => self.probe_done(now, id, rtt, in_flight),
            LinkInput::Broken { reason, in_flight } => {
                if let State::Up { peer, .. } = &self.state {
                    let peer = peer.clone();
                    self.hop_failed(now, peer, format!("its stream broke: {reason}"), in_flight);
                }
            }
            LinkInput::DownstreamEnded { in_flight } => self.downstream_ended(now, in_flight),
            LinkInput::UpstreamGone => {
                if self.state != State::Closed {
                    self.state = State::Closed;
                    self.out.push_back(LinkOutput::Teardown);
                }
            }
        }
        self.on_time(now);
    }

    fn on_time(&mut self, now: Instant) {
        match self.state.clone() {
            State::Waiting { until, attempt, repair } if now >= until => {
                self.state = State::Setting { attempt, repair };
                self.out.push_back(LinkOutput::Setup { attempt });
            }
            State::Up { peer, hard, probe: Some((_, overdue)), .. } if now >= overdue => {
                // The runtime never answered the probe: treat it as lost, and any TCP
                // data as possibly in flight (a reset rather than a silent gap).
                let reason = format!("no probe answer within {hard:?}");
                self.hop_failed(now, peer, reason, true);
            }
            State::Up { peer, hard, next_probe, probe: None, ending } if now >= next_probe => {
                self.send_probe(now, peer, hard, ending)
            }
            _ => {}
        }
    }

    fn send_probe(&mut self, now: Instant, peer: PeerId, hard: Duration, ending: bool) {
        let id = self.next_probe_id;
        self.next_probe_id += 1;
        // The runtime's probe has `hard` as its timeout; the slack only catches a
        // runtime that never answers.
        let overdue = now + hard + hard.max(Duration::from_millis(500));
        self.state = State::Up { peer: peer.clone(), hard, next_probe: now, probe: Some((id, overdue)), ending };
        self.out.push_back(LinkOutput::Probe { id, peer, timeout: hard });
    }

    fn downstream_ended(&mut self, now: Instant, in_flight: bool) {
        let State::Up { peer, hard, ending: false, .. } = &self.state else { return };
        let (peer, hard) = (peer.clone(), *hard);
        if self.proto == L4Proto::Tcp && in_flight {
            self.state = State::Closed;
            let reason = format!("the next hop ({peer}) ended its stream with data in flight");
            self.out.push_back(LinkOutput::Reset { reason });
            return;
        }
        // A probe out now is replaced by this one (its answer is ignored).
        self.send_probe(now, peer, hard, true);
    }

    fn setup_done(&mut self, now: Instant, result: Result<Placed, SetupError>) {
        let State::Setting { attempt, repair } = self.state else { return };
        match result {
            Ok(Placed { peer, hops, hard }) => {
                let next_probe = now + self.config.probe_interval;
                self.state = State::Up { peer, hard, next_probe, probe: None, ending: false };
                self.out.push_back(LinkOutput::Ready { hops, repaired: repair });
            }
            Err(e) if e.retryable() && attempt < self.config.setup_attempts => {
                let until = now + self.config.retry_delay;
                self.state = State::Waiting { until, attempt: attempt + 1, repair };
            }
            Err(e) => {
                self.state = State::Closed;
                self.out.push_back(LinkOutput::Failed(e));
            }
        }
    }

    fn probe_done(&mut self, now: Instant, id: u64, rtt: Option<Duration>, in_flight: bool) {
        let State::Up { peer, hard, probe: Some((expected, _)), ending, .. } = &self.state else { return };
        if id != *expected {
            return;
        }
        let (peer, hard, ending) = (peer.clone(), *hard, *ending);
        match rtt {
            Some(rtt) if rtt <= hard => {
                let next_probe = now + self.config.probe_interval;
                // Probing goes on after the end has been passed upstream.
                self.state = State::Up { peer, hard, next_probe, probe: None, ending: false };
                if ending {
                    self.out.push_back(LinkOutput::EndUpstream);
                }
            }
            Some(rtt) => self.hop_failed(now, peer, format!("RTT {rtt:?} over the hard limit {hard:?}"), in_flight),
            None => self.hop_failed(now, peer, format!("no probe answer within {hard:?}"), in_flight),
        }
    }

    fn hop_failed(&mut self, _now: Instant, peer: PeerId, reason: String, in_flight: bool) {
        self.out.push_back(LinkOutput::Evict { peer: peer.clone(), reason: reason.clone() });
        if self.proto == L4Proto::Tcp && in_flight {
            self.state = State::Closed;
            self.out.push_back(LinkOutput::Reset {
                reason: format!("the next hop ({peer}) failed with data in flight: {reason}"),
            });
            return;
        }
        if self.repairs >= self.config.max_repairs {
            self.state = State::Closed;
            let reason = format!("failed again after {} repairs: {reason}", self.repairs);
            self.out.push_back(LinkOutput::Failed(SetupError { hop: 0, service: String::new(), status: 502, reason }));
            return;
        }
        self.repairs += 1;
        self.state = State::Setting { attempt: 1, repair: true };
        self.out.push_back(LinkOutput::Setup { attempt: 1 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HARD: Duration = Duration::from_millis(300);

    fn t(ms: u64) -> Instant {
        Instant::from_micros(ms * 1000)
    }

    fn placed(peer: &str) -> Placed {
        let hops = vec![HopChoice { service: "s".into(), instance: PeerId(peer.into()) }];
        Placed { peer: PeerId(peer.into()), hops, hard: HARD }
    }

    fn drain(l: &mut Link) -> Vec<LinkOutput> {
        std::iter::from_fn(|| l.poll_output()).collect()
    }

    fn up(proto: L4Proto) -> Link {
        let mut l = Link::new(LinkConfig::default(), proto);
        assert_eq!(drain(&mut l), vec![LinkOutput::Setup { attempt: 1 }]);
        l.handle_input(t(0), LinkInput::SetupDone(Ok(placed("a"))));
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Ready { repaired: false, .. }]));
        l
    }

    /// The probe the link sends at its next deadline.
    fn next_probe(l: &mut Link) -> (Instant, u64, Duration) {
        let at = l.poll_timeout().unwrap();
        l.handle_input(at, LinkInput::Tick);
        match drain(l)[..] {
            [LinkOutput::Probe { id, timeout, .. }] => (at, id, timeout),
            ref other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn probes_every_interval_with_the_hard_limit_as_timeout() {
        let mut l = up(L4Proto::Udp);
        let (at, id, timeout) = next_probe(&mut l);
        assert_eq!((at, timeout), (t(1000), HARD));
        l.handle_input(
            at + Duration::from_millis(5),
            LinkInput::ProbeDone { id, rtt: Some(Duration::from_millis(5)), in_flight: false },
        );
        assert!(drain(&mut l).is_empty());
        let (at2, id2, _) = next_probe(&mut l);
        assert_eq!(at2, t(2005));
        assert_ne!(id, id2);
    }

    #[test]
    fn a_failed_hop_is_evicted_and_replaced_and_the_upstream_kept() {
        let mut l = up(L4Proto::Udp);
        let (at, id, _) = next_probe(&mut l);
        l.handle_input(at + HARD, LinkInput::ProbeDone { id, rtt: None, in_flight: true });
        let out = drain(&mut l);
        assert!(
            matches!(&out[..], [LinkOutput::Evict { peer, .. }, LinkOutput::Setup { attempt: 1 }] if peer.0 == "a"),
            "{out:?}"
        );
        l.handle_input(at + HARD * 2, LinkInput::SetupDone(Ok(placed("b"))));
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Ready { repaired: true, .. }]));
        assert_eq!(l.repairs(), 1);
        assert!(l.is_up());
    }

    #[test]
    fn a_probe_over_the_hard_limit_is_a_failure() {
        let mut l = up(L4Proto::Tcp);
        let (at, id, _) = next_probe(&mut l);
        l.handle_input(at, LinkInput::ProbeDone { id, rtt: Some(HARD + Duration::from_millis(1)), in_flight: false });
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Evict { .. }, LinkOutput::Setup { .. }]));
    }

    #[test]
    fn tcp_with_data_in_flight_is_reset_not_repaired() {
        let mut l = up(L4Proto::Tcp);
        l.handle_input(t(10), LinkInput::Broken { reason: "reset".into(), in_flight: true });
        let out = drain(&mut l);
        assert!(matches!(&out[..], [LinkOutput::Evict { .. }, LinkOutput::Reset { .. }]), "{out:?}");
        assert!(l.is_closed());
        // Quiet TCP is repaired.
        let mut l = up(L4Proto::Tcp);
        l.handle_input(t(10), LinkInput::Broken { reason: "reset".into(), in_flight: false });
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Evict { .. }, LinkOutput::Setup { .. }]));
    }

    #[test]
    fn a_downstream_end_is_confirmed_by_a_probe_before_it_is_passed_on() {
        // Quiet: probed at once; an answer passes the end upstream.
        let mut l = up(L4Proto::Tcp);
        l.handle_input(t(10), LinkInput::DownstreamEnded { in_flight: false });
        let id = match drain(&mut l)[..] {
            [LinkOutput::Probe { id, .. }] => id,
            ref other => panic!("{other:?}"),
        };
        l.handle_input(t(11), LinkInput::ProbeDone { id, rtt: Some(Duration::from_millis(1)), in_flight: false });
        assert_eq!(drain(&mut l), vec![LinkOutput::EndUpstream]);
        // No answer: the hop went away; replaced.
        let mut l = up(L4Proto::Udp);
        l.handle_input(t(10), LinkInput::DownstreamEnded { in_flight: true });
        let id = match drain(&mut l)[..] {
            [LinkOutput::Probe { id, .. }] => id,
            ref other => panic!("{other:?}"),
        };
        l.handle_input(t(400), LinkInput::ProbeDone { id, rtt: None, in_flight: true });
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Evict { .. }, LinkOutput::Setup { .. }]));
        // TCP with data in flight: reset, whatever the next hop says.
        let mut l = up(L4Proto::Tcp);
        l.handle_input(t(10), LinkInput::DownstreamEnded { in_flight: true });
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Reset { .. }]));
    }

    #[test]
    fn an_unanswered_probe_is_a_failure_when_overdue() {
        let mut l = up(L4Proto::Udp);
        let (_, _, _) = next_probe(&mut l);
        let overdue = l.poll_timeout().unwrap();
        l.handle_input(overdue, LinkInput::Tick);
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Evict { .. }, LinkOutput::Setup { .. }]));
    }

    #[test]
    fn set_up_failures_are_retried_then_name_the_hop() {
        let mut l = Link::new(LinkConfig::default(), L4Proto::Udp);
        drain(&mut l);
        let err = SetupError { hop: 1, service: "s2".into(), status: 502, reason: "unreachable".into() };
        for attempt in 2..=3 {
            l.handle_input(t(0), LinkInput::SetupDone(Err(err.clone())));
            assert!(drain(&mut l).is_empty());
            let at = l.poll_timeout().unwrap();
            l.handle_input(at, LinkInput::Tick);
            assert_eq!(drain(&mut l), vec![LinkOutput::Setup { attempt }]);
        }
        l.handle_input(t(2000), LinkInput::SetupDone(Err(err.clone())));
        assert_eq!(drain(&mut l), vec![LinkOutput::Failed(err)]);
        assert!(l.is_closed());
        // An unknown service is not asked about again.
        let mut l = Link::new(LinkConfig::default(), L4Proto::Udp);
        drain(&mut l);
        let unknown = SetupError { hop: 2, service: "nope".into(), status: 404, reason: "unknown service".into() };
        l.handle_input(t(0), LinkInput::SetupDone(Err(unknown.clone())));
        assert_eq!(drain(&mut l), vec![LinkOutput::Failed(unknown)]);
    }

    #[test]
    fn repairs_are_bounded() {
        let config = LinkConfig { max_repairs: 2, ..LinkConfig::default() };
        let mut l = Link::new(config, L4Proto::Udp);
        drain(&mut l);
        l.handle_input(t(0), LinkInput::SetupDone(Ok(placed("a"))));
        drain(&mut l);
        for i in 0..2 {
            l.handle_input(t(i), LinkInput::Broken { reason: "x".into(), in_flight: false });
            drain(&mut l);
            l.handle_input(t(i), LinkInput::SetupDone(Ok(placed("b"))));
            drain(&mut l);
        }
        l.handle_input(t(9), LinkInput::Broken { reason: "x".into(), in_flight: false });
        assert!(matches!(drain(&mut l)[..], [LinkOutput::Evict { .. }, LinkOutput::Failed(_)]));
        assert!(l.is_closed());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Tick(u64),
        SetupOk,
        SetupErr(u16),
        Probe(Option<u64>, bool),
        StaleProbe,
        Broken(bool),
        Ended(bool),
        Gone,
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..3000).prop_map(Step::Tick),
            Just(Step::SetupOk),
            prop_oneof![Just(404u16), Just(502u16), Just(503u16)].prop_map(Step::SetupErr),
            (proptest::option::of(0u64..600), any::<bool>()).prop_map(|(r, f)| Step::Probe(r, f)),
            Just(Step::StaleProbe),
            any::<bool>().prop_map(Step::Broken),
            any::<bool>().prop_map(Step::Ended),
            Just(Step::Gone),
        ]
    }

    proptest! {
        /// Whatever happens: at most one set-up runs at a time and only when asked
        /// for; probes go out only while up, one at a time; a TCP reset only ever
        /// follows data in flight; nothing comes out after the session ended; and
        /// the link is never stuck (it is closed, setting up, or has a deadline).
        #[test]
        fn the_link_keeps_its_invariants(steps in proptest::collection::vec(arb_step(), 1..60), tcp in any::<bool>()) {
            let proto = if tcp { L4Proto::Tcp } else { L4Proto::Udp };
            let mut l = Link::new(LinkConfig::default(), proto);
            let mut now = t(0);
            let mut setting = false;
            let mut probe: Option<u64> = None;
            let mut closed = false;
            for step in steps {
                // Whether this step may report data in flight (an overdue probe, found
                // on a tick, counts as in flight).
                let mut in_flight_now = false;
                let step_was = Some(step.clone());
                match step {
                    Step::Tick(ms) => {
                        now += Duration::from_millis(ms);
                        in_flight_now = true;
                        l.handle_input(now, LinkInput::Tick)
                    }
                    Step::SetupOk if setting => {
                        setting = false;
                        l.handle_input(now, LinkInput::SetupDone(Ok(placed("p"))))
                    }
                    Step::SetupErr(status) if setting => {
                        setting = false;
                        let e = SetupError { hop: 0, service: "s".into(), status, reason: "r".into() };
                        l.handle_input(now, LinkInput::SetupDone(Err(e)))
                    }
                    Step::Probe(rtt, in_flight) => {
                        if let Some(id) = probe.take() {
                            in_flight_now = in_flight;
                            let rtt = rtt.map(Duration::from_millis);
                            l.handle_input(now, LinkInput::ProbeDone { id, rtt, in_flight })
                        }
                    }
                    Step::StaleProbe => {
                        l.handle_input(now, LinkInput::ProbeDone { id: u64::MAX, rtt: None, in_flight: true })
                    }
                    Step::Broken(in_flight) => {
                        in_flight_now = in_flight;
                        l.handle_input(now, LinkInput::Broken { reason: "b".into(), in_flight })
                    }
                    Step::Ended(in_flight) => {
                        in_flight_now = in_flight;
                        l.handle_input(now, LinkInput::DownstreamEnded { in_flight })
                    }
                    Step::Gone => l.handle_input(now, LinkInput::UpstreamGone),
                    _ => {}
                }
                while let Some(o) = l.poll_output() {
                    prop_assert!(!closed, "{o:?} after the session ended");
                    match o {
                        LinkOutput::Setup { .. } => {
                            prop_assert!(!setting, "two set-ups at once");
                            setting = true;
                            probe = None
                        }
                        LinkOutput::Probe { id, timeout, .. } => {
                            // A downstream end replaces the probe out by a new one.
                            prop_assert!(
                                (probe.is_none() || matches!(step_was, Some(Step::Ended(_)))) && !setting,
                                "a probe while another runs or while setting up"
                            );
                            prop_assert_eq!(timeout, HARD);
                            probe = Some(id);
                        }
                        LinkOutput::Reset { .. } => {
                            prop_assert!(tcp && in_flight_now, "a reset without TCP data in flight");
                            closed = true;
                        }
                        LinkOutput::Evict { .. } => probe = None,
                        LinkOutput::Failed(_) | LinkOutput::Teardown => closed = true,
                        LinkOutput::Ready { .. } | LinkOutput::EndUpstream => {}
                    }
                }
                prop_assert_eq!(l.is_closed(), closed);
                prop_assert!(closed || setting || l.poll_timeout().is_some(), "stuck: {:?}", l.state);
            }
        }
    }
}
