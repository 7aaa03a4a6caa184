//! Wire frames: every top-level message type is decoded from the same untrusted
//! bytes, both as a stream (`decode`) and as a frame body (`decode_body`).

use physarum_core::wire::{
    self, Envelope, L4Open, L4Ready, Request, Response, TunnelAck, TunnelHello, LEN_PREFIX, MAX_FRAME,
};
use physarum_net_sim::dht::DhtMsg;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// Decode `bytes` as every message type nodes exchange. A new message type is one
/// more line here.
pub fn check_all(bytes: &[u8]) {
    check::<Request>(bytes);
    check::<Response>(bytes);
    check::<Envelope>(bytes);
    check::<TunnelHello>(bytes);
    check::<TunnelAck>(bytes);
    check::<L4Open>(bytes);
    check::<L4Ready>(bytes);
    check::<DhtMsg>(bytes);
}

/// Decoding never panics; what decodes re-encodes to a frame that decodes to the
/// same message; a stream decode never claims more bytes than it was given and
/// asks for more only when the announced frame is not all there.
pub fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) {
    match wire::decode::<T>(bytes) {
        Ok(Some((msg, used))) => {
            assert!(used > LEN_PREFIX && used <= bytes.len() && used <= LEN_PREFIX + MAX_FRAME);
            assert_eq!(wire::decode_body::<T>(&bytes[LEN_PREFIX..used]).as_ref(), Ok(&msg));
            roundtrip(&msg);
        }
        Ok(None) => {
            if let Some(prefix) = bytes.get(..LEN_PREFIX) {
                let announced = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
                assert!(bytes.len() < LEN_PREFIX + announced, "asked for more bytes with a whole frame present");
            }
        }
        Err(_) => {}
    }
    if let Ok(msg) = wire::decode_body::<T>(bytes) {
        roundtrip(&msg);
    }
}

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let frame = wire::encode(msg).expect("a decoded message encodes again");
    let (back, used) = wire::decode::<T>(&frame).expect("re-encoded frame decodes").expect("a whole frame");
    assert_eq!(&back, msg);
    assert_eq!(used, frame.len());
}
