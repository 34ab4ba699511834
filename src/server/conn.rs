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
//! `header_read_timeout` is the deadline for every request head: the first one must arrive whole
//! within it of accept (whatever the protocol, and however few bytes trickle in), and each next
//! one within it of the previous response, parked or not. An HTTP/2 connection with no stream
//! open for that long is closed with GOAWAY, like an idle HTTP/1 one. A head that arrived only in
//! part is answered 408; a head the parser refused is answered by hyper (400, 414, 431). Both are
//! told to the listener's `unparsed` observer, so the audit trail has a record of the attempt.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{App, ConnSettings, Observers, Peer, Stream, Unparsed, closing_response};
use crate::error::ProxyError;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the connections of one listener share.
pub(super) struct Server {
    app: App,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    park_after: Duration,
    parked: Gauge,
    unparsed: Option<Arc<dyn Fn(Unparsed) + Send + Sync>>,
}

impl Server {
    pub(super) fn new(app: App, settings: ConnSettings, observers: Observers) -> Server {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).max_header_list_size(settings.max_header_bytes as u32);
        Server {
            app,
            http1,
            http2,
            header_read_timeout: settings.header_read_timeout,
            park_after: settings.park_idle_after,
            parked: observers.parked,
            unparsed: observers.unparsed,
        }
    }

    /// The end of an HTTP/1 connection that hyper failed. A refused head was answered by hyper
    /// itself (400, 414 or 431, flushed before it returns the error); it is recorded here.
    fn failed(&self, connection: H1Connection, error: hyper::Error, peer: Peer) {
        if error.is_timeout() {
            return self.failed_head(connection, peer);
        }
        if !error.is_parse() || error.is_parse_version_h2() {
            tracing::debug!(?peer, %error, "connection ended with an error");
            return;
        }
        // hyper's kinds, as far as its public API tells them apart (Display names a long URI).
        let refused = if !error.is_parse_too_large() {
            ProxyError::BadRequestHead
        } else if error.to_string().contains("URI") {
            ProxyError::UriTooLong
        } else {
            ProxyError::RequestHeadTooLarge
        };
        tracing::debug!(?peer, %error, "request head refused by the HTTP parser");
        self.report(peer, refused);
    }

    /// A request head that was not whole by its deadline. If any of it had arrived, this was an
    /// attempt: it is answered 408 and recorded. A connection idle between requests just closes.
    fn failed_head(&self, connection: H1Connection, peer: Peer) {
        let parts = connection.into_parts();
        let io = parts.io.into_inner();
        if parts.read_buf.is_empty() && io.prefix.is_empty() {
            tracing::debug!(?peer, "no request within header_read_timeout; closed");
            return;
        }
        let error = ProxyError::RequestHeadTimeout;
        // A last word, not a conversation: what the socket does not take now is not waited for.
        let _ = io.stream.try_write(&closing_response(&error));
        tracing::debug!(?peer, "request head timed out");
        self.report(peer, error);
    }

    fn report(&self, peer: Peer, error: ProxyError) {
        if let Some(unparsed) = &self.unparsed {
            unparsed(Unparsed { peer: peer.to_string(), error });
        }
    }
}

/// Serves one connection, accepted at `accepted`, until it closes or shutdown ends it.
pub(super) async fn run(
    server: Arc<Server>,
    mut stream: Stream,
    peer: Peer,
    accepted: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let first_head_due = accepted + server.header_read_timeout;
    let preface = tokio::select! {
        read = read_preface(&mut stream) => read,
        // Nothing, or only the start of HTTP/2's preface, in time: not yet a request to answer.
        () = tokio::time::sleep_until(first_head_due) => {
            tracing::debug!(?peer, "no request began within header_read_timeout; closed");
            return;
        }
        () = stopping(&mut shutdown) => return,
    };
    match preface {
        Ok((true, prefix)) => serve_h2(&server, stream, prefix, peer, first_head_due, shutdown).await,
        Ok((false, prefix)) if prefix.is_empty() => {} // closed before sending anything
        Ok((false, prefix)) => serve_h1(&server, stream, prefix, peer, first_head_due, shutdown).await,
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

/// Serves an HTTP/2 connection. Until its first request, and whenever no stream is open, it has
/// `header_read_timeout` to begin one; then it is closed with GOAWAY (and dropped if the peer
/// does not let it close within as long again).
async fn serve_h2(
    server: &Server,
    stream: Stream,
    prefix: Bytes,
    peer: Peer,
    first_head_due: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new(true));
    let io = ParkIo { stream, prefix, state: state.clone() };
    let service = ConnService { app: server.app.clone(), peer, state: state.clone() };
    let mut connection = Box::pin(server.http2.serve_connection(TokioIo::new(io), service));
    let idle_check = tokio::time::sleep_until(first_head_due);
    tokio::pin!(idle_check);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => break result,
            () = stopping(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            () = &mut idle_check => {
                if closing {
                    tracing::debug!(?peer, "idle HTTP/2 connection did not close after GOAWAY; dropped");
                    return;
                }
                match state.idle_until(first_head_due, server.header_read_timeout) {
                    Ok(()) => {
                        tracing::debug!(?peer, "HTTP/2 connection idle for header_read_timeout; closing");
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                        idle_check.as_mut().reset(Instant::now() + server.header_read_timeout);
                    }
                    Err(next) => idle_check.as_mut().reset(next),
                }
            }
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
    /// hyper failed: a refused head (answered by hyper), a missed header deadline, an I/O error.
    Failed(hyper::Error),
    /// The first request head was not whole by its deadline.
    HeadTimeout,
}

async fn serve_h1(
    server: &Server,
    mut stream: Stream,
    mut prefix: Bytes,
    peer: Peer,
    first_head_due: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    // When the next request head must have arrived while hyper has not started its own timer:
    // from accept for the first head, and after a park (hyper's header timer, which it starts
    // when the previous response is done, does not survive the park).
    let mut deadline = Some(first_head_due);
    loop {
        let due;
        (stream, prefix, due) = {
            let state = Arc::new(ConnState::new(false));
            let io = ParkIo { stream, prefix, state: state.clone() };
            let service = ConnService { app: server.app.clone(), peer, state: state.clone() };
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
                End::Failed(error) => return server.failed(*connection, error, peer),
                End::HeadTimeout => return server.failed_head(*connection, peer),
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
                Err(error) => End::Failed(error),
            },
            () = stopping(shutdown), if !stopped => {
                stopped = true;
                Pin::new(&mut *connection).graceful_shutdown();
            }
            () = &mut head_deadline, if deadline.is_some() && state.calls() == 0 => return End::HeadTimeout,
            () = &mut park_check, if !refused && !stopped => match state.parkable(park_after) {
                Ok(()) => {
                    Pin::new(&mut *connection).graceful_shutdown();
                    // Between requests, hyper closes at once. If it does not, it was in the middle
                    // of something after all: it now closes once that is done (keep-alive is off),
                    // and the connection is closed then, not parked.
                    match std::future::poll_fn(|cx| Poll::Ready(connection.poll_without_shutdown(cx))).await {
                        Poll::Ready(Ok(())) => return End::Park,
                        Poll::Ready(Err(error)) => return End::Failed(error),
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
    http2: bool,
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
    /// Flushes of the socket that completed.
    flushes: AtomicU64,
    /// Response bodies waiting for the next completed flush (see `ResponseBody`).
    flush_waiters: std::sync::Mutex<Vec<Waker>>,
    flush_awaited: AtomicBool,
    /// The HTTP/2 connection's task (it reads the socket), to have it send what it has queued.
    connection_task: AtomicWaker,
}

impl ConnState {
    fn new(http2: bool) -> ConnState {
        ConnState {
            started: Instant::now(),
            http2,
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_at_ms: AtomicU64::new(0),
            unclean: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            flush_waiters: std::sync::Mutex::new(Vec::new()),
            flush_awaited: AtomicBool::new(false),
            connection_task: AtomicWaker::new(),
        }
    }

    fn flushed(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        if self.flush_awaited.swap(false, Ordering::AcqRel) {
            let waiters = std::mem::take(&mut *self.flush_waiters.lock().unwrap_or_else(|e| e.into_inner()));
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// Has `waker` woken after the next completed flush, and has the connection's task run.
    fn await_flush(&self, waker: &Waker) {
        self.flush_waiters.lock().unwrap_or_else(|e| e.into_inner()).push(waker.clone());
        self.flush_awaited.store(true, Ordering::Release);
        self.connection_task.wake();
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.started + Duration::from_millis(self.idle_at_ms.load(Ordering::Relaxed))
    }

    /// For HTTP/2: `Ok` once no request has begun by `first_due`, or none has been open for
    /// `after` since; else when to look again.
    fn idle_until(&self, first_due: Instant, after: Duration) -> Result<(), Instant> {
        let now = Instant::now();
        let due = if self.calls() == 0 {
            first_due
        } else if self.in_flight.load(Ordering::Acquire) > 0 {
            return Err(now + after);
        } else {
            self.idle_since() + after
        };
        if due > now { Err(due) } else { Ok(()) }
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
    app: App,
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
        let request = http::Request::from_parts(parts, body);
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.respond(request).await;
            Ok(response.map(|inner| ResponseBody { inner, hold, failed: None }))
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
///
/// When the body fails (the upstream broke off), the error is held back until what was handed to
/// hyper is on the socket: on a failed body hyper drops its HTTP/1 write buffer, and HTTP/2 resets
/// the stream, discarding the data still queued for it. Otherwise the agent would not get bytes
/// the audit record counts as sent to it. The wait is bounded by `FLUSH_WAIT`.
struct ResponseBody {
    inner: axum::body::Body,
    hold: Hold,
    failed: Option<Failed>,
}

/// A response body's error, held back (see `ResponseBody`).
struct Failed {
    error: axum::Error,
    /// `ConnState::flushes` when the error came.
    flushes: u64,
    give_up: Pin<Box<tokio::time::Sleep>>,
}

/// The longest a failed response body waits for its bytes to reach the socket.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let state = &this.hold.0;
        if let Some(failed) = &mut this.failed {
            let sent = if state.http2 {
                // Streams are polled on their own tasks: a completed flush of the connection after
                // the error means the data queued before it was written.
                state.flushes.load(Ordering::Acquire) > failed.flushes
            } else {
                // HTTP/1 flushes after polling the body, on the same task: while a write still
                // waits for the socket, the socket's wake-up polls this body again.
                !state.write_blocked.load(Ordering::Relaxed)
            };
            if sent || failed.give_up.as_mut().poll(cx).is_ready() {
                let failed = this.failed.take().expect("checked above");
                return Poll::Ready(Some(Err(failed.error)));
            }
            if state.http2 {
                state.await_flush(cx.waker());
            }
            return Poll::Pending;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                let flushes = state.flushes.load(Ordering::Acquire);
                this.failed = Some(Failed { error, flushes, give_up: Box::pin(tokio::time::sleep(FLUSH_WAIT)) });
                if state.http2 {
                    state.await_flush(cx.waker());
                } else {
                    // Polled again right after hyper's next flush.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.inner.is_end_stream()
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
        if this.state.http2 {
            this.state.connection_task.register(cx.waker());
        }
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
        if let Poll::Ready(Ok(())) = polled {
            this.state.flushed();
        }
        this.wrote(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
