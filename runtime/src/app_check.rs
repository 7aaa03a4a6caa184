//! Service mode: does the application answer? The sidecar asks it `HEAD /` on a new
//! connection every interval and tells the core; the core decides when the
//! application counts as down (then the sidecar's probe answers and idle answers say
//! so, and clients and the allocator move away from it). Any answer counts: a
//! response head, or for an application that does not speak HTTP (an L4 service)
//! any bytes back. The check asks whether the application is alive, not whether `/`
//! exists. A stopped process still accepts connections (the kernel does), so only
//! bytes back within the timeout count. A UDP service is checked the same way on
//! its TCP port, so it must answer there too (the `udp-echo` demo echoes TCP).

use crate::node_loop::NodeHandle;
use crate::transport::Connector;
use physarum_core::io::Input;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// The check: a complete HTTP/1.1 request, so an HTTP application answers it.
const CHECK_REQUEST: &[u8] = b"HEAD / HTTP/1.1\r\nHost: physarum-check\r\nConnection: close\r\n\r\n";

async fn ask<C: Connector>(app: &C) -> Result<(), String> {
    let mut io = app.connect().await.map_err(|e| e.to_string())?;
    io.write_all(CHECK_REQUEST).await.map_err(|e| e.to_string())?;
    let mut first = [0u8; 1];
    match io.read(&mut first).await.map_err(|e| e.to_string())? {
        0 => Err("the application closed the connection without answering".into()),
        _ => Ok(()),
    }
}
