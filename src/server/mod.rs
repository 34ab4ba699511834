//! Listeners: the accept loop over TCP or a Unix socket, one task per connection (see `conn`),
//! at most `max_connections` at once, and graceful shutdown that lets in-flight requests finish.

mod conn;
pub mod forward;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

pub use crate::arrival::PeerCred;
use crate::error::ProxyError;

/// Connection settings shared by both listeners.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// An idle HTTP/1 keep-alive connection is parked after this long (see `conn`).
    pub park_idle_after: Duration,
    /// The most connections one listener holds open at once; newer ones are refused.
    pub max_connections: usize,
}

/// What the connections of a listener report to the rest of keyward.
#[derive(Clone)]
pub struct Observers {
    /// Connections parked at any moment.
    pub parked: Gauge,
    /// Connections open at any moment, over all listeners.
    pub open: Gauge,
    /// Connections refused because their listener was at `max_connections`.
    pub refused: Counter,
    /// Told of every attempt that never became a request: a head the HTTP parser refused, or
    /// one that did not arrive whole in time (the listener's audit trail records it).
    pub unparsed: Option<Arc<dyn Fn(Unparsed) + Send + Sync>>,
}

/// An attempt refused before it was a request: who sent it and what they were answered.
pub struct Unparsed {
    /// The peer's address, or `unix:uid=N` on the Unix socket (`unix` without credentials).
    pub peer: String,
    /// The answer sent, by its error (`invalid_request_head`, `request_head_timeout`, ...).
    pub error: ProxyError,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(SocketAddr),
    Unix(Option<PeerCred>),
}

impl std::fmt::Display for Peer {
    /// As the audit record's `ip` field writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{}", addr.ip()),
            Peer::Unix(Some(cred)) => write!(f, "unix:uid={}", cred.uid),
            Peer::Unix(None) => f.write_str("unix"),
        }
    }
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

    /// Writes what the socket takes now, without waiting: for a last word before closing.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.try_write(bytes),
            Stream::Unix(stream) => stream.try_write(bytes),
        }
    }
}

/// One open connection: its place under `max_connections` and in the open gauge, given back
/// when the connection's task ends or is aborted.
struct Open {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Open {
    fn new(slot: tokio::sync::OwnedSemaphorePermit, gauge: &Gauge) -> Open {
        gauge.inc();
        Open { _slot: slot, gauge: gauge.clone() }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// `error` as a complete HTTP/1.1 response that closes the connection, for answers given outside
/// hyper (before or after it serves the connection): the usual JSON error body.
fn closing_response(error: &ProxyError) -> Vec<u8> {
    let body = crate::error::error_body(error.code(), &error.message()).to_string();
    let status = error.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if status == http::StatusCode::SERVICE_UNAVAILABLE {
        head.push_str("retry-after: 1\r\n");
    }
    head.push_str("\r\n");
    head.push_str(&body);
    head.into_bytes()
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

/// What a listener serves: a router (the admin API), or the agent-facing app, whose requests
/// go straight to the pipeline except the delegation API's, which go through its router.
#[derive(Clone)]
pub enum App {
    Router(Router),
    Agent { router: Router, state: Arc<crate::AppState> },
}

impl App {
    /// The agent-facing app (`crate::app`) for `state`.
    pub fn agent(state: Arc<crate::AppState>) -> App {
        App::Agent { router: crate::app(state.clone()), state }
    }

    async fn respond(self, request: http::Request<axum::body::Body>) -> axum::response::Response {
        match self {
            // An agent's call skips the router (path matching, its boxed services): only the
            // delegation API has routes of its own; everything else is the router's fallback.
            App::Agent { state, .. } if !request.uri().path().starts_with(crate::principal::api::DELEGATIONS_PATH) => {
                crate::pipeline::handle(axum::extract::State(state), request).await
            }
            App::Agent { router, .. } | App::Router(router) => match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then waits up to the grace period
/// for open connections to finish: parked and idle ones close at once, in-flight requests run on.
/// A connection accepted while `max_connections` are open is answered 503 and closed at once.
pub async fn serve(
    listener: impl Into<Listener>,
    app: App,
    settings: ConnSettings,
    observers: Observers,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = listener.into();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusal = closing_response(&ProxyError::TooManyConnections { max: settings.max_connections });
    let mut refused_since_warning = 0u64;
    let mut last_warning: Option<Instant> = None;
    let server = Arc::new(conn::Server::new(app, settings, observers.clone()));
    let mut connections = JoinSet::new();
    while let Some((stream, peer)) = next_connection(&mut connections, &mut shutdown, || listener.accept()).await {
        // The deadline for the first request head runs from here (see `conn`).
        let accepted = Instant::now();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // The newest connection is the one refused: those already open keep their place.
            let _ = stream.try_write(&refusal);
            drop(stream);
            observers.refused.inc();
            refused_since_warning += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(
                    max = settings.max_connections,
                    refused = refused_since_warning,
                    "connection limit reached (server.max_connections); refusing new connections"
                );
                refused_since_warning = 0;
                last_warning = Some(Instant::now());
            }
            continue;
        };
        let open = Open::new(slot, &observers.open);
        let connection = conn::run(server.clone(), stream, peer, accepted, shutdown.clone());
        connections.spawn(async move {
            connection.await;
            drop(open);
        });
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

/// The next accepted connection, reaping finished ones meanwhile; `None` once shutdown begins.
/// An accept error (out of file descriptors and similar) backs off instead of spinning.
pub(crate) async fn next_connection<S, A, F>(
    connections: &mut JoinSet<()>,
    shutdown: &mut watch::Receiver<bool>,
    mut accept: impl FnMut() -> F,
) -> Option<(S, A)>
where
    F: std::future::Future<Output = std::io::Result<(S, A)>>,
{
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}
