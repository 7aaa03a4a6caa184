//! Service mode: does the application answer? The sidecar asks it `HEAD /` on a new
//! connection every interval and tells the core; the core decides when the
//! application counts as down (then the sidecar's probe answers and idle answers say
//! so, and clients and the allocator move away from it). Any response head counts
//! as an answer: the check asks whether the application is alive, not whether `/`
//! exists. A stopped process still accepts connections (the kernel does), so only a
//! response within the timeout counts.

use crate::http::RequestBody;
use crate::node_loop::NodeHandle;
use crate::transport::Connector;
use crate::tunnel::http1_client;
use hyper::Request;
use physarum_core::io::Input;
use std::time::Duration;

pub(crate) async fn check_app<C: Connector>(app: C, node: NodeHandle, interval: Duration, timeout: Duration) {
    loop {
        let answered = matches!(tokio::time::timeout(timeout, ask(&app)).await, Ok(Ok(())));
        if !answered {
            tracing::debug!("the application did not answer its check within {timeout:?}");
        }
        node.feed(Input::AppChecked { answered });
        tokio::time::sleep(interval).await;
    }
}

async fn ask<C: Connector>(app: &C) -> Result<(), String> {
    let io = app.connect().await.map_err(|e| e.to_string())?;
    let mut sender = http1_client::<_, RequestBody>(io, "application check").await.map_err(|e| e.to_string())?;
    let req = Request::head("/")
        .header(hyper::header::HOST, "physarum-check")
        .body(RequestBody::Empty)
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map(drop).map_err(|e| e.to_string())
}
