//! Every message nodes exchange, and the one framing they all use.
//!
//! A frame is `[u32 big-endian length][u8 version][postcard payload]`, where the length
//! counts the version byte and the payload. Frames larger than [`MAX_FRAME`] are
//! refused on both sides. Decoding untrusted bytes returns an error, never panics.
//! HTTP itself is not in here: tunnelled requests travel as HTTP over a long-lived
//! stream that starts with a [`TunnelHello`] / [`TunnelAck`] exchange.

use crate::trust::{Credentials, SignedEntry};
use crate::types::PeerAddr;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the wire format; a frame carrying another is rejected.
pub const WIRE_VERSION: u8 = 2;
/// Largest frame accepted or produced (length prefix excluded).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Ask an allocator to start an instance of the named service. The allocator
    /// looks the name up in the registry itself; a peer never says what to run.
    Allocate {
        service: String,
    },
    RegistryGet {
        name: String,
    },
    /// One page of entries in name order, starting after `after`.
    RegistryList {
        after: Option<String>,
    },
    /// Store an operator-signed entry; one with `info: None` removes the service.
    RegistryPut {
        entry: Box<SignedEntry>,
    },
    /// Allocator → its instance's sidecar, at start and every cull round: here are
    /// your renewed credentials (if any); how long since you last served a request?
    IdleQuery {
        credentials: Option<Box<Credentials>>,
    },
    /// An RTT probe, for transports without one of their own.
    Ping {
        nonce: u64,
    },
    /// How loaded are you? (asked by placement policies that weigh load; appended
    /// last so that every earlier message keeps its encoding).
    Load,
    /// Where do you take tunnels on connections of their own (the data plane)?
    /// Answered by transports that have one; the core answers that it has none.
    TunnelEndpoint,
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A new (or just-started) instance, dialable directly.
    Allocated {
        instance: PeerAddr,
    },
    /// The allocator will not or cannot start one (unknown service, no capacity, failed start).
    Refused {
        reason: String,
    },
    /// `RegistryGet`: the signed entry (a removal is a signed entry without info),
    /// or `None` when the registry holds nothing under that name.
    Entry {
        entry: Option<Box<SignedEntry>>,
    },
    /// `RegistryList`: a page of entries; `next` is where the next page starts.
    Entries {
        entries: Vec<SignedEntry>,
        next: Option<String>,
    },
    /// `RegistryPut` done.
    Done,
    /// `IdleQuery`: whole seconds since the last served request.
    Idle {
        seconds: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The peer could not handle the request (wrong role, invalid input).
    Error {
        reason: String,
    },
    /// `Load`: an allocator's instances and capacity, or an instance's requests.
    Load {
        load: crate::placement::Load,
    },
    /// `TunnelEndpoint`: the data plane's TCP port on the address this peer is
    /// reached at, or `None` when tunnels only run on the swarm.
    TunnelEndpoint {
        port: Option<u16>,
    },
}

/// Envelope for transports without their own request/response correlation
/// (the simulation's plain TCP streams).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    Request { id: u64, from: String, body: Request },
    Response { id: u64, body: Response },
}

/// First frame on a tunnel stream: which service the client wants served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelHello {
    pub service: String,
}

/// The instance proxy's answer to a [`TunnelHello`]; HTTP follows only after `Ok`,
/// and only once the client has verified the credentials it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelAck {
    Ok { credentials: Option<Credentials> },
    Rejected { reason: String },
}

/// Largest UDP datagram an L4 tunnel carries: the largest payload of an IPv4 UDP
/// datagram (65535 − 8 bytes UDP header − 20 bytes IP header), as the original.
pub const MAX_DATAGRAM: usize = 65_507;
/// Size of a datagram's length prefix on an L4 stream.
pub const DATAGRAM_PREFIX: usize = 2;
/// Most services one L4 chain may name (the client's hop included).
pub const MAX_CHAIN_HOPS: usize = 16;

/// The transport protocol an L4 hop speaks with its application (and the client
/// with the first hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum L4Proto {
    Tcp,
    Udp,
}

impl L4Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

/// One service of an L4 chain and the protocol its instance is reached with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct L4Hop {
    pub proto: L4Proto,
    pub service: String,
}

/// First frame on an L4 tunnel stream (after the tunnel's hello, ack and trust
/// check, and the stream's switch from HTTP): this hop speaks `proto` with its
/// application, and `rest` are the hops after it, which it sets up itself before it
/// answers with [`L4Ready`]. Then the stream carries raw bytes (`proto` TCP) or
/// datagrams, each behind a [`DATAGRAM_PREFIX`]-byte length (`proto` UDP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Open {
    pub proto: L4Proto,
    pub rest: Vec<L4Hop>,
}

/// Which instance one hop of a chain chose for its service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopChoice {
    pub service: String,
    pub instance: crate::types::PeerId,
}

/// The answer to an [`L4Open`], once the whole rest of the chain is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum L4Ready {
    /// Data may flow. `hops`: what this hop and each after it chose, in chain order.
    Ok { hops: Vec<HopChoice> },
    /// The chain could not be set up: hop `hop` (counted from the answering hop,
    /// 0) for `service` could not be placed, for `reason`; `status` as HTTP would
    /// put it (404 for an unknown service, 502 for an unreachable one, …).
    Failed { hop: u32, service: String, status: u16, reason: String },
}

/// The length prefix of a datagram of `len` bytes on an L4 stream.
pub fn datagram_prefix(len: usize) -> Result<[u8; DATAGRAM_PREFIX], WireError> {
    match u16::try_from(len) {
        Ok(l) if len <= MAX_DATAGRAM => Ok(l.to_be_bytes()),
        _ => Err(WireError::DatagramTooLarge { len }),
    }
}

/// The length a datagram prefix announces; over [`MAX_DATAGRAM`] is an error.
pub fn datagram_len(prefix: [u8; DATAGRAM_PREFIX]) -> Result<usize, WireError> {
    let len = u16::from_be_bytes(prefix) as usize;
    if len > MAX_DATAGRAM {
        return Err(WireError::DatagramTooLarge { len });
    }
    Ok(len)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The length prefix announces more than [`MAX_FRAME`].
    FrameTooLarge { len: usize },
    /// A frame of length zero (not even a version byte).
    EmptyFrame,
    /// The frame's version is not [`WIRE_VERSION`].
    UnsupportedVersion(u8),
    /// The payload does not decode as the expected message.
    Malformed(String),
    /// A message that encodes to more than [`MAX_FRAME`].
    MessageTooLarge { len: usize },
    /// A datagram over [`MAX_DATAGRAM`] bytes.
    DatagramTooLarge { len: usize },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::FrameTooLarge { len } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {MAX_FRAME}")
            }
            WireError::EmptyFrame => write!(f, "empty frame"),
            WireError::UnsupportedVersion(v) => {
                write!(f, "unsupported wire version {v} (expected {WIRE_VERSION})")
            }
            WireError::Malformed(e) => write!(f, "malformed message: {e}"),
            WireError::MessageTooLarge { len } => {
                write!(f, "message of {len} bytes exceeds the maximum frame of {MAX_FRAME}")
            }
            WireError::DatagramTooLarge { len } => {
                write!(f, "datagram of {len} bytes exceeds the maximum of {MAX_DATAGRAM}")
            }
        }
    }
}

impl std::error::Error for WireError {}

/// Encode `msg` as one complete frame, length prefix included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut frame = vec![0u8; LEN_PREFIX];
    frame.push(WIRE_VERSION);
    let mut frame = postcard::to_extend(msg, frame).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = frame.len() - LEN_PREFIX;
    if len > MAX_FRAME {
        return Err(WireError::MessageTooLarge { len });
    }
    frame[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Read a frame's length prefix; the body that follows has this many bytes.
/// Rejects lengths over [`MAX_FRAME`] before anything is buffered.
pub fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    match len {
        0 => Err(WireError::EmptyFrame),
        l if l > MAX_FRAME => Err(WireError::FrameTooLarge { len: l }),
        l => Ok(l),
    }
}

/// Decode a frame body (the bytes after the length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (&version, payload) = body.split_first().ok_or(WireError::EmptyFrame)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::FrameTooLarge { len: body.len() });
    }
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decode the first frame in `buf`: `Ok(None)` when more bytes are needed, else the
/// message and how many bytes it took.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, WireError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else { return Ok(None) };
    let len = frame_len(prefix.try_into().expect("slice of LEN_PREFIX bytes"))?;
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else { return Ok(None) };
    Ok(Some((decode_body(body)?, LEN_PREFIX + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::{PerfLimits, Requirements};
    use crate::trust::{Grant, Issuer, SecretKey};
    use crate::types::{ContentHash, PeerId, RunSpec, ServiceInfo};
    use proptest::prelude::*;
    use std::fmt::Debug;
    use std::time::Duration;

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![".{0,24}", "[a-z0-9/._-]{0,16}"]
    }

    fn arb_limits() -> impl Strategy<Value = PerfLimits> {
        proptest::option::of((any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)))
            .prop_map(|rtt| PerfLimits { rtt })
    }

    fn arb_info() -> impl Strategy<Value = ServiceInfo> {
        let run = prop_oneof![
            (
                arb_string(),
                proptest::collection::vec(arb_string(), 0..4),
                proptest::collection::vec((arb_string(), arb_string()), 0..2)
            )
                .prop_map(|(program, args, env)| RunSpec::Exec { program, args, env }),
            arb_string().prop_map(|image| RunSpec::Image { image }),
        ];
        (arb_string(), arb_string(), run, arb_limits(), arb_limits(), any::<u32>(), any::<u32>(), any::<bool>())
            .prop_map(|(name, hash, run, soft, hard, cpu_millis, memory_mb, stateful)| ServiceInfo {
                name,
                hash: ContentHash(hash),
                run,
                requirements: Requirements { soft, hard },
                cpu_millis,
                memory_mb,
                stateful,
                client_mode: false,
            })
    }

    fn arb_entry() -> impl Strategy<Value = SignedEntry> {
        (arb_string(), any::<u64>(), proptest::option::of(arb_info()), any::<u8>()).prop_map(
            |(name, version, info, k)| SignedEntry::sign(name, version, info, &SecretKey::from_bytes([k; 32])),
        )
    }

    fn arb_credentials() -> impl Strategy<Value = Credentials> {
        (arb_string(), arb_string(), any::<u64>(), any::<bool>()).prop_map(|(instance, hash, not_after, granted)| {
            let key = SecretKey::from_bytes([7; 32]);
            let issuer = match granted {
                true => {
                    let grant = Grant::sign(PeerId("a".into()), key.public(), &SecretKey::from_bytes([1; 32]));
                    Issuer::allocator(key, grant).unwrap()
                }
                false => Issuer::operator(key),
            };
            issuer.issue(PeerId(instance), ContentHash(hash), not_after)
        })
    }

    fn arb_peer_addr() -> impl Strategy<Value = PeerAddr> {
        (arb_string(), proptest::collection::vec(arb_string(), 0..4))
            .prop_map(|(peer, addrs)| PeerAddr { peer: PeerId(peer), addrs })
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            arb_string().prop_map(|service| Request::Allocate { service }),
            arb_string().prop_map(|name| Request::RegistryGet { name }),
            proptest::option::of(arb_string()).prop_map(|after| Request::RegistryList { after }),
            arb_entry().prop_map(|entry| Request::RegistryPut { entry: Box::new(entry) }),
            proptest::option::of(arb_credentials().prop_map(Box::new))
                .prop_map(|credentials| Request::IdleQuery { credentials }),
            any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
            Just(Request::Load),
            Just(Request::TunnelEndpoint),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            arb_peer_addr().prop_map(|instance| Response::Allocated { instance }),
            arb_string().prop_map(|reason| Response::Refused { reason }),
            proptest::option::of(arb_entry().prop_map(Box::new)).prop_map(|entry| Response::Entry { entry }),
            (proptest::collection::vec(arb_entry(), 0..4), proptest::option::of(arb_string()))
                .prop_map(|(entries, next)| Response::Entries { entries, next }),
            Just(Response::Done),
            any::<u64>().prop_map(|seconds| Response::Idle { seconds }),
            any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(running, capacity, recent)| Response::Load {
                load: crate::placement::Load { running, capacity, recent }
            }),
            proptest::option::of(any::<u16>()).prop_map(|port| Response::TunnelEndpoint { port }),
            arb_string().prop_map(|reason| Response::Error { reason }),
        ]
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        prop_oneof![
            (any::<u64>(), arb_string(), arb_request()).prop_map(|(id, from, body)| Envelope::Request {
                id,
                from,
                body
            }),
            (any::<u64>(), arb_response()).prop_map(|(id, body)| Envelope::Response { id, body }),
        ]
    }

    fn arb_hello() -> impl Strategy<Value = TunnelHello> {
        arb_string().prop_map(|service| TunnelHello { service })
    }

    fn arb_ack() -> impl Strategy<Value = TunnelAck> {
        prop_oneof![
            proptest::option::of(arb_credentials()).prop_map(|credentials| TunnelAck::Ok { credentials }),
            arb_string().prop_map(|reason| TunnelAck::Rejected { reason }),
        ]
    }

    fn arb_hop() -> impl Strategy<Value = L4Hop> {
        (any::<bool>(), arb_string())
            .prop_map(|(udp, service)| L4Hop { proto: if udp { L4Proto::Udp } else { L4Proto::Tcp }, service })
    }

    fn arb_l4_open() -> impl Strategy<Value = L4Open> {
        (arb_hop(), proptest::collection::vec(arb_hop(), 0..MAX_CHAIN_HOPS))
            .prop_map(|(first, rest)| L4Open { proto: first.proto, rest })
    }

    fn arb_l4_ready() -> impl Strategy<Value = L4Ready> {
        prop_oneof![
            proptest::collection::vec(
                (arb_string(), arb_string()).prop_map(|(service, p)| HopChoice { service, instance: PeerId(p) }),
                0..4
            )
            .prop_map(|hops| L4Ready::Ok { hops }),
            (any::<u32>(), arb_string(), any::<u16>(), arb_string())
                .prop_map(|(hop, service, status, reason)| L4Ready::Failed { hop, service, status, reason }),
        ]
    }

    /// encode → decode is the identity, consumes exactly the frame (also when more
    /// bytes follow it), and every strict prefix of the frame asks for more bytes.
    fn check_roundtrip<T: Serialize + DeserializeOwned + Clone + PartialEq + Debug>(
        msg: &T,
        tail: &[u8],
    ) -> Result<(), TestCaseError> {
        let frame = encode(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(frame_len(frame[..LEN_PREFIX].try_into().unwrap()), Ok(frame.len() - LEN_PREFIX));
        prop_assert_eq!(frame[LEN_PREFIX], WIRE_VERSION);
        prop_assert_eq!(decode::<T>(&frame), Ok(Some((msg.clone(), frame.len()))));
        prop_assert_eq!(decode_body::<T>(&frame[LEN_PREFIX..]), Ok(msg.clone()));
        let mut followed = frame.clone();
        followed.extend_from_slice(tail);
        prop_assert_eq!(decode::<T>(&followed), Ok(Some((msg.clone(), frame.len()))));
        for cut in 0..frame.len() {
            prop_assert_eq!(decode::<T>(&frame[..cut]), Ok(None), "prefix of {} bytes", cut);
        }
        Ok(())
    }

    /// Decoding `bytes` as any message type returns, never panics, and a returned
    /// frame never claims more bytes than there are.
    fn decode_all_kinds(bytes: &[u8]) {
        fn one<T: DeserializeOwned>(bytes: &[u8]) {
            if let Ok(Some((_, used))) = decode::<T>(bytes) {
                assert!(used <= bytes.len() && used > LEN_PREFIX);
            }
            let _ = decode_body::<T>(bytes);
        }
        one::<Request>(bytes);
        one::<Response>(bytes);
        one::<Envelope>(bytes);
        one::<TunnelHello>(bytes);
        one::<TunnelAck>(bytes);
        one::<L4Open>(bytes);
        one::<L4Ready>(bytes);
    }

    /// A frame around `body` (version byte included in `body`).
    fn frame_of(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    proptest! {
        #[test]
        fn request_roundtrips(msg in arb_request(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn response_roundtrips(msg in arb_response(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn envelope_roundtrips(msg in arb_envelope(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn tunnel_hello_roundtrips(msg in arb_hello(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn tunnel_ack_roundtrips(msg in arb_ack(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn l4_open_roundtrips(msg in arb_l4_open(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        #[test]
        fn l4_ready_roundtrips(msg in arb_l4_ready(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            check_roundtrip(&msg, &tail)?;
        }

        /// Every datagram length up to the maximum has a prefix that reads back as
        /// itself; every longer one is refused on both sides.
        #[test]
        fn datagram_prefixes_roundtrip_within_the_maximum(len in 0usize..=u16::MAX as usize + 10) {
            match datagram_prefix(len) {
                Ok(prefix) => {
                    prop_assert!(len <= MAX_DATAGRAM);
                    prop_assert_eq!(datagram_len(prefix), Ok(len));
                }
                Err(e) => {
                    prop_assert!(len > MAX_DATAGRAM);
                    prop_assert_eq!(e, WireError::DatagramTooLarge { len });
                }
            }
            if let Ok(l) = u16::try_from(len) {
                prop_assert_eq!(datagram_len(l.to_be_bytes()).is_ok(), len <= MAX_DATAGRAM);
            }
        }

        #[test]
        fn frames_in_a_stream_decode_one_after_another(msgs in proptest::collection::vec(arb_envelope(), 0..6)) {
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend(encode(m).unwrap());
            }
            let mut at = 0;
            let mut got = Vec::new();
            while let Some((m, used)) = decode::<Envelope>(&stream[at..]).unwrap() {
                got.push(m);
                at += used;
            }
            prop_assert_eq!(at, stream.len());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            decode_all_kinds(&bytes);
        }

        /// Arbitrary payloads in a well-formed frame of the right version, so the
        /// bytes reach the message decoder rather than failing at the framing.
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut body = vec![WIRE_VERSION];
            body.extend_from_slice(&payload);
            decode_all_kinds(&frame_of(&body));
        }

        /// Valid frames with a few bytes flipped: close to real messages, deep into the decoder.
        #[test]
        fn mutated_frames_never_panic(
            msg in arb_envelope(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut frame = encode(&msg).unwrap();
            for (i, b) in flips {
                let i = LEN_PREFIX + 1 + i.index(frame.len() - LEN_PREFIX - 1);
                if let Some(byte) = frame.get_mut(i) {
                    *byte = b;
                }
            }
            decode_all_kinds(&frame);
        }

        #[test]
        fn oversized_length_prefix_is_refused_before_buffering(len in (MAX_FRAME as u32 + 1)..=u32::MAX) {
            let prefix = len.to_be_bytes();
            prop_assert_eq!(frame_len(prefix), Err(WireError::FrameTooLarge { len: len as usize }));
            // Only the prefix is there: the error comes without waiting for the body.
            prop_assert_eq!(decode::<Request>(&prefix), Err(WireError::FrameTooLarge { len: len as usize }));
        }

        #[test]
        fn wrong_version_is_refused(msg in arb_request(), version in any::<u8>()) {
            prop_assume!(version != WIRE_VERSION);
            let mut frame = encode(&msg).unwrap();
            frame[LEN_PREFIX] = version;
            prop_assert_eq!(decode::<Request>(&frame), Err(WireError::UnsupportedVersion(version)));
        }

        #[test]
        fn trailing_bytes_inside_a_frame_are_malformed(
            msg in arb_response(),
            extra in proptest::collection::vec(any::<u8>(), 1..16),
        ) {
            let frame = encode(&msg).unwrap();
            let mut body = frame[LEN_PREFIX..].to_vec();
            body.extend_from_slice(&extra);
            prop_assert!(matches!(decode::<Response>(&frame_of(&body)), Err(WireError::Malformed(_))));
            prop_assert!(matches!(decode_body::<Response>(&body), Err(WireError::Malformed(_))));
        }
    }

    #[test]
    fn empty_frame_is_an_error() {
        assert_eq!(decode::<Request>(&[0, 0, 0, 0]), Err(WireError::EmptyFrame));
        assert_eq!(decode_body::<Request>(&[]), Err(WireError::EmptyFrame));
    }

    #[test]
    fn a_frame_of_exactly_max_frame_is_accepted() {
        // Body = version (1) + varint length (3 bytes for ~1 MiB) + the string.
        let msg = TunnelHello { service: "x".repeat(MAX_FRAME - 4) };
        let frame = encode(&msg).expect("fits exactly");
        assert_eq!(frame.len(), LEN_PREFIX + MAX_FRAME);
        assert_eq!(decode::<TunnelHello>(&frame), Ok(Some((msg, frame.len()))));
    }

    #[test]
    fn a_message_over_max_frame_is_refused_when_encoding() {
        let msg = TunnelHello { service: "x".repeat(MAX_FRAME - 3) };
        assert_eq!(encode(&msg), Err(WireError::MessageTooLarge { len: MAX_FRAME + 1 }));
        let big = Response::Refused { reason: "y".repeat(2 * MAX_FRAME) };
        assert!(matches!(encode(&big), Err(WireError::MessageTooLarge { .. })));
    }

    #[test]
    fn an_oversized_body_given_directly_is_refused() {
        let mut body = vec![WIRE_VERSION];
        body.resize(MAX_FRAME + 1, 0);
        assert_eq!(decode_body::<Request>(&body), Err(WireError::FrameTooLarge { len: MAX_FRAME + 1 }));
    }

    #[test]
    fn a_bad_duration_is_malformed_not_a_panic() {
        // A RegistryPut of a ServiceInfo whose soft RTT has u64::MAX seconds and
        // 2e9 nanoseconds: normalising it would overflow.
        let info = ServiceInfo {
            name: "a".into(),
            hash: ContentHash("h".into()),
            run: RunSpec::Image { image: "i".into() },
            requirements: Requirements {
                soft: PerfLimits::rtt(Duration::from_secs(u64::MAX)),
                hard: PerfLimits::default(),
            },
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        };
        let entry = SignedEntry::sign("a".into(), 1, Some(info), &SecretKey::from_bytes([1; 32]));
        let good = encode(&Request::RegistryPut { entry: Box::new(entry) }).unwrap();
        // Re-encode the nanos field (a varint 0, just after the secs varint).
        let secs = postcard::to_allocvec(&u64::MAX).unwrap();
        let at = good.windows(secs.len() + 1).position(|w| w[..secs.len()] == secs[..] && w[secs.len()] == 0).unwrap();
        let with_nanos = |nanos: u32| {
            let mut body = good[LEN_PREFIX..at].to_vec();
            body.extend_from_slice(&secs);
            body.extend(postcard::to_allocvec(&nanos).unwrap());
            body.extend_from_slice(&good[at + secs.len() + 1..]);
            frame_of(&body)
        };
        // The surgery itself is sound: the largest valid nanos decode.
        assert!(matches!(decode::<Request>(&with_nanos(999_999_999)), Ok(Some(_))));
        let body = &with_nanos(2_000_000_000)[LEN_PREFIX..];
        assert!(matches!(decode_body::<Request>(body), Err(WireError::Malformed(_))));
    }
}
