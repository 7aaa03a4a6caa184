//! HTTP plumbing shared by the front end and the tunnel: the body type the proxy
//! answers with, hop-by-hop header handling, plain-text answers, wire frames on a
//! byte stream.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use physarum_core::wire;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response body: a short text of ours, or a body streamed through from a peer or
/// the application (never buffered whole). `on_end` runs once when the streamed
/// body has been read to its end (the tunnel pool uses it to reuse the stream).
pub struct ProxyBody {
    kind: Kind,
    /// Whatever must live as long as the body (admission places, in-flight marks).
    held: Vec<Box<dyn std::any::Any>>,
}

enum Kind {
    Full(Full<Bytes>),
    Stream { inner: Incoming, on_end: Option<Box<dyn FnOnce()>> },
}

impl ProxyBody {
    pub fn text(text: impl Into<String>) -> Self {
        ProxyBody { kind: Kind::Full(Full::new(Bytes::from(text.into()))), held: Vec::new() }
    }
    pub fn empty() -> Self {
        ProxyBody { kind: Kind::Full(Full::new(Bytes::new())), held: Vec::new() }
    }
    pub fn stream(inner: Incoming) -> Self {
        ProxyBody { kind: Kind::Stream { inner, on_end: None }, held: Vec::new() }
    }
    /// Stream `inner`; call `on_end` once it has been read completely.
    pub fn stream_then(inner: Incoming, on_end: impl FnOnce() + 'static) -> Self {
        let mut body = ProxyBody { kind: Kind::Stream { inner, on_end: Some(Box::new(on_end)) }, held: Vec::new() };
        body.fire_if_ended();
        body
    }
    /// Keep `guard` alive until this body is dropped (read to its end or abandoned).
    pub fn hold(mut self, guard: impl std::any::Any) -> Self {
        self.held.push(Box::new(guard));
        self
    }
    fn fire_if_ended(&mut self) {
        if let Kind::Stream { inner, on_end } = &mut self.kind {
            if inner.is_end_stream() {
                if let Some(f) = on_end.take() {
                    f()
                }
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.kind {
            Kind::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            Kind::Stream { inner, on_end } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    _ => false,
                };
                if ended {
                    if let Some(f) = on_end.take() {
                        f()
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(f) => f.is_end_stream(),
            Kind::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(f) => f.size_hint(),
            Kind::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// A request body on its way to the next hop: the client's, streamed through, or
/// none (a request rebuilt to be sent again, which had no body).
#[derive(Debug)]
pub enum RequestBody {
    Streamed(Incoming),
    Empty,
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody::Streamed(body)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(inner) => Pin::new(inner).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(inner) => inner.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(inner) => inner.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A `text/plain` answer with `status` (500 when `status` is not a valid code).
pub fn text_response(status: u16, reason: impl Into<String>) -> Response<ProxyBody> {
    let mut reason = reason.into();
    if !reason.ends_with('\n') {
        reason.push('\n');
    }
    let mut resp = Response::new(ProxyBody::text(reason));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
/// `Transfer-Encoding` goes too: hyper re-frames the streamed body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
}

/// Prepare a request's headers for the next hop: hop-by-hop headers go, and so does
/// `Expect` (this hop's server already answered `100 Continue` when the body was
/// first read; the next hop's client would not wait for another).
pub fn strip_for_forwarding(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::EXPECT);
}

/// Write one wire frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let frame = wire::encode(msg).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame).await?;
    w.flush().await
}

/// Read exactly one wire frame (no read-ahead, so the stream can be handed on).
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> std::io::Result<T> {
    let mut prefix = [0u8; wire::LEN_PREFIX];
    r.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    // Grow the buffer as bytes arrive: a peer that announces a large frame and
    // sends nothing more must not make us allocate it.
    let mut body = Vec::new();
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    wire::decode_body(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, vec!["content-type", "x-kept"]);
    }

    /// Hands out its bytes, then never more (a peer that stopped sending); records
    /// the largest buffer it was asked to fill.
    struct Stalling {
        bytes: Vec<u8>,
        largest_read: usize,
    }

    impl AsyncRead for Stalling {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.largest_read = self.largest_read.max(buf.remaining());
            if self.bytes.is_empty() {
                return Poll::Pending;
            }
            let n = buf.remaining().min(self.bytes.len());
            buf.put_slice(&self.bytes[..n]);
            self.bytes.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn an_announced_frame_is_not_allocated_before_its_bytes_arrive() {
        let mut bytes = (wire::MAX_FRAME as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 10]);
        let mut peer = Stalling { bytes, largest_read: 0 };
        {
            let read = std::pin::pin!(read_frame::<_, wire::TunnelHello>(&mut peer));
            let polled = read.poll(&mut Context::from_waker(std::task::Waker::noop()));
            assert!(polled.is_pending());
        }
        assert!(peer.bytes.is_empty(), "all sent bytes were read");
        assert!(peer.largest_read < 4096, "a buffer of {} bytes for 10 received", peer.largest_read);
    }

    #[test]
    fn a_frame_cut_short_is_an_error() {
        let frame = wire::encode(&wire::TunnelHello { service: "hello".into() }).unwrap();
        let cut = &frame[..frame.len() - 1];
        let err = futures::executor::block_on(read_frame::<_, wire::TunnelHello>(&mut &cut[..])).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let whole = futures::executor::block_on(read_frame::<_, wire::TunnelHello>(&mut &frame[..])).unwrap();
        assert_eq!(whole.service, "hello");
    }
}
