//! The simulated application behind a service-mode proxy, and the client application
//! sending requests through an anonymous proxy. Both speak real HTTP/1.1 (hyper)
//! over turmoil TCP.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::rc::Rc;
use std::time::Duration;
use turmoil::net::{TcpListener, TcpStream};

/// Header naming the instance that served a request.
pub const SERVED_BY: &str = "x-served-by";

/// Serve the tiny application on `port` until the host (or the instance) stops:
/// every request gets `200` with a body naming `instance` and the path it got —
/// until `hung` is set: from then on connections are accepted and requests read,
/// but none is answered (a stopped process behind a live sidecar).
pub async fn serve_app(port: u16, instance: String, hung: Rc<Cell<bool>>) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let instance = instance.clone();
        let hung = hung.clone();
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let instance = instance.clone();
                let hung = hung.clone();
                async move {
                    // Held while hung, as a stopped process holds what it has read.
                    while hung.get() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let body = format!("hello from {instance}: {}\n", req.uri());
                    let resp = Response::builder()
                        .status(StatusCode::OK)
                        .header(SERVED_BY, instance.as_str())
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// What the client application saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientResult {
    /// An HTTP answer: status, the serving instance when named, the body.
    Answer { status: u16, served_by: Option<String>, body: String },
    /// No HTTP answer: connection refused or broken.
    Error(String),
}

/// `GET path` to the proxy listening on this host's `port`, on a new connection.
pub async fn get(port: u16, path: &str, limit: Duration) -> Option<ClientResult> {
    tokio::time::timeout(limit, get_inner(port, path)).await.ok()
}

async fn get_inner(port: u16, path: &str) -> ClientResult {
    let stream = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => return ClientResult::Error(format!("connect: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => return ClientResult::Error(format!("handshake: {e}")),
    };
    let conn_task = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let result = match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let served_by = resp.headers().get(SERVED_BY).and_then(|v| v.to_str().ok()).map(str::to_string);
            match resp.into_body().collect().await {
                Ok(b) => ClientResult::Answer {
                    status,
                    served_by,
                    body: String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                },
                Err(e) => ClientResult::Error(format!("body: {e}")),
            }
        }
        Err(e) => ClientResult::Error(format!("request: {e}")),
    };
    conn_task.abort();
    result
}
