//! Every message nodes exchange, and the one framing they all use.
//!
//! A frame is `[u32 big-endian length][u8 version][postcard payload]`, where the length
//! counts the version byte and the payload. Frames larger than [`MAX_FRAME`] are
//! refused on both sides. Decoding untrusted bytes returns an error, never panics.
//! HTTP itself is not in here: tunnelled requests travel as HTTP over a long-lived
//! stream that starts with a [`TunnelHello`] / [`TunnelAck`] exchange.

use crate::types::{PeerAddr, ServiceInfo};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the wire format; a frame carrying another is rejected.
pub const WIRE_VERSION: u8 = 1;
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
    RegistryList,
    RegistryPut {
        info: ServiceInfo,
    },
    RegistryDelete {
        name: String,
    },
    /// Allocator → instance sidecar: how long since you last served a request?
    IdleQuery,
    /// An RTT probe, for transports without one of their own.
    Ping {
        nonce: u64,
    },
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
    /// `RegistryGet`: the entry, or `None` when no such service is registered.
    Service {
        info: Option<ServiceInfo>,
    },
    Services {
        infos: Vec<ServiceInfo>,
    },
    /// `RegistryPut` / `RegistryDelete` done.
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

/// The instance proxy's answer to a [`TunnelHello`]; HTTP follows only after `Ok`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelAck {
    Ok,
    Rejected { reason: String },
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
