//! The request-response codec: `core::wire` frames (length prefix, version byte,
//! postcard payload, at most `MAX_FRAME`) carrying `wire::Request` / `wire::Response`.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use physarum_core::wire::{self, Request, Response, LEN_PREFIX};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;

/// Protocol name of physarum's request-response exchanges.
pub const RR_PROTOCOL: StreamProtocol = StreamProtocol::new("/physarum/rr/1.0.0");

#[derive(Clone, Copy, Debug, Default)]
pub struct WireCodec;

async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(io: &mut R) -> io::Result<T> {
    let mut prefix = [0u8; LEN_PREFIX];
    io.read_exact(&mut prefix).await?;
    // Checks MAX_FRAME before anything is allocated.
    let len = wire::frame_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // Grow the buffer as bytes arrive: a peer that announces a large frame and
    // sends nothing more must not make us allocate it.
    let mut body = Vec::new();
    io.take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    wire::decode_body(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_msg<T: Serialize, W: AsyncWrite + Unpin + Send>(io: &mut W, msg: &T) -> io::Result<()> {
    let frame = wire::encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&frame).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for WireCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        read_msg(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        read_msg(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()> {
        write_msg(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()> {
        write_msg(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    #[test]
    fn round_trips_and_refuses_oversized_frames() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            let req = Request::Allocate { service: "hello".into() };
            WireCodec.write_request(&RR_PROTOCOL, &mut buf, req.clone()).await.unwrap();
            let got = WireCodec.read_request(&RR_PROTOCOL, &mut &buf[..]).await.unwrap();
            assert_eq!(got, req);
            // A length prefix over MAX_FRAME is refused before reading the body.
            let huge = ((wire::MAX_FRAME + 1) as u32).to_be_bytes();
            let err = WireCodec.read_response(&RR_PROTOCOL, &mut &huge[..]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // Garbage is an error, not a panic.
            let junk = [0, 0, 0, 3, 1, 0xff, 0xff];
            assert!(WireCodec.read_request(&RR_PROTOCOL, &mut &junk[..]).await.is_err());
            // A frame cut short is an error too.
            let cut = &buf[..buf.len() - 1];
            let err = WireCodec.read_request(&RR_PROTOCOL, &mut &cut[..]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    /// Hands out its bytes, then never more (a peer that stopped sending); records
    /// the largest buffer it was asked to fill.
    struct Stalling {
        bytes: Vec<u8>,
        largest_read: usize,
    }

    impl AsyncRead for Stalling {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.largest_read = self.largest_read.max(buf.len());
            if self.bytes.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = buf.len().min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn an_announced_frame_is_not_allocated_before_its_bytes_arrive() {
        use std::future::Future;
        let mut bytes = (wire::MAX_FRAME as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 10]);
        let mut peer = Stalling { bytes, largest_read: 0 };
        let (mut codec, protocol) = (WireCodec, RR_PROTOCOL);
        {
            let read = std::pin::pin!(codec.read_request(&protocol, &mut peer));
            let polled = read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            assert!(polled.is_pending());
        }
        assert!(peer.bytes.is_empty(), "all sent bytes were read");
        assert!(peer.largest_read < 4096, "a buffer of {} bytes for 10 received", peer.largest_read);
    }
}
