//! The forward-proxy listener (`HTTPS_PROXY`): one more way into the same pipeline.
//!
//! An agent sends `CONNECT host:port` with `Proxy-Authorization: Basic id:key`. keyward
//! identifies it (407 otherwise), then: for a host a route names, answers 200, terminates TLS
//! with a leaf its CA signs for that host (`ca`), and hands every request inside the tunnel,
//! HTTP/1.1 or HTTP/2, to `pipeline::handle` with a `Via` extension; the pipeline routes by host,
//! checks that the request names the tunnel's host (421 otherwise), and identifies the caller by
//! the CONNECT's key. For a host in `tunnel_hosts` it opens a blind tunnel (`tunnel`). Anything
//! else is refused (403) and audited. Absolute-form `http://` requests are accepted on this
//! listener only, identified the same way, and sent upstream over TLS.

mod ca;
mod idle;
mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::header::PROXY_AUTHORIZATION;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

pub use crate::arrival::Via;
pub use ca::{CertAuthority, IssuedLeaf};

use crate::audit::AuditEvent;
use crate::error::ProxyError;
use crate::identity;
use crate::policy::hosts::address_kind;
use crate::policy::{AddressKind, canonical_host};
use crate::state::{AppState, Runtime};

/// What the forward listener's connections share.
struct Proxy {
    state: Arc<AppState>,
    ca: Arc<CertAuthority>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    /// How long an idle tunnel's calls in flight may take to finish before it is dropped.
    drain_limit: Duration,
}

/// Serves the forward-proxy listener until `shutdown`, then lets open tunnels finish within the
/// grace period.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    ca: Arc<CertAuthority>,
    settings: super::ConnSettings,
    open: prometheus_client::metrics::gauge::Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    let drain_limit = state.runtime.load().config.forward.total_timeout + settings.header_read_timeout;
    let proxy = Arc::new(Proxy {
        state,
        ca,
        header_read_timeout: settings.header_read_timeout,
        max_header_bytes: settings.max_header_bytes,
        drain_limit,
    });
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusal = super::closing_response(&ProxyError::TooManyConnections { max: settings.max_connections });
    let mut connections = JoinSet::new();
    while let Some((stream, peer)) = super::next_connection(&mut connections, &mut shutdown, || listener.accept()).await
    {
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(&refusal);
            continue;
        };
        let open = super::Open::new(slot, &open);
        let connection = connection(proxy.clone(), stream, peer, shutdown.clone());
        connections.spawn(async move {
            connection.await;
            drop(open);
        });
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.shutdown_grace, drained).await.is_err() {
        tracing::warn!(open = connections.len(), "forward proxy: grace period ended; closing open tunnels");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// What a CONNECT that was answered 200 goes on to.
enum Accepted {
    Intercept { upgrade: OnUpgrade, via: Via, tls: Arc<rustls::ServerConfig> },
    Tunnel { upgrade: OnUpgrade, tunnel: tunnel::Tunnel },
}

/// One agent connection: HTTP/1.1 proxy requests until a CONNECT is accepted, then the tunnel.
async fn connection(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr, mut shutdown: watch::Receiver<bool>) {
    let accepted: Arc<Mutex<Option<Accepted>>> = Arc::default();
    let service = {
        let (proxy, accepted) = (proxy.clone(), accepted.clone());
        service_fn(move |request: Request<Incoming>| {
            let (proxy, accepted) = (proxy.clone(), accepted.clone());
            async move { Ok::<_, Infallible>(proxy.on_request(request, peer, &accepted).await) }
        })
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(proxy.header_read_timeout)
        .max_buf_size(proxy.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopping(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "forward proxy: connection ended with an error");
        // hyper answered a head its parser refused (400, 431) itself; the attempt is recorded.
        if error.is_parse() && !error.is_parse_version_h2() {
            let refused =
                if error.is_parse_too_large() { ProxyError::RequestHeadTooLarge } else { ProxyError::BadRequestHead };
            proxy.refused(peer, String::new(), None, Refusal::from(refused));
        }
    }
    let next = accepted.lock().expect("accepted CONNECT").take();
    match next {
        Some(Accepted::Intercept { upgrade, via, tls }) => proxy.intercept(upgrade, via, tls, peer, shutdown).await,
        Some(Accepted::Tunnel { upgrade, tunnel }) => tunnel.run(upgrade, &proxy.state, shutdown).await,
        None => {}
    }
}

/// A refusal before any tunnel: the error the agent gets, and what the audit event records.
struct Refusal {
    error: Box<ProxyError>,
    agent: Option<String>,
    key_fingerprint: Option<String>,
}

impl From<ProxyError> for Refusal {
    fn from(error: ProxyError) -> Refusal {
        Refusal { error: Box::new(error), agent: None, key_fingerprint: None }
    }
}

/// The agent a CONNECT or plain-HTTP request was identified as, with its key.
struct Caller {
    agent: String,
    key: Zeroizing<String>,
}

impl Proxy {
    async fn on_request(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
        accepted: &Mutex<Option<Accepted>>,
    ) -> Response {
        let runtime = self.state.runtime.load_full();
        let method = request.method().clone();
        let target = target_of(&request);
        let outcome = if method == Method::CONNECT {
            match self.connect(&runtime, &mut request, peer).await {
                Ok(next) => {
                    *accepted.lock().expect("accepted CONNECT") = Some(next);
                    return Response::new(Body::empty());
                }
                Err(refusal) => refusal,
            }
        } else if request.uri().scheme() == Some(&http::uri::Scheme::HTTP) && request.uri().authority().is_some() {
            match self.plain(&runtime, &request) {
                Ok(via) => {
                    request.extensions_mut().insert(via);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    return crate::pipeline::handle(State(self.state.clone()), request.map(Body::new)).await;
                }
                Err(refusal) => refusal,
            }
        } else {
            Refusal::from(ProxyError::BadTarget(
                "this is keyward's forward-proxy listener: send CONNECT host:443 (HTTPS_PROXY), or an absolute http:// URL",
            ))
        };
        let response = outcome.error.clone().into_response();
        self.refused(peer, method.to_string(), target, outcome);
        response
    }

    /// Records a `forward.refused` event.
    fn refused(&self, peer: SocketAddr, method: String, target: Option<(String, u16)>, outcome: Refusal) {
        let (host, port) = target.unwrap_or_default();
        self.state.audit_event(AuditEvent::ForwardRefused {
            agent_id: outcome.agent,
            ip: peer.ip().to_string(),
            method,
            host,
            port,
            status: outcome.error.status().as_u16(),
            error_code: outcome.error.code(),
            key_fingerprint: outcome.key_fingerprint,
            via: "forward",
        });
    }

    /// A CONNECT: who is asking, then what its target is.
    async fn connect(
        &self,
        runtime: &Runtime,
        request: &mut Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Accepted, Refusal> {
        let (host, port) = target_of(request).ok_or(ProxyError::BadTarget("CONNECT needs a host:port target"))?;
        let caller = self.authenticate(runtime, request.headers(), &host)?;
        let refused = |reason| Refusal {
            error: Box::new(ProxyError::ConnectRefused { host: host.clone(), port, reason }),
            agent: Some(caller.agent.clone()),
            key_fingerprint: None,
        };
        if let Some(index) = runtime.hosts.find(&host) {
            if !runtime.config.routes[index].ports.contains(&port) {
                return Err(refused("the route for this host does not allow this port"));
            }
            let tls = self.ca.server_config(&host).map_err(|error| {
                tracing::error!(%host, %error, "forward proxy: cannot sign a leaf certificate");
                Refusal::from(ProxyError::Internal("cannot sign a certificate for this host"))
            })?;
            let via = Via { host, port, upstream_port: port, key: caller.key, plain: false };
            return Ok(Accepted::Intercept { upgrade: hyper::upgrade::on(request), via, tls });
        }
        let tunnelled = runtime
            .config
            .forward_proxy
            .as_ref()
            .is_some_and(|f| f.tunnel_hosts.iter().any(|(h, p)| *h == host && *p == port));
        if tunnelled {
            let connect_timeout = runtime.config.forward.connect_timeout;
            let tunnel = tunnel::Tunnel::open(&host, port, connect_timeout, caller.agent.clone(), peer).await.map_err(
                |error| Refusal { error: Box::new(error), agent: Some(caller.agent.clone()), key_fingerprint: None },
            )?;
            return Ok(Accepted::Tunnel { upgrade: hyper::upgrade::on(request), tunnel });
        }
        Err(refused(match address_kind(&host) {
            AddressKind::Name => "no route names this host (and it is not in forward_proxy.tunnel_hosts)",
            AddressKind::Metadata => "link-local and cloud metadata addresses are refused unless a route names them",
            AddressKind::Loopback => "loopback addresses are refused unless a route names them",
            AddressKind::Private => "private addresses are refused unless a route names them",
            AddressKind::Public => "IP-literal targets are refused unless a route names that address",
        }))
    }

    /// A plain-HTTP absolute-form request: identified like a CONNECT, for a host a route names.
    fn plain(&self, runtime: &Runtime, request: &Request<Incoming>) -> Result<Via, Refusal> {
        let (host, port) = target_of(request).ok_or(ProxyError::BadTarget("the URL has no host"))?;
        let caller = self.authenticate(runtime, request.headers(), &host)?;
        if runtime.hosts.find(&host).is_none() {
            return Err(Refusal {
                error: Box::new(ProxyError::ConnectRefused { host, port, reason: "no route names this host" }),
                agent: Some(caller.agent),
                key_fingerprint: None,
            });
        }
        let upstream_port = if port == 80 { 443 } else { port };
        Ok(Via { host, port, upstream_port, key: caller.key, plain: true })
    }

    /// `Proxy-Authorization: Basic base64(agent-id:agent-key)`: the key must name an agent (or a
    /// delegated key) and the id, when given, must be that agent's. Anything else is 407.
    fn authenticate(&self, runtime: &Runtime, headers: &http::HeaderMap, host: &str) -> Result<Caller, Refusal> {
        let required = |reason| Refusal::from(ProxyError::ProxyAuthRequired { reason });
        let (id, key) = basic_credentials(headers).map_err(required)?;
        let state = &self.state;
        match crate::principal::identify(&state.delegations, &state.revoked_agents, runtime, &key, host, None) {
            Ok(caller) if id.is_empty() || id == caller.id() => Ok(Caller { agent: caller.id().to_string(), key }),
            Ok(caller) => Err(Refusal {
                agent: Some(caller.id().to_string()),
                ..required("the user name is not the id of the agent the key belongs to")
            }),
            Err(ProxyError::UnknownAgentKey { .. }) => Err(Refusal {
                key_fingerprint: Some(identity::fingerprint(&key)),
                ..required("the key is not recognised")
            }),
            Err(ProxyError::PeerMismatch { agent }) => Err(Refusal {
                agent: Some(agent),
                ..required("this agent may only connect over keyward's Unix socket")
            }),
            Err(_) => Err(required("the key is revoked, expired or withdrawn")),
        }
    }

    /// Terminates TLS for the CONNECT host and serves what comes through the tunnel, HTTP/1.1 or
    /// HTTP/2 (ALPN), each request through the pipeline.
    async fn intercept(
        &self,
        upgrade: OnUpgrade,
        via: Via,
        tls: Arc<rustls::ServerConfig>,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Ok(upgraded) = upgrade.await else { return };
        let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(TokioIo::new(upgraded));
        let stream = match tokio::time::timeout(self.header_read_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                // Most often the agent does not trust keyward's CA; nothing was sent.
                tracing::warn!(%peer, host = %via.host, %error,
                    "forward proxy: TLS handshake with the agent failed (does it trust keyward's CA? see `keyward agent-env`)");
                return self.handshake_failed(peer, &via, error.to_string());
            }
            Err(_) => {
                return self.handshake_failed(peer, &via, "no TLS handshake within header_read_timeout_ms".into());
            }
        };
        let state = self.state.clone();
        let via_host = via.host.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(via.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            let state = state.clone();
            async move { Ok::<_, Infallible>(crate::pipeline::handle(State(state), request.map(Body::new)).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.max_header_bytes.max(8192))
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new()).max_header_list_size(self.max_header_bytes as u32);
        // Idle for header_read_timeout (no byte either way, as between keep-alive requests on
        // the reverse listener): no new request is taken and the tunnel closes once any call in
        // flight is done, which the upstream's total timeout bounds.
        let activity = idle::Activity::new();
        let conn = builder.serve_connection(TokioIo::new(idle::Tracked::new(stream, activity.clone())), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stopping(&mut shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
            () = activity.idle_for(self.header_read_timeout) => {
                tracing::debug!(%peer, host = %via_host, "forward proxy: tunnel idle for header_read_timeout; closing");
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(self.drain_limit, conn.as_mut()).await {
                    Ok(result) => result,
                    Err(_) => Ok(()),
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "forward proxy: tunnel ended with an error");
        }
    }
}

/// Resolves once shutdown has begun (or its sender is gone).
pub(super) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

impl Proxy {
    fn handshake_failed(&self, peer: SocketAddr, via: &Via, reason: String) {
        let runtime = self.state.runtime.load();
        // The agent is named by the key it opened the tunnel with.
        let agent = runtime.agents.identify(via.key(), &via.host).map(|a| a.id.clone()).unwrap_or_default();
        self.state.audit_event(AuditEvent::ForwardHandshakeFailed {
            agent_id: agent,
            ip: peer.ip().to_string(),
            host: via.host.clone(),
            port: via.port,
            reason,
            via: "forward",
        });
    }
}

/// The host (canonical) and port a proxy request names: a CONNECT's authority (port 443 when
/// left out), or an absolute URL's (port 80 by default).
fn target_of<B>(request: &Request<B>) -> Option<(String, u16)> {
    let authority = request.uri().authority()?;
    let host = canonical_host(authority.host()).ok()?;
    let default = if request.method() == Method::CONNECT { 443 } else { 80 };
    Some((host, authority.port_u16().unwrap_or(default)))
}

/// The agent id and key from `Proxy-Authorization: Basic`, or why there are none.
fn basic_credentials(headers: &http::HeaderMap) -> Result<(String, Zeroizing<String>), &'static str> {
    let mut values = headers.get_all(PROXY_AUTHORIZATION).iter();
    let value = values.next().ok_or("no Proxy-Authorization header was sent")?;
    if values.next().is_some() {
        return Err("Proxy-Authorization was sent more than once");
    }
    let value = value.to_str().map_err(|_| "Proxy-Authorization is not visible ASCII")?;
    let (scheme, encoded) = value.split_once(' ').ok_or("expected 'Proxy-Authorization: Basic <base64>'")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("only the Basic scheme is accepted");
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| "the Basic credentials are not base64")?,
    );
    let text = std::str::from_utf8(&decoded).map_err(|_| "the Basic credentials are not UTF-8")?;
    let (id, key) = text.split_once(':').ok_or("expected agent-id:agent-key")?;
    if key.is_empty() {
        return Err("the key is empty");
    }
    Ok((id.to_string(), Zeroizing::new(key.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(plain: bool) -> Via {
        Via {
            host: "api.github.com".into(),
            port: if plain { 80 } else { 443 },
            upstream_port: 443,
            key: Zeroizing::new("kw_x".into()),
            plain,
        }
    }

    fn request(method: &str, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for host in hosts {
            builder = builder.header(http::header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_inner_host_must_be_the_tunnels() {
        let tunnel = via(false);
        let code = |r: Request<()>| tunnel.check_request(&r).map_err(|e| e.code());
        assert_eq!(code(request("GET", "/user", &["api.github.com"])), Ok(()));
        assert_eq!(code(request("GET", "/user", &["API.GitHub.com:443"])), Ok(()));
        assert_eq!(code(request("GET", "/user", &["evil.example"])), Err("host_mismatch"));
        assert_eq!(code(request("GET", "/user", &["api.github.com:8443"])), Err("host_mismatch"));
        assert_eq!(code(request("GET", "/user", &[])), Err("host_mismatch"));
        assert_eq!(code(request("GET", "/user", &["api.github.com", "evil.example"])), Err("host_mismatch"));
        assert_eq!(
            code(request("GET", "https://api.github.com/user", &["api.github.com"])),
            Err("invalid_request_target")
        );
        assert_eq!(code(request("CONNECT", "api.github.com:443", &["api.github.com"])), Err("invalid_request_target"));
        assert_eq!(code(request("TRACE", "/", &["api.github.com"])), Err("invalid_request_target"));
        // HTTP/2 carries the host as :authority.
        let mut h2 = request("GET", "https://evil.example/user", &[]);
        *h2.version_mut() = http::Version::HTTP_2;
        assert_eq!(code(h2), Err("host_mismatch"));
        let mut h2 = request("GET", "https://api.github.com/user", &[]);
        *h2.version_mut() = http::Version::HTTP_2;
        assert_eq!(code(h2), Ok(()));
        // A plain-HTTP request names its host in the URL.
        let plain = via(true);
        assert!(plain.check_request(&request("GET", "http://api.github.com/user", &["api.github.com"])).is_ok());
        assert_eq!(plain.upstream().to_string(), "https://api.github.com");
    }

    #[test]
    fn basic_credentials_cases() {
        let headers = |value: &str| {
            let mut map = http::HeaderMap::new();
            map.insert(PROXY_AUTHORIZATION, value.parse().unwrap());
            map
        };
        let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let (id, key) = basic_credentials(&headers(&format!("Basic {}", encode("agent-1:kw_abc:d")))).unwrap();
        assert_eq!((id.as_str(), key.as_str()), ("agent-1", "kw_abc:d"));
        assert_eq!(basic_credentials(&http::HeaderMap::new()).err(), Some("no Proxy-Authorization header was sent"));
        assert_eq!(basic_credentials(&headers("Bearer kw_abc")).err(), Some("only the Basic scheme is accepted"));
        assert_eq!(basic_credentials(&headers("Basic !!")).err(), Some("the Basic credentials are not base64"));
        assert_eq!(
            basic_credentials(&headers(&format!("Basic {}", encode("agent-1")))).err(),
            Some("expected agent-id:agent-key")
        );
        assert_eq!(
            basic_credentials(&headers(&format!("Basic {}", encode("agent-1:")))).err(),
            Some("the key is empty")
        );
    }
}
