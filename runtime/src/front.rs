//! The HTTP front end: `METHOD /<service>/<rest>?<query>` → the core decides → the
//! request is tunnelled to an instance of `<service>` with its body streamed both
//! ways, or answered with the core's status and a plain-text reason.

use crate::http::{strip_for_forwarding, text_response, ProxyBody, RequestBody};
use crate::l4::{self, L4Ctx};
use crate::limits::Limits;
use crate::node_loop::NodeHandle;
use crate::transport::{Listener, Observer, Transport};
use crate::tunnel::{SendFailure, TunnelPool};
use hyper::body::{Body as _, Incoming};
use hyper::http::uri::{InvalidUri, PathAndQuery};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use physarum_core::io::Outcome;
use physarum_core::resilience::{is_idempotent, IDEMPOTENT_HEADER};
use physarum_core::types::{ContentHash, PeerAddr};
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

/// How many instances failing the trust check one request may skip before it fails.
const MAX_UNTRUSTED_PER_REQUEST: usize = 4;

pub(crate) struct FrontCtx<T: Transport> {
    pub handle: NodeHandle,
    pub l4: Rc<L4Ctx<T>>,
    pub pool: Rc<TunnelPool<T>>,
    pub observer: Rc<dyn Observer>,
    pub request_deadline: Duration,
    pub limits: Rc<Limits>,
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

async fn route<T: Transport>(ctx: &FrontCtx<T>, req: Request<Incoming>) -> (String, Response<ProxyBody>) {
    let Some((service, rest)) = split_path(req.uri().path()) else {
        return (String::new(), text_response(400, "no service in the path: use /<service>/<path>"));
    };
    // `GET /tcp/…` and `GET /udp/…` ask for L4 mappings (as the original's proxy).
    if matches!(service, "tcp" | "udp") {
        let path = req.uri().path().to_string();
        return (service.to_string(), l4::control(&ctx.l4, req.method(), &path).await);
    }
    let service = service.to_string();
    // One deadline covers deciding and forwarding, up to the response head.
    let deadline = tokio::time::Instant::now() + ctx.request_deadline;
    let forward = match forward_path(rest, req.uri().query()) {
        Ok(pq) => Uri::from(pq),
        Err(e) => return (service, text_response(400, format!("bad path: {e}"))),
    };
    let admitted = match ctx.limits.requests.enter(ctx.limits.queue_wait).await {
        Ok(a) => a,
        Err(refusal) => {
            tracing::info!(%service, "refused: the proxy is at its concurrency limit ({refusal:?})");
            return (service, ctx.limits.overloaded("the proxy", refusal));
        }
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = forward;
    parts.version = hyper::Version::HTTP_11;
    strip_for_forwarding(&mut parts.headers);
    let marked = parts.headers.get(IDEMPOTENT_HEADER).and_then(|v| v.to_str().ok());
    // A request that may be sent twice and has no body can be rebuilt for a retry
    // even after its first try took it.
    let replayable = is_idempotent(parts.method.as_str(), marked) && body.is_end_stream();
    let replay = replayable.then(|| Request::from_parts(parts.clone(), ()));
    let req = Request::from_parts(parts, RequestBody::from(body));
    let busy = ctx.handle.busy();
    let resp = forward_with_retry(ctx, &service, req, replay, deadline).await;
    (service, resp.map(|b| b.hold(admitted).hold(busy)))
}

/// Route and send `req`; after a failed try, route it once more (the core decides
/// whether the retry budget allows) if the request is still in hand (`unsent`) or
/// can be rebuilt from `replay`. An instance that fails the trust check never saw
/// the request: the core bans it and is asked again, a few times (several rogue
/// providers may answer), outside the retry budget.
async fn forward_with_retry<T: Transport>(
    ctx: &FrontCtx<T>,
    service: &str,
    mut req: Request<RequestBody>,
    replay: Option<Request<()>>,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    let mut failed: Option<(Response<ProxyBody>, String)> = None;
    let mut untrusted_left = MAX_UNTRUSTED_PER_REQUEST;
    loop {
        let retry = failed.is_some();
        let Route { instance, hash, try_timeout } = match decide(&ctx.handle, service, deadline, retry).await {
            Ok(route) => route,
            Err((status, reason)) => {
                return match failed {
                    // The retry could not be routed: answer with the first failure.
                    Some((first, _)) => first,
                    None => text_response(status, reason),
                };
            }
        };
        if let Some((_, reason)) = &failed {
            tracing::info!(%service, peer = %instance.peer, "retrying on another instance after: {reason}");
        }
        let gate = ctx.limits.streams.gate(&instance.peer);
        let wait = ctx.limits.queue_wait.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let stream_place = match gate.enter(wait).await {
            Ok(p) => p,
            Err(refusal) => {
                tracing::info!(%service, peer = %instance.peer, "refused: the instance's stream limit is reached ({refusal:?})");
                return ctx
                    .limits
                    .overloaded(&format!("the tunnel to instance {} of {service}", instance.peer), refusal);
            }
        };
        // A tunnel whose connection died silently (partition, host gone without a
        // RST) never errors, and a stalled application never answers: bound the
        // wait for the response head by the try's timeout. The stream is dropped with
        // the future, so it never returns to the pool.
        let try_until = deadline.min(tokio::time::Instant::now() + try_timeout);
        let (status, reason, unsent) =
            match tokio::time::timeout_at(try_until, ctx.pool.send(&instance, service, &hash, req)).await {
                Ok(Ok(resp)) => return resp.map(|b| b.hold(stream_place)),
                Ok(Err(SendFailure { reason, unsent: Some(back), untrusted: true })) => {
                    ctx.handle.untrusted(service, hash, &instance.peer, &reason);
                    untrusted_left -= 1;
                    if untrusted_left == 0 {
                        return text_response(
                            502,
                            format!("no trusted instance of {service}: {} {reason}", instance.peer),
                        );
                    }
                    req = back;
                    continue;
                }
                Ok(Err(SendFailure { reason, unsent, .. })) => (502, reason, unsent),
                Err(_) if try_until < deadline => {
                    (504, format!("no response head within the try timeout ({try_timeout:?})"), None)
                }
                Err(_) => (504, "no response within the request deadline".to_string(), None),
            };
        drop(stream_place);
        ctx.handle.route_failed(hash, instance.peer.clone(), reason.clone());
        let msg = format!("instance {} of {service} failed: {reason}", instance.peer);
        let again = unsent.or_else(|| replay.as_ref().map(rebuild));
        match again {
            Some(back) if !retry && tokio::time::Instant::now() < deadline => {
                failed = Some((text_response(status, msg), reason));
                req = back;
            }
            _ => return text_response(status, msg),
        }
    }
}

/// A copy of a request that had no body.
fn rebuild(head: &Request<()>) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    req
}

/// Where the core routes a request: the instance, the service's hash, and the
/// timeout of one try.
pub(crate) struct Route {
    pub instance: PeerAddr,
    pub hash: ContentHash,
    pub try_timeout: Duration,
}

/// Ask the core where `service`'s request goes (`retry`: after a failed try),
/// within what is left of `deadline`: the route, or the status and reason to give
/// the client.
pub(crate) async fn decide(
    handle: &NodeHandle,
    service: &str,
    deadline: tokio::time::Instant,
    retry: bool,
) -> Result<Route, (u16, String)> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let asked = async {
        match retry {
            false => handle.request(service.to_string(), left).await,
            true => handle.retry(service.to_string(), left).await,
        }
    };
    // The core answers by the deadline; the extra second only guards against a bug.
    let outcome = tokio::time::timeout(left + Duration::from_secs(1), asked).await;
    match outcome {
        Ok(Some(Outcome::Route { instance, service: hash, try_timeout })) => Ok(Route { instance, hash, try_timeout }),
        Ok(Some(Outcome::Fail { status, reason })) => Err((status, reason)),
        Ok(None) => Err((503, "the node is shutting down".into())),
        Err(_) => Err((504, "no decision within the request deadline".into())),
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
