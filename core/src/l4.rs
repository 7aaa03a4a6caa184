//! L4 mappings and service chains: what a client asks for, as a path.
//!
//! `GET /tcp/<service>` or `GET /udp/<service>` on a proxy's HTTP port maps a local
//! port to an instance of `<service>`; a longer path names a chain of services, each
//! reached with the protocol named last before it: `/tcp/s1/s2/udp/s3` is s1 and s2
//! over TCP, then s3 over UDP. The client's own socket speaks the first protocol.

use crate::wire::{L4Hop, L4Proto, MAX_CHAIN_HOPS};
use std::fmt;

/// Longest service name a chain may carry (as a registry name).
pub const MAX_SERVICE_NAME: usize = 128;

/// A chain of one or more services, each with the protocol it is reached by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chain {
    hops: Vec<L4Hop>,
}

/// Why a chain path was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The path does not start with `/tcp/` or `/udp/`.
    NoProtocol,
    /// A protocol segment is not followed by a service.
    NoService { after: L4Proto },
    /// An empty segment (`//`) at this position (0-based, after the leading `/`).
    EmptySegment { at: usize },
    /// A service name over [`MAX_SERVICE_NAME`] bytes.
    NameTooLong { service_at: usize },
    /// More than [`MAX_CHAIN_HOPS`] services.
    TooManyHops { hops: usize },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::NoProtocol => write!(f, "an L4 path starts with /tcp/ or /udp/, e.g. /tcp/my-service"),
            ChainError::NoService { after } => write!(f, "/{} must be followed by a service name", after.as_str()),
            ChainError::EmptySegment { at } => write!(f, "empty path segment at position {at}"),
            ChainError::NameTooLong { service_at } => {
                write!(f, "service name at hop {service_at} is longer than {MAX_SERVICE_NAME} bytes")
            }
            ChainError::TooManyHops { hops } => write!(f, "a chain of {hops} services: at most {MAX_CHAIN_HOPS}"),
        }
    }
}

impl std::error::Error for ChainError {}

fn proto_of(segment: &str) -> Option<L4Proto> {
    match segment {
        "tcp" => Some(L4Proto::Tcp),
        "udp" => Some(L4Proto::Udp),
        _ => None,
    }
}

impl Chain {
    /// Parse `/tcp/s1/s2/udp/s3` (a trailing `/` is allowed). A service literally
    /// named `tcp` or `udp` cannot be part of a chain.
    pub fn parse(path: &str) -> Result<Chain, ChainError> {
        let path = path.strip_prefix('/').ok_or(ChainError::NoProtocol)?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut segments = path.split('/').enumerate();
        let mut proto = match segments.next() {
            Some((_, s)) => proto_of(s).ok_or(ChainError::NoProtocol)?,
            None => return Err(ChainError::NoProtocol),
        };
        let mut hops = Vec::new();
        let mut pending_proto = true;
        for (at, segment) in segments {
            if segment.is_empty() {
                return Err(ChainError::EmptySegment { at });
            }
            if let Some(p) = proto_of(segment) {
                if pending_proto {
                    return Err(ChainError::NoService { after: proto });
                }
                proto = p;
                pending_proto = true;
                continue;
            }
            if segment.len() > MAX_SERVICE_NAME {
                return Err(ChainError::NameTooLong { service_at: hops.len() });
            }
            hops.push(L4Hop { proto, service: segment.to_string() });
            pending_proto = false;
            if hops.len() > MAX_CHAIN_HOPS {
                return Err(ChainError::TooManyHops { hops: hops.len() });
            }
        }
        if pending_proto {
            return Err(ChainError::NoService { after: proto });
        }
        Ok(Chain { hops })
    }

    /// A chain of the given hops (at least one, at most [`MAX_CHAIN_HOPS`]).
    pub fn from_hops(hops: Vec<L4Hop>) -> Result<Chain, ChainError> {
        if hops.is_empty() {
            return Err(ChainError::NoProtocol);
        }
        if hops.len() > MAX_CHAIN_HOPS {
            return Err(ChainError::TooManyHops { hops: hops.len() });
        }
        Ok(Chain { hops })
    }

    /// The hops in order; never empty.
    pub fn hops(&self) -> &[L4Hop] {
        &self.hops
    }

    /// The protocol of the client's socket: the first hop's.
    pub fn proto(&self) -> L4Proto {
        self.hops[0].proto
    }

    /// The first hop, and the ones after it.
    pub fn split_first(&self) -> (&L4Hop, &[L4Hop]) {
        let (first, rest) = self.hops.split_first().expect("a chain has at least one hop");
        (first, rest)
    }
}

/// The canonical path: one protocol segment wherever the protocol changes.
impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = None;
        for hop in &self.hops {
            if last != Some(hop.proto) {
                write!(f, "/{}", hop.proto.as_str())?;
                last = Some(hop.proto);
            }
            write!(f, "/{}", hop.service)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hop(proto: L4Proto, service: &str) -> L4Hop {
        L4Hop { proto, service: service.into() }
    }

    #[test]
    fn paths_name_services_with_the_last_protocol_before_them() {
        let c = Chain::parse("/tcp/s1/s2/udp/s3").unwrap();
        assert_eq!(c.hops(), &[hop(L4Proto::Tcp, "s1"), hop(L4Proto::Tcp, "s2"), hop(L4Proto::Udp, "s3")]);
        assert_eq!(c.proto(), L4Proto::Tcp);
        assert_eq!(c.to_string(), "/tcp/s1/s2/udp/s3");
        assert_eq!(Chain::parse("/udp/echo/").unwrap().to_string(), "/udp/echo");
        // A repeated protocol is canonicalised away.
        assert_eq!(Chain::parse("/tcp/a/tcp/b").unwrap().to_string(), "/tcp/a/b");
    }

    #[test]
    fn bad_paths_say_what_is_wrong() {
        assert_eq!(Chain::parse("/echo"), Err(ChainError::NoProtocol));
        assert_eq!(Chain::parse(""), Err(ChainError::NoProtocol));
        assert_eq!(Chain::parse("/tcp"), Err(ChainError::NoService { after: L4Proto::Tcp }));
        assert_eq!(Chain::parse("/tcp/"), Err(ChainError::NoService { after: L4Proto::Tcp }));
        assert_eq!(Chain::parse("/tcp/a/udp"), Err(ChainError::NoService { after: L4Proto::Udp }));
        assert_eq!(Chain::parse("/tcp/udp/a"), Err(ChainError::NoService { after: L4Proto::Tcp }));
        assert_eq!(Chain::parse("/tcp//a"), Err(ChainError::EmptySegment { at: 1 }));
        let long = format!("/tcp/{}", "x".repeat(MAX_SERVICE_NAME + 1));
        assert_eq!(Chain::parse(&long), Err(ChainError::NameTooLong { service_at: 0 }));
        let many = format!("/udp{}", "/s".repeat(MAX_CHAIN_HOPS + 1));
        assert_eq!(Chain::parse(&many), Err(ChainError::TooManyHops { hops: MAX_CHAIN_HOPS + 1 }));
        let most = format!("/udp{}", "/s".repeat(MAX_CHAIN_HOPS));
        assert_eq!(Chain::parse(&most).unwrap().hops().len(), MAX_CHAIN_HOPS);
    }

    proptest! {
        /// Any chain's canonical path parses back to the same chain.
        #[test]
        fn canonical_paths_roundtrip(hops in proptest::collection::vec((any::<bool>(), "[a-z0-9-]{1,12}"), 1..=MAX_CHAIN_HOPS)) {
            prop_assume!(hops.iter().all(|(_, s)| s != "tcp" && s != "udp"));
            let hops: Vec<L4Hop> = hops
                .into_iter()
                .map(|(udp, s)| hop(if udp { L4Proto::Udp } else { L4Proto::Tcp }, &s))
                .collect();
            let chain = Chain::from_hops(hops).unwrap();
            prop_assert_eq!(Chain::parse(&chain.to_string()), Ok(chain));
        }

        /// Arbitrary paths never panic, and what parses is within the bounds.
        #[test]
        fn arbitrary_paths_never_panic(path in ".{0,64}") {
            if let Ok(c) = Chain::parse(&path) {
                prop_assert!(!c.hops().is_empty() && c.hops().len() <= MAX_CHAIN_HOPS);
            }
        }
    }
}
