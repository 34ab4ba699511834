//! The one outbound HTTP client: pooled, rustls, never follows redirects, strips hop-by-hop
//! headers, applies connect/read/total timeouts, and streams bodies both ways.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONNECTION, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

use crate::dns::GuardedResolver;
use crate::error::ProxyError;

pub use crate::decode::BoxError;

/// `[forward]`: how the outbound client connects, times out, pools, and bounds bodies.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub total_timeout: Duration,
    pub max_request_body_bytes: u64,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Request bodies up to this size are kept, so a call refused for a stale credential can be
    /// replayed once with the new one (0: never replay).
    pub retry_body_bytes: u64,
}
pub type OutboundBody = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy ones.
/// Names, not strings: removing by a string parses and hashes it again on every request.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpsConnector<PinnedConnector>, OutboundBody>,
    read_timeout: Duration,
    total_timeout: Duration,
}

impl Forwarder {
    pub fn new(config: &ForwardConfig) -> Forwarder {
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
            .expect("the aws-lc-rs provider supports the default protocol versions");
        Forwarder::build(config, tls, None)
    }

    /// The client of a route with its own `connect_to` or `upstream_ca_file`: every connection
    /// goes to `connect_to` (when set), and the upstream's certificate is verified against the
    /// bundled web roots, the system's roots and `extra_roots`.
    pub fn for_route(
        config: &ForwardConfig,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
        connect_to: Option<std::net::SocketAddr>,
    ) -> Forwarder {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if !extra_roots.is_empty() {
            roots.add_parsable_certificates(system_roots().iter().cloned());
            roots.add_parsable_certificates(extra_roots.iter().cloned());
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Forwarder::build(config, hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls), connect_to)
    }

    fn build(
        config: &ForwardConfig,
        tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
        connect_to: Option<std::net::SocketAddr>,
    ) -> Forwarder {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver::new());
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let https = tls
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(PinnedConnector { inner: http, connect_to });
        // hyper's client never follows redirects: a 3xx goes back to the agent as it came.
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(https);
        Forwarder { client, read_timeout: config.read_timeout, total_timeout: config.total_timeout }
    }

    /// Sends the request and waits for the response head; the body is returned as a stream
    /// that enforces the read (idle) and total timeouts.
    pub async fn send(&self, request: Request<OutboundBody>, route: &str) -> Result<Response<TimedBody>, ProxyError> {
        let deadline = Instant::now() + self.total_timeout;
        let head_deadline = deadline.min(Instant::now() + self.read_timeout);
        let mut response = match tokio::time::timeout_at(head_deadline, self.client.request(request)).await {
            Err(_) => return Err(ProxyError::UpstreamTimeout { route: route.to_string() }),
            Ok(Err(error)) => return Err(classify(&error, route)),
            Ok(Ok(response)) => response,
        };
        // Transfer codings beyond chunked stay on the body; the header goes with the hop-by-hop ones.
        crate::decode::note_transfer_codings(&mut response);
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = TimedBody::new(body, self.read_timeout, deadline);
        Ok(Response::from_parts(parts, body))
    }
}

impl Forwarder {
    /// POSTs a JSON notification (anomaly alerts) with the same guarded client; failures are logged.
    pub async fn notify(&self, url: &str, body: &serde_json::Value) {
        let request =
            Request::post(url).header(http::header::CONTENT_TYPE, "application/json").body(UnsyncBoxBody::new(
                http_body_util::Full::new(Bytes::from(body.to_string())).map_err(|never| match never {}),
            ));
        let Ok(request) = request else {
            tracing::warn!("the notify URL is not a valid URI");
            return;
        };
        match tokio::time::timeout(self.read_timeout, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => {}
            Ok(Ok(response)) => {
                tracing::warn!(status = response.status().as_u16(), "the notify webhook refused an alert")
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error::error_chain(&error), "the notify webhook could not be reached")
            }
            Err(_) => tracing::warn!("the notify webhook timed out"),
        }
    }
}

/// The system's trust anchors, read once (a route's `upstream_ca_file` adds to them).
fn system_roots() -> &'static [rustls_pki_types::CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<rustls_pki_types::CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The TCP connector: to the URI's host (resolved by the guarded resolver), or, for a route with
/// `connect_to`, always to that address. The TLS layer above still names and verifies the host.
#[derive(Clone)]
pub struct PinnedConnector {
    inner: HttpConnector<GuardedResolver>,
    connect_to: Option<std::net::SocketAddr>,
}

impl tower_service::Service<http::Uri> for PinnedConnector {
    type Response = <HttpConnector<GuardedResolver> as tower_service::Service<http::Uri>>::Response;
    type Error = <HttpConnector<GuardedResolver> as tower_service::Service<http::Uri>>::Error;
    type Future = <HttpConnector<GuardedResolver> as tower_service::Service<http::Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let uri = match self.connect_to {
            Some(addr) => http::Uri::builder()
                .scheme("http")
                .authority(addr.to_string())
                .path_and_query("/")
                .build()
                .expect("a socket address is a valid authority"),
            None => uri,
        };
        self.inner.call(uri)
    }
}

fn classify(error: &hyper_util::client::legacy::Error, route: &str) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(limit) = e.downcast_ref::<BodyLimitExceeded>() {
            return ProxyError::BodyTooLarge { limit: limit.0 };
        }
        if e.is::<AgentBodyFailed>() {
            // The agent's side, not the upstream's: malformed chunked framing or a body cut short.
            return ProxyError::BadBody;
        }
        source = e.source();
    }
    tracing::warn!(route, error = %crate::error::error_chain(error), "upstream request failed");
    ProxyError::UpstreamUnavailable { route: route.to_string() }
}

/// The agent's body went over `forward.max_request_body_bytes`.
#[derive(Debug)]
pub struct BodyLimitExceeded(pub u64);

impl std::fmt::Display for BodyLimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body exceeds {} bytes", self.0)
    }
}

impl std::error::Error for BodyLimitExceeded {}

/// The agent's request body could not be read (malformed chunked framing, or it broke off).
#[derive(Debug)]
pub struct AgentBodyFailed(BoxError);

impl std::fmt::Display for AgentBodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the agent's request body failed: {}", self.0)
    }
}

impl std::error::Error for AgentBodyFailed {}

/// A request body with nothing in it.
pub fn empty_body() -> OutboundBody {
    UnsyncBoxBody::new(http_body_util::Empty::new().map_err(|never| match never {}))
}

/// Streams the agent's body to the upstream, failing once it passes `limit` bytes.
pub fn limited_body<B>(body: B, limit: u64) -> OutboundBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    UnsyncBoxBody::new(LimitedBody { inner: body, remaining: limit, limit })
}

struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.remaining {
                    return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded(this.limit)))));
                }
                this.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(AgentBodyFailed(e.into()))))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body with an idle timeout between frames and an overall deadline.
/// The timer is armed only while the body waits: a body that is ready (a small answer that came
/// with its head) costs no timer at all.
pub struct TimedBody {
    inner: Incoming,
    read_timeout: Duration,
    deadline: Instant,
    /// When the last frame arrived (or the head).
    progress: Instant,
    idle: Option<Pin<Box<Sleep>>>,
}

/// Why a response body stopped early.
#[derive(Debug)]
pub struct UpstreamStalled;

impl std::fmt::Display for UpstreamStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream response body timed out")
    }
}

impl std::error::Error for UpstreamStalled {}

impl TimedBody {
    fn new(inner: Incoming, read_timeout: Duration, deadline: Instant) -> TimedBody {
        TimedBody { inner, read_timeout, deadline, progress: Instant::now(), idle: None }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(result) => {
                this.progress = Instant::now();
                Poll::Ready(result.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
            }
            Poll::Pending => {
                let due = this.deadline.min(this.progress + this.read_timeout);
                let idle = match &mut this.idle {
                    Some(idle) => {
                        if idle.deadline() != due {
                            idle.as_mut().reset(due);
                        }
                        idle
                    }
                    none => none.insert(Box::pin(tokio::time::sleep_until(due))),
                };
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(UpstreamStalled)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Bearer kw_x"),
            ("content-type", "application/json"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type"]);
    }
}
