//! Blind tunnels to `forward_proxy.tunnel_hosts`: no interception and no credential, only the
//! bytes each way, recorded in one `forward.tunnel` audit event when the tunnel ends (also
//! when shutdown cuts it). keyward connects only to public addresses here: a tunnel host that
//! resolves to loopback, private, link-local or metadata addresses is refused.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::error::ProxyError;
use crate::policy::{AddressKind, hosts::ip_kind};
use crate::state::AppState;

/// A tunnel whose upstream side is connected, waiting for the agent's side.
pub(super) struct Tunnel {
    upstream: TcpStream,
    record: TunnelRecord,
}

/// The tunnel's audit event, written once when it is dropped.
struct TunnelRecord {
    state: Option<Arc<AppState>>,
    agent: String,
    peer: SocketAddr,
    host: String,
    port: u16,
    connected_to: SocketAddr,
    from_agent: u64,
    to_agent: u64,
    started: Instant,
    outcome: &'static str,
}

impl Tunnel {
    /// Resolves `host` and connects to its first public address within `connect_timeout`.
    pub(super) async fn open(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        agent: String,
        peer: SocketAddr,
    ) -> Result<Tunnel, ProxyError> {
        let refused = |reason| ProxyError::ConnectRefused { host: host.to_string(), port, reason };
        let unreachable = || ProxyError::TunnelUnreachable { host: host.to_string(), port };
        // The lookup is bounded like a connect (the resolver may never answer).
        let addresses: Vec<SocketAddr> =
            match tokio::time::timeout(connect_timeout, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(found)) => found.collect(),
                _ => return Err(unreachable()),
            };
        let public: Vec<SocketAddr> =
            addresses.iter().copied().filter(|a| ip_kind(a.ip()) == AddressKind::Public).collect();
        if public.is_empty() {
            return Err(if addresses.is_empty() {
                unreachable()
            } else {
                refused(
                    "a tunnel host must resolve to public addresses, not loopback, private, link-local or metadata ones",
                )
            });
        }
        for address in public {
            if let Ok(Ok(upstream)) = tokio::time::timeout(connect_timeout, TcpStream::connect(address)).await {
                let _ = upstream.set_nodelay(true);
                let record = TunnelRecord {
                    state: None,
                    agent,
                    peer,
                    host: host.to_string(),
                    port,
                    connected_to: address,
                    from_agent: 0,
                    to_agent: 0,
                    started: Instant::now(),
                    outcome: "closed",
                };
                return Ok(Tunnel { upstream, record });
            }
        }
        Err(unreachable())
    }

    /// Copies bytes both ways until either side ends (or shutdown aborts the task).
    pub(super) async fn run(self, upgrade: OnUpgrade, state: &Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
        let Tunnel { upstream, mut record } = self;
        record.state = Some(state.clone());
        record.started = Instant::now();
        let Ok(upgraded) = upgrade.await else {
            record.outcome = "error";
            return;
        };
        let relayed = relay(&mut TokioIo::new(upgraded), upstream, &mut shutdown).await;
        (record.outcome, record.from_agent, record.to_agent) = relayed;
    }
}

/// Relays bytes between the agent and the upstream until either ends, or shutdown begins:
/// how it ended, and the bytes from and to the agent.
async fn relay<A>(agent: &mut A, upstream: TcpStream, shutdown: &mut watch::Receiver<bool>) -> (&'static str, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = Counted { inner: upstream, read: 0, written: 0 };
    let outcome = tokio::select! {
        copied = tokio::io::copy_bidirectional(agent, &mut upstream) => if copied.is_ok() { "closed" } else { "error" },
        () = super::stopping(shutdown) => "shutdown",
    };
    (outcome, upstream.written, upstream.read)
}

impl Drop for TunnelRecord {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else { return };
        state.audit_event(AuditEvent::ForwardTunnel {
            agent_id: std::mem::take(&mut self.agent),
            ip: self.peer.ip().to_string(),
            host: std::mem::take(&mut self.host),
            port: self.port,
            connected_to: self.connected_to.to_string(),
            bytes_from_agent: self.from_agent,
            bytes_to_agent: self.to_agent,
            duration_ms: self.started.elapsed().as_millis() as u64,
            outcome: self.outcome,
            via: "forward",
        });
    }
}

/// The upstream socket, counting the bytes read from it (to the agent) and written to it.
struct Counted {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, bytes);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_relay_counts_the_bytes_each_way() {
        // An upstream that answers "pong:" and echoes what it got, then closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            socket.read_exact(&mut buf).await.unwrap();
            socket.write_all(b"pong:").await.unwrap();
            socket.write_all(&buf).await.unwrap();
        });
        let upstream = TcpStream::connect(address).await.unwrap();
        let (mut agent, mut relay_side) = tokio::io::duplex(1024);
        let (_stop, mut shutdown) = watch::channel(false);
        let relaying = tokio::spawn(async move { relay(&mut relay_side, upstream, &mut shutdown).await });
        agent.write_all(b"hello").await.unwrap();
        agent.shutdown().await.unwrap();
        let mut answer = Vec::new();
        agent.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong:hello");
        assert_eq!(relaying.await.unwrap(), ("closed", 5, 10));
    }

    #[tokio::test]
    async fn a_tunnel_host_that_resolves_to_loopback_is_refused() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let refused = Tunnel::open("localhost", 443, Duration::from_secs(1), "a".into(), peer).await.err().unwrap();
        assert_eq!(refused.code(), "connect_refused");
        let refused = Tunnel::open("10.0.0.1", 443, Duration::from_secs(1), "a".into(), peer).await.err().unwrap();
        assert_eq!(refused.code(), "connect_refused");
    }
}
