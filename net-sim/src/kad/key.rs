//! 256-bit keys and the XOR metric.

use physarum_core::types::PeerId;
use sha2::{Digest, Sha256};
use std::fmt;

/// A point of the key space: SHA-256 of a peer id or of a DHT key.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

/// XOR distance between two keys, ordered as a 256-bit big-endian number.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Distance(pub [u8; 32]);

impl Key {
    pub fn hash(bytes: &[u8]) -> Key {
        Key(Sha256::digest(bytes).into())
    }

    pub fn of_peer(peer: &PeerId) -> Key {
        Key::hash(format!("peer:{}", peer.0).as_bytes())
    }

    pub fn distance(&self, other: &Key) -> Distance {
        let mut d = [0u8; 32];
        for (i, b) in d.iter_mut().enumerate() {
            *b = self.0[i] ^ other.0[i];
        }
        Distance(d)
    }
}

impl Distance {
    /// The k-bucket a key at this distance belongs to: 255 minus the number of
    /// leading zero bits (`None` for distance zero, ourselves).
    pub fn bucket(&self) -> Option<usize> {
        let mut zeros = 0usize;
        for b in self.0 {
            if b == 0 {
                zeros += 8;
            } else {
                zeros += b.leading_zeros() as usize;
                return Some(255 - zeros);
            }
        }
        None
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}
