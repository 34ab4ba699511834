//! Listeners: the accept loop over TCP or a Unix socket (header-read timeout, header size limit,
//! HTTP/1.1 and h2c), peer address or uid injection, and graceful shutdown that lets in-flight
//! requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Connection settings shared by both listeners.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
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

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Box<dyn Io>, Peer)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Box::new(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                // Without credentials the connection can still use agent keys, never peer_uid.
                let cred = stream.peer_cred().ok().map(|c| PeerCred { uid: c.uid(), gid: c.gid(), pid: c.pid() });
                Ok((Box::new(stream), Peer::Unix(cred)))
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then waits up to the grace period
/// for open connections to finish.
pub async fn serve(
    listener: impl Into<Listener>,
    router: Router,
    settings: ConnSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = listener.into();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(settings.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
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
        let service = connection_service(router.clone(), peer);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let watched = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = watched.await {
                tracing::debug!(?peer, error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(open = connections.len(), "shutdown grace period ended; closing the remaining connections");
    }
    // Aborting drops each connection's request futures and bodies, so their audit guards record
    // the disconnect now, before the caller flushes the audit file.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

fn connection_service(
    router: Router,
    peer: Peer,
) -> TowerToHyperService<
    impl tower::Service<
        http::Request<Incoming>,
        Response = axum::response::Response,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone,
> {
    let service = tower::service_fn(move |mut request: http::Request<Incoming>| {
        match peer {
            Peer::Tcp(addr) => {
                request.extensions_mut().insert(ConnectInfo(addr));
            }
            Peer::Unix(Some(cred)) => {
                request.extensions_mut().insert(cred);
            }
            Peer::Unix(None) => {}
        }
        router.clone().oneshot(request.map(axum::body::Body::new))
    });
    TowerToHyperService::new(service)
}
