//! Listeners: the accept loop over TCP or a Unix socket, one task per connection (see `conn`),
//! and graceful shutdown that lets in-flight requests finish.

mod conn;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Connection settings shared by both listeners.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// An idle HTTP/1 keep-alive connection is parked after this long (see `conn`).
    pub park_idle_after: Duration,
}

/// The credentials of a process connected over the Unix socket (SO_PEERCRED), as the kernel
/// reported them at connect time: a request extension, so identity can match `peer_uid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(SocketAddr),
    Unix(Option<PeerCred>),
}

/// A listener the accept loop can serve: TCP or a Unix socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

/// An accepted connection's socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                // Without credentials the connection can still use agent keys, never peer_uid.
                let cred = stream.peer_cred().ok().map(|c| PeerCred { uid: c.uid(), gid: c.gid(), pid: c.pid() });
                Ok((Stream::Unix(stream), Peer::Unix(cred)))
            }
        }
    }
}

impl Stream {
    /// Waits until the socket has something to read (data, end of stream or an error).
    async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.readable().await,
            Stream::Unix(stream) => stream.readable().await,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(stream) => stream.is_write_vectored(),
            Stream::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then waits up to the grace period
/// for open connections to finish: parked and idle ones close at once, in-flight requests run on.
/// `parked` counts the connections parked at any moment.
pub async fn serve(
    listener: impl Into<Listener>,
    router: Router,
    settings: ConnSettings,
    parked: Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = listener.into();
    let server = Arc::new(conn::Server::new(router, settings, parked));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        connections.spawn(conn::run(server.clone(), stream, peer, shutdown.clone()));
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.shutdown_grace, drained).await.is_err() {
        tracing::warn!(open = connections.len(), "shutdown grace period ended; closing the remaining connections");
    }
    // Aborting drops each connection's request futures and bodies, so their audit guards record
    // the disconnect now, before the caller flushes the audit file.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
