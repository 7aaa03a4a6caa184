//! `physarum l4 map …`: ask a proxy for an L4 mapping (`GET /tcp/…` on its HTTP
//! port) and print the local address it opened.

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

/// The path of a mapping from its words: `tcp s1 s2 udp s3` → `/tcp/s1/s2/udp/s3`.
pub fn mapping_path(words: &[String]) -> Result<String> {
    let path = format!("/{}", words.join("/"));
    physarum_core::l4::Chain::parse(&path).with_context(|| format!("{path:?} is not an L4 mapping"))?;
    Ok(path)
}

/// GET `path` on the proxy's HTTP port; the address it answers, or its error.
pub async fn map(proxy: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let fut = async {
        let conn = tokio::net::TcpStream::connect(proxy)
            .await
            .with_context(|| format!("cannot reach the proxy at {proxy}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
        tokio::spawn(connection);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, proxy.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
    };
    let (status, body) = tokio::time::timeout(timeout, fut).await.context("the proxy did not answer in time")??;
    if !status.is_success() {
        bail!("the proxy refused {path} ({status}): {body}");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_make_a_chain_path() {
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(mapping_path(&w("tcp echo")).unwrap(), "/tcp/echo");
        assert_eq!(mapping_path(&w("tcp s1 s2 udp s3")).unwrap(), "/tcp/s1/s2/udp/s3");
        assert!(mapping_path(&w("echo")).is_err());
        assert!(mapping_path(&w("udp")).is_err());
    }
}
