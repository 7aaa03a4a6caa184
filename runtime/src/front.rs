//! The HTTP front end: `METHOD /<service>/<rest>?<query>` → the core decides → the
//! request is tunnelled to an instance of `<service>` with its body streamed both
//! ways, or answered with the core's status and a plain-text reason.

use crate::http::{strip_for_forwarding, text_response, ProxyBody};
use crate::node_loop::NodeHandle;
use crate::transport::{Listener, Observer, Transport};
use crate::tunnel::{SendFailure, TunnelPool};
use hyper::body::Incoming;
use hyper::http::uri::{InvalidUri, PathAndQuery};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use physarum_core::io::{Input, Outcome};
use physarum_core::types::{ContentHash, PeerAddr};
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

/// How many instances failing the trust check one request may skip before it fails.
const MAX_UNTRUSTED_PER_REQUEST: usize = 4;

pub(crate) struct FrontCtx<T: Transport> {
    pub handle: NodeHandle,
    pub pool: Rc<TunnelPool<T>>,
    pub observer: Rc<dyn Observer>,
    pub request_deadline: Duration,
}

pub(crate) async fn serve<L: Listener, T: Transport>(mut listener: L, ctx: Rc<FrontCtx<T>>) {
    loop {
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("front end: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(conn), svc)
                .await;
            if let Err(e) = served {
                tracing::debug!("front end connection: {e}");
            }
        });
    }
}

/// Split `/<service>/<rest>` into the service and the path to forward (`/<rest>`).
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let path = path.strip_prefix('/')?;
    let (service, rest) = match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, "/"),
    };
    (!service.is_empty()).then_some((service, rest))
}

/// The target sent on to the instance: `/<rest>` (from [`split_path`]) and the query.
pub fn forward_path(rest: &str, query: Option<&str>) -> Result<PathAndQuery, InvalidUri> {
    match query {
        Some(q) => format!("{rest}?{q}").parse(),
        None => rest.parse(),
    }
}

async fn handle<T: Transport>(ctx: &FrontCtx<T>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = tokio::time::Instant::now();
    let (service, resp) = route(ctx, req).await;
    ctx.observer.request_finished(&service, resp.status().as_u16(), started.elapsed());
    resp
}

async fn route<T: Transport>(ctx: &FrontCtx<T>, mut req: Request<Incoming>) -> (String, Response<ProxyBody>) {
    let Some((service, rest)) = split_path(req.uri().path()) else {
        return (String::new(), text_response(400, "no service in the path: use /<service>/<path>"));
    };
    let service = service.to_string();
    // One deadline covers deciding and forwarding, up to the response head.
    let deadline = tokio::time::Instant::now() + ctx.request_deadline;
    let forward = match forward_path(rest, req.uri().query()) {
        Ok(pq) => Uri::from(pq),
        Err(e) => return (service, text_response(400, format!("bad path: {e}"))),
    };
    *req.uri_mut() = forward;
    *req.version_mut() = hyper::Version::HTTP_11;
    strip_for_forwarding(req.headers_mut());
    // A cached instance that died is only noticed when its tunnel cannot be opened;
    // the request is still untouched then, so the core is asked once more (it has
    // evicted the peer and finds or allocates another) rather than failing the client.
    // An instance that fails the trust check never saw the request either: the core
    // bans it and is asked again, a few times (several rogue providers may answer).
    let mut retried = false;
    let mut untrusted_left = MAX_UNTRUSTED_PER_REQUEST;
    loop {
        let (instance, hash) = match decide(ctx, &service, deadline).await {
            Ok(route) => route,
            Err(resp) => return (service, resp),
        };
        // A tunnel whose connection died silently (partition, host gone without a
        // RST) never errors: bound the wait, and drop the stream with the future so
        // it never returns to the pool.
        match tokio::time::timeout_at(deadline, ctx.pool.send(&instance, &service, &hash, req)).await {
            Ok(Ok(resp)) => return (service, resp),
            Ok(Err(SendFailure { reason, unsent: Some(back), untrusted: true })) => {
                tracing::warn!(%service, peer = %instance.peer, %reason, "instance failed the trust check; not routing to it");
                ctx.handle.feed(Input::Untrusted {
                    service: hash,
                    peer: instance.peer.clone(),
                    reason: reason.clone(),
                });
                untrusted_left -= 1;
                if untrusted_left == 0 {
                    let msg = format!("no trusted instance of {service}: {} {reason}", instance.peer);
                    return (service, text_response(502, msg));
                }
                req = back;
            }
            Ok(Err(SendFailure { reason, unsent, .. })) => {
                ctx.handle.route_failed(hash, instance.peer.clone(), reason.clone());
                match unsent {
                    Some(back) if !retried => {
                        tracing::debug!(%service, peer = %instance.peer, %reason, "instance unreachable, asking again");
                        retried = true;
                        req = back;
                    }
                    _ => {
                        let msg = format!("could not forward to instance {} of {service}: {reason}", instance.peer);
                        return (service, text_response(502, msg));
                    }
                }
            }
            Err(_) => {
                let reason = "no response within the request deadline".to_string();
                ctx.handle.route_failed(hash, instance.peer.clone(), reason.clone());
                let msg = format!("instance {} of {service} sent {reason}", instance.peer);
                return (service, text_response(504, msg));
            }
        }
    }
}

/// Ask the core where `service`'s request goes, within what is left of `deadline`:
/// the instance and the service's hash, or the response to give the client.
async fn decide<T: Transport>(
    ctx: &FrontCtx<T>,
    service: &str,
    deadline: tokio::time::Instant,
) -> Result<(PeerAddr, ContentHash), Response<ProxyBody>> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // The core answers by the deadline; the extra second only guards against a bug.
    let outcome =
        tokio::time::timeout(left + Duration::from_secs(1), ctx.handle.request(service.to_string(), left)).await;
    match outcome {
        Ok(Some(Outcome::Route { instance, service: hash })) => Ok((instance, hash)),
        Ok(Some(Outcome::Fail { status, reason })) => Err(text_response(status, reason)),
        Ok(None) => Err(text_response(503, "the node is shutting down")),
        Err(_) => Err(text_response(504, "no decision within the request deadline")),
    }
}

#[cfg(test)]
mod tests {
    use super::split_path;

    #[test]
    fn paths_split_into_service_and_rest() {
        assert_eq!(split_path("/hello/a/b"), Some(("hello", "/a/b")));
        assert_eq!(split_path("/hello/"), Some(("hello", "/")));
        assert_eq!(split_path("/hello"), Some(("hello", "/")));
        assert_eq!(split_path("/"), None);
        assert_eq!(split_path("//x"), None);
        assert_eq!(split_path(""), None);
    }
}
