//! The L4 demo services: `tcp-echo` sends every byte back on its connection;
//! `udp-echo` sends every datagram back to its sender, whole.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Echo every connection on `listener` until the task is dropped.
pub async fn serve_tcp(listener: TcpListener) {
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = echo_connection(conn).await {
                tracing::debug!(%from, "connection ended: {e}");
            }
        });
    }
}

/// Bytes back until the peer stops sending; then the end back too (half-close).
async fn echo_connection(mut conn: TcpStream) -> std::io::Result<()> {
    let _ = conn.set_nodelay(true);
    let (mut r, mut w) = conn.split();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
    }
    w.shutdown().await
}

/// Echo every datagram on `socket` to its sender until the task is dropped.
pub async fn serve_udp(socket: UdpSocket) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, from): (usize, SocketAddr) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("receive failed: {e}");
                continue;
            }
        };
        if let Err(e) = socket.send_to(&buf[..n], from).await {
            tracing::debug!(%from, "send failed: {e}");
        }
    }
}
