//! Moving L4 data between the ends of a hop: raw byte streams, streams carrying
//! datagrams behind a length prefix ([`wire::datagram_prefix`]), UDP sockets and
//! queues of datagrams. Each direction is a [`pump`]; a relay runs its pumps until
//! every one has reached the end of its source, or one fails.
//!
//! End of data travels along: a stream source at its end shuts its sink's write side
//! (TCP half-close passes through every hop); a UDP socket has no end of its own, so
//! it ends when whatever writes to it has ended ([`UdpEnd`]).

use bytes::Bytes;
use physarum_core::wire::{self, L4Proto, DATAGRAM_PREFIX, MAX_DATAGRAM};
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};

/// Largest read from a byte stream in one go.
const STREAM_CHUNK: usize = 128 * 1024;
/// A receive buffer that holds any UDP datagram whole.
const UDP_BUFFER: usize = 64 * 1024;

/// A UDP socket connected to one application, as one end of a relay. It ends (its
/// reading side reports the end) once the pump writing to it has ended.
pub(crate) struct UdpEnd {
    pub socket: UdpSocket,
    closed: Cell<bool>,
    close: Notify,
}

impl UdpEnd {
    pub fn new(socket: UdpSocket) -> Rc<UdpEnd> {
        Rc::new(UdpEnd { socket, closed: Cell::new(false), close: Notify::new() })
    }
    fn finish(&self) {
        self.closed.set(true);
        // One reader per end: a stored permit wakes it even if it is not waiting yet.
        self.close.notify_one();
    }
}

/// Where a pump reads.
pub(crate) enum Rx {
    /// A byte stream: any chunk of bytes.
    Bytes(Box<dyn AsyncRead + Unpin>),
    /// A stream of length-prefixed datagrams.
    Datagrams(Box<dyn AsyncRead + Unpin>),
    /// A connected UDP socket.
    Udp(Rc<UdpEnd>),
    /// Datagrams handed over by a socket reader shared by many flows; ends when the
    /// sender is dropped.
    Queue(mpsc::Receiver<Bytes>),
}

/// Where a pump writes.
pub(crate) enum Tx {
    Bytes(Box<dyn AsyncWrite + Unpin>),
    /// Datagrams behind their length; the buffer joins prefix and payload into one write.
    Datagrams(Box<dyn AsyncWrite + Unpin>, Vec<u8>),
    /// A connected UDP socket.
    Udp(Rc<UdpEnd>),
    /// A shared socket, sending to one client address (marking the flow active).
    UdpTo(Rc<UdpSocket>, SocketAddr, Option<Rc<Activity>>),
}

/// The two halves of a stream that carries `proto`'s data: raw bytes for TCP,
/// length-prefixed datagrams for UDP.
pub(crate) fn stream_ends<S>(stream: S, proto: L4Proto) -> (Rx, Tx)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (r, w) = tokio::io::split(stream);
    match proto {
        L4Proto::Tcp => (Rx::Bytes(Box::new(r)), Tx::Bytes(Box::new(w))),
        L4Proto::Udp => (Rx::Datagrams(Box::new(r)), Tx::Datagrams(Box::new(w), Vec::new())),
    }
}

/// The two sides of a connected UDP socket.
pub(crate) fn udp_ends(end: Rc<UdpEnd>) -> (Rx, Tx) {
    (Rx::Udp(end.clone()), Tx::Udp(end))
}

impl Rx {
    /// The next chunk into `buf` (at most `max` bytes from a byte stream); `None` at the end.
    pub(crate) async fn next(&mut self, buf: &mut [u8], max: usize) -> io::Result<Option<usize>> {
        match self {
            Rx::Bytes(r) => {
                let n = r.read(&mut buf[..max]).await?;
                Ok((n > 0).then_some(n))
            }
            Rx::Datagrams(r) => {
                let mut prefix = [0u8; DATAGRAM_PREFIX];
                // The end of the stream is only clean between datagrams.
                match r.read(&mut prefix[..1]).await? {
                    0 => return Ok(None),
                    _ => r.read_exact(&mut prefix[1..]).await?,
                };
                let len = wire::datagram_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                r.read_exact(&mut buf[..len]).await?;
                Ok(Some(len))
            }
            Rx::Udp(end) => loop {
                if end.closed.get() {
                    return Ok(None);
                }
                tokio::select! {
                    biased;
                    _ = end.close.notified() => {}
                    got = end.socket.recv(buf) => match got {
                        Ok(n) => return Ok(Some(n)),
                        // An ICMP "port unreachable" for an earlier datagram: the
                        // application is not listening (yet); datagrams are lost, the
                        // flow goes on.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                        Err(e) => return Err(e),
                    },
                }
            },
            Rx::Queue(q) => match q.recv().await {
                Some(d) => {
                    buf[..d.len()].copy_from_slice(&d);
                    Ok(Some(d.len()))
                }
                None => Ok(None),
            },
        }
    }
}

impl Tx {
    /// Whether a chunk becomes one datagram here (so it must fit one).
    fn takes_datagrams(&self) -> bool {
        !matches!(self, Tx::Bytes(_))
    }

    pub(crate) async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Tx::Bytes(w) => w.write_all(data).await,
            Tx::Datagrams(w, joined) => {
                let prefix =
                    wire::datagram_prefix(data.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                joined.clear();
                joined.extend_from_slice(&prefix);
                joined.extend_from_slice(data);
                w.write_all(joined).await
            }
            // A datagram the application's socket refuses is lost, as on any UDP path.
            Tx::Udp(end) => {
                if let Err(e) = end.socket.send(data).await {
                    tracing::debug!("udp datagram to the application lost: {e}");
                }
                Ok(())
            }
            Tx::UdpTo(socket, to, activity) => {
                if let Some(a) = activity {
                    a.touch();
                }
                if let Err(e) = socket.send_to(data, *to).await {
                    tracing::debug!(%to, "udp datagram to the client lost: {e}");
                }
                Ok(())
            }
        }
    }

    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        match self {
            Tx::Bytes(w) | Tx::Datagrams(w, _) => w.flush().await,
            Tx::Udp(_) | Tx::UdpTo(..) => Ok(()),
        }
    }

    /// The source has ended: pass the end on.
    pub(crate) async fn finish(&mut self) {
        match self {
            Tx::Bytes(w) | Tx::Datagrams(w, _) => {
                let _ = w.shutdown().await;
            }
            Tx::Udp(end) => end.finish(),
            Tx::UdpTo(..) => {}
        }
    }
}

/// Counts what a pump moved, and when it last moved something.
#[derive(Default)]
pub(crate) struct Activity {
    pub last: Cell<Option<tokio::time::Instant>>,
}

impl Activity {
    pub(crate) fn touch(&self) {
        self.last.set(Some(tokio::time::Instant::now()));
    }
}

/// Move chunks from `rx` to `tx` until `rx` ends (then pass the end on) or either fails.
pub(crate) async fn pump(mut rx: Rx, mut tx: Tx) -> io::Result<()> {
    let max = if tx.takes_datagrams() { MAX_DATAGRAM } else { STREAM_CHUNK };
    let mut buf = vec![0u8; STREAM_CHUNK.max(UDP_BUFFER)];
    loop {
        let Some(n) = rx.next(&mut buf, max).await? else { break };
        tx.send(&buf[..n]).await?;
        // A stream may hold written bytes until flushed; a chunk never waits for the next.
        tx.flush().await?;
    }
    tx.finish().await;
    Ok(())
}

pub(crate) type Pump = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// Run every pump until all have ended, or the first failure.
pub(crate) async fn run(pumps: Vec<Pump>) -> io::Result<()> {
    futures::future::try_join_all(pumps).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_local<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    /// Datagrams written through a framed stream come out one by one with their
    /// boundaries, empty and maximal ones included, and the end passes through.
    #[test]
    fn datagrams_keep_their_boundaries_through_a_stream() {
        run_local(async {
            let (a, b) = tokio::io::duplex(1024);
            let (_, a_tx) = stream_ends(a, L4Proto::Udp);
            let (b_rx, _) = stream_ends(b, L4Proto::Udp);
            let (qtx, qrx) = mpsc::channel(16);
            let sizes = [0usize, 1, 1500, MAX_DATAGRAM, 7];
            for (i, s) in sizes.iter().enumerate() {
                qtx.send(Bytes::from(vec![i as u8; *s])).await.unwrap();
            }
            drop(qtx);
            let sender = tokio::task::spawn_local(pump(Rx::Queue(qrx), a_tx));
            let mut rx = b_rx;
            let mut buf = vec![0u8; UDP_BUFFER];
            let mut got = Vec::new();
            while let Some(n) = rx.next(&mut buf, MAX_DATAGRAM).await.unwrap() {
                got.push(buf[..n].to_vec());
            }
            sender.await.unwrap().unwrap();
            assert_eq!(got.len(), sizes.len());
            for (i, (d, s)) in got.iter().zip(sizes).enumerate() {
                assert_eq!(d.len(), s);
                assert!(d.iter().all(|b| *b == i as u8));
            }
        });
    }

    #[test]
    fn an_oversized_datagram_prefix_is_an_error_not_a_panic() {
        run_local(async {
            let bytes: &[u8] = &[0xff, 0xff, 1, 2, 3];
            let mut rx = Rx::Datagrams(Box::new(bytes));
            let mut buf = vec![0u8; UDP_BUFFER];
            let err = rx.next(&mut buf, MAX_DATAGRAM).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // A stream cut inside a datagram is an error too, not a clean end.
            let cut: &[u8] = &[0, 5, 1, 2];
            let mut rx = Rx::Datagrams(Box::new(cut));
            assert_eq!(rx.next(&mut buf, MAX_DATAGRAM).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    /// A byte stream into a datagram sink is cut into datagrams that each fit.
    #[test]
    fn bytes_into_datagrams_are_cut_to_fit() {
        run_local(async {
            let data = vec![9u8; 3 * MAX_DATAGRAM + 10];
            let src: &'static [u8] = Box::leak(data.clone().into_boxed_slice());
            let (a, b) = tokio::io::duplex(1 << 20);
            let (_, a_tx) = stream_ends(a, L4Proto::Udp);
            let p = tokio::task::spawn_local(pump(Rx::Bytes(Box::new(src)), a_tx));
            let (mut rx, _) = stream_ends(b, L4Proto::Udp);
            let mut buf = vec![0u8; UDP_BUFFER];
            let mut total = 0;
            while let Some(n) = rx.next(&mut buf, MAX_DATAGRAM).await.unwrap() {
                assert!(n <= MAX_DATAGRAM);
                total += n;
            }
            p.await.unwrap().unwrap();
            assert_eq!(total, data.len());
        });
    }
}
