//! The `hello` demo service: answers `Hello, world` and a few test endpoints.
//!
//! - `/echo` (any method): the method, path, query and body back, as
//!   `METHOD PATH?QUERY\n\nBODY` (the body streamed through, not buffered);
//! - `/bytes/N`: N bytes (`x`), streamed in 64 KiB chunks;
//! - `/sleep/MS`: `slept MS` after MS milliseconds (at most 10 minutes);
//! - `/healthz`: `ok`;
//! - `/pid`: this process's id (tells instances apart in tests);
//! - anything else: `Hello, world`.

use bytes::Bytes;
use futures::{stream, StreamExt};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

const CHUNK: usize = 64 * 1024;
/// Largest `/bytes/N` served (16 GiB).
const MAX_BYTES: u64 = 16 << 30;

fn full(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let body = Full::new(text.into()).map_err(|never: Infallible| match never {}).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    resp
}

/// Answer one request.
pub async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/echo" {
        let head =
            format!("{} {}{}\n\n", req.method(), path, req.uri().query().map(|q| format!("?{q}")).unwrap_or_default());
        let body = BodyStream::new(req.into_body()).map(|f| f.map_err(std::io::Error::other));
        let frames = stream::once(async move { Ok(Frame::data(Bytes::from(head))) }).chain(body);
        return Ok(Response::new(StreamBody::new(frames).boxed_unsync()));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return Ok(full(StatusCode::BAD_REQUEST, "bad byte count\n"));
        };
        if n > MAX_BYTES {
            return Ok(full(StatusCode::BAD_REQUEST, "byte count too large\n"));
        }
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let frames = stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(CHUNK as u64) as usize;
                Some((Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))), left - take as u64))
            }
        });
        let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
        resp.headers_mut().insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(n));
        return Ok(resp);
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return Ok(full(StatusCode::BAD_REQUEST, "bad milliseconds\n"));
        };
        let ms = ms.min(600_000);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Ok(full(StatusCode::OK, format!("slept {ms}\n")));
    }
    if path == "/healthz" {
        return Ok(full(StatusCode::OK, "ok\n"));
    }
    if path == "/pid" {
        return Ok(full(StatusCode::OK, format!("{}\n", std::process::id())));
    }
    Ok(full(StatusCode::OK, "Hello, world\n"))
}

/// Serve on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle));
            if let Err(e) = conn.await {
                tracing::debug!("connection error: {e}");
            }
        });
    }
}
