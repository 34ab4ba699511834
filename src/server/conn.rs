//! One agent connection from accept to close: h2c or HTTP/1.1, where an HTTP/1 keep-alive
//! connection idle for `park_idle_after` is parked (hyper's connection, with its read and write
//! buffers, is dropped; only the socket waits until it is readable again).
//!
//! Parking is hyper's own graceful close of an idle connection, without shutting the socket:
//! `graceful_shutdown` on an HTTP/1 connection between requests closes it at once and
//! `into_parts` hands back the socket and any bytes of a next request head already read, which
//! the next hyper connection reads first. It is only asked for when hyper is certainly between
//! requests: every request of this hyper connection has been answered (response bodies ended or
//! dropped), its request body was read to the end (else hyper may be mid-body), and the last
//! response is flushed (no write left pending). hyper confirms it: between requests it closes
//! at once, and if it does not, the connection is closed after the exchange in progress instead
//! of parked. Connections that asked to close, HTTP/2 connections and connections that have not
//! finished a request are never parked.
//!
//! `header_read_timeout` keeps hyper's meaning: the next request head must arrive within it of
//! the previous response, parked or not; before the first byte of a connection there is no
//! deadline, as with hyper-util's protocol detection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

use super::{ConnSettings, Peer, Stream};

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the connections of one listener share.
pub(super) struct Server {
    router: Router,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    park_after: Duration,
    parked: Gauge,
}

impl Server {
    pub(super) fn new(router: Router, settings: ConnSettings, parked: Gauge) -> Server {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).max_header_list_size(settings.max_header_bytes as u32);
        Server {
            router,
            http1,
            http2,
            header_read_timeout: settings.header_read_timeout,
            park_after: settings.park_idle_after,
            parked,
        }
    }
}

/// Serves one accepted connection until it closes or shutdown ends it.
pub(super) async fn run(server: Arc<Server>, mut stream: Stream, peer: Peer, mut shutdown: watch::Receiver<bool>) {
    let preface = tokio::select! {
        read = read_preface(&mut stream) => read,
        () = stopping(&mut shutdown) => return,
    };
    match preface {
        Ok((true, prefix)) => serve_h2(&server, stream, prefix, peer, shutdown).await,
        Ok((false, prefix)) if prefix.is_empty() => {} // closed before sending anything
        Ok((false, prefix)) => serve_h1(&server, stream, prefix, peer, shutdown).await,
        Err(error) => tracing::debug!(?peer, %error, "connection ended with an error"),
    }
}

/// Reads until the bytes are not HTTP/2's preface, or are all of it (or the peer closed).
async fn read_preface(stream: &mut Stream) -> io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let h2 = loop {
        let n = stream.read(&mut buf[filled..]).await?;
        filled += n;
        if n == 0 || buf[..filled] != H2_PREFACE[..filled] {
            break false;
        }
        if filled == H2_PREFACE.len() {
            break true;
        }
    };
    Ok((h2, Bytes::copy_from_slice(&buf[..filled])))
}

/// Resolves once shutdown has begun (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_h2(server: &Server, stream: Stream, prefix: Bytes, peer: Peer, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(ConnState::new());
    let io = ParkIo { stream, prefix, state: state.clone() };
    let service = ConnService { router: server.router.clone(), peer, state };
    let mut connection = Box::pin(server.http2.serve_connection(TokioIo::new(io), service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopping(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(?peer, %error, "connection ended with an error");
    }
}

type H1Connection = http1::Connection<TokioIo<ParkIo>, ConnService>;

/// How one hyper connection over the socket ended.
enum End {
    /// Closed by us between requests: park the socket.
    Park,
    /// Closed by hyper (the client asked to, or shutdown): shut the socket down.
    Closed,
    /// An error or a missed header deadline: drop the socket.
    Dropped,
}

async fn serve_h1(
    server: &Server,
    mut stream: Stream,
    mut prefix: Bytes,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
) {
    // After a park: when the next request head must have arrived (hyper's header timer, which
    // it starts when the previous response is done, does not survive the park).
    let mut deadline = None;
    loop {
        let due;
        (stream, prefix, due) = {
            let state = Arc::new(ConnState::new());
            let io = ParkIo { stream, prefix, state: state.clone() };
            let service = ConnService { router: server.router.clone(), peer, state: state.clone() };
            // Boxed, so a parked connection's task does not keep room for hyper's state.
            let mut connection = Box::new(server.http1.serve_connection(TokioIo::new(io), service));
            // Boxed too: the driver's timers are not kept while parked.
            let driven = Box::pin(drive(&mut connection, &state, server.park_after, deadline, &mut shutdown)).await;
            match driven {
                End::Park => {}
                End::Closed => {
                    // Polled as a future again, hyper flushes what it still buffers (the end of a
                    // closing response to a slow reader) before it shuts the socket down.
                    let _ = (&mut *connection).await;
                    return;
                }
                End::Dropped => return,
            }
            // Everything of this hyper connection is dropped at the end of this block: only the
            // socket and the bytes of a next request head it had read (copied out of hyper's read
            // buffer) are kept while parked.
            let parts = connection.into_parts();
            let io = parts.io.into_inner();
            let prefix = match (parts.read_buf.is_empty(), io.prefix.is_empty()) {
                (true, true) => Bytes::new(),
                _ => Bytes::from([&parts.read_buf[..], &io.prefix[..]].concat()),
            };
            (io.stream, prefix, state.idle_since() + server.header_read_timeout)
        };
        deadline = Some(due);
        tracing::trace!(?peer, buffered = prefix.len(), "idle connection parked");
        if !prefix.is_empty() && prefix.windows(4).any(|w| w == b"\r\n\r\n") {
            // A whole request head is already here: serve it without waiting for more bytes.
            continue;
        }
        let _parked = Parked::new(&server.parked);
        let readable = tokio::select! {
            ready = stream.readable() => ready.is_ok(),
            () = tokio::time::sleep_until(due) => false,
            () = stopping(&mut shutdown) => false,
        };
        if !readable {
            return;
        }
    }
}

/// Counts a connection as parked while it lives.
struct Parked<'a>(&'a Gauge);

impl Parked<'_> {
    fn new(gauge: &Gauge) -> Parked<'_> {
        gauge.inc();
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs one hyper connection until it ends, parking it once it has been idle long enough.
async fn drive(
    connection: &mut H1Connection,
    state: &ConnState,
    park_after: Duration,
    deadline: Option<Instant>,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let park_check = tokio::time::sleep(park_after);
    let head_deadline = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
    tokio::pin!(park_check, head_deadline);
    // Parking was asked for but hyper was not between requests after all (see below).
    let mut refused = false;
    let mut stopped = false;
    loop {
        tokio::select! {
            // The connection first: every timer branch below sees hyper's state after it has
            // handled whatever woke it.
            biased;
            done = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => return match done {
                // hyper closed the connection itself: the client asked to, or shutdown.
                Ok(()) => End::Closed,
                Err(error) => {
                    tracing::debug!(%error, "connection ended with an error");
                    End::Dropped
                }
            },
            () = stopping(shutdown), if !stopped => {
                stopped = true;
                Pin::new(&mut *connection).graceful_shutdown();
            }
            () = &mut head_deadline, if deadline.is_some() && state.calls() == 0 => return End::Dropped,
            () = &mut park_check, if !refused && !stopped => match state.parkable(park_after) {
                Ok(()) => {
                    Pin::new(&mut *connection).graceful_shutdown();
                    // Between requests, hyper closes at once. If it does not, it was in the middle
                    // of something after all: it now closes once that is done (keep-alive is off),
                    // and the connection is closed then, not parked.
                    match std::future::poll_fn(|cx| Poll::Ready(connection.poll_without_shutdown(cx))).await {
                        Poll::Ready(Ok(())) => return End::Park,
                        Poll::Ready(Err(error)) => {
                            tracing::debug!(%error, "connection ended with an error");
                            return End::Dropped;
                        }
                        Poll::Pending => {
                            tracing::debug!("a connection that looked idle was busy; it closes after this exchange");
                            refused = true;
                        }
                    }
                }
                Err(next) => park_check.as_mut().reset(next),
            },
        }
    }
}

/// What the service, the request and response bodies and the socket wrapper of one hyper
/// connection tell its driver.
struct ConnState {
    started: Instant,
    /// Requests handed to the service.
    calls: AtomicU64,
    /// Holds on requests not finished yet (see `Hold`).
    in_flight: AtomicUsize,
    /// When a hold was last released, in ms since `started`.
    idle_at_ms: AtomicU64,
    /// A request body was dropped before its end since the last request began.
    unclean: AtomicBool,
    /// The last write to the socket could not complete: hyper may still hold bytes to send.
    write_blocked: AtomicBool,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            started: Instant::now(),
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_at_ms: AtomicU64::new(0),
            unclean: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.started + Duration::from_millis(self.idle_at_ms.load(Ordering::Relaxed))
    }

    /// `Ok` when hyper is between requests and has been for `after`, else when to look again.
    fn parkable(&self, after: Duration) -> Result<(), Instant> {
        let now = Instant::now();
        let busy = self.calls() == 0
            || self.in_flight.load(Ordering::Acquire) > 0
            || self.unclean.load(Ordering::Acquire)
            || self.write_blocked.load(Ordering::Relaxed);
        if busy {
            return Err(now + after);
        }
        let due = self.idle_since() + after;
        if due > now { Err(due) } else { Ok(()) }
    }
}

/// One hold on a request in flight: taken by the request body, the service future and then the
/// response body. Released by dropping; the last release marks the connection idle.
struct Hold(Arc<ConnState>);

impl Hold {
    fn new(state: &Arc<ConnState>) -> Hold {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        Hold(state.clone())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let state = &self.0;
        let elapsed = state.started.elapsed().as_millis() as u64;
        state.idle_at_ms.store(elapsed, Ordering::Relaxed);
        state.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// The per-connection service: the router, with the peer's address or credentials attached to
/// every request, and holds on each request until its response body is done.
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: Peer,
    state: Arc<ConnState>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<Incoming>) -> ResponseFuture {
        self.state.unclean.store(false, Ordering::Release);
        self.state.calls.fetch_add(1, Ordering::AcqRel);
        let hold = Hold::new(&self.state);
        let (mut parts, body) = request.into_parts();
        match self.peer {
            Peer::Tcp(addr) => {
                parts.extensions.insert(ConnectInfo(addr));
            }
            Peer::Unix(Some(cred)) => {
                parts.extensions.insert(cred);
            }
            Peer::Unix(None) => {}
        }
        let body = axum::body::Body::new(RequestBody { inner: body, ended: false, hold: Hold::new(&self.state) });
        let response = self.router.clone().oneshot(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|inner| ResponseBody { inner, _hold: hold }))
        })
    }
}

/// The agent's request body, noting whether it was read to its end.
struct RequestBody {
    inner: Incoming,
    ended: bool,
    hold: Hold,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            // hyper may still be reading this body (or will close the connection): not idle.
            self.hold.0.unclean.store(true, Ordering::Release);
        }
    }
}

/// The response body, holding its request in flight until hyper has sent it or dropped it.
struct ResponseBody {
    inner: axum::body::Body,
    _hold: Hold,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket as hyper sees it: bytes read before this hyper connection first, and whether the
/// last write had to wait.
struct ParkIo {
    stream: Stream,
    prefix: Bytes,
    state: Arc<ConnState>,
}

impl ParkIo {
    fn wrote<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.state.write_blocked.store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl AsyncRead for ParkIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ParkIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.wrote(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
