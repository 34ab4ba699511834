//! How a request arrived, as the listeners tell the pipeline: request extensions for the peer's
//! credentials on the Unix socket and for a request that came in on the forward proxy.

use http::header::{HOST, UPGRADE};
use http::{Method, Request};
use zeroize::Zeroizing;

use crate::error::ProxyError;
use crate::policy::{Upstream, canonical_host};

/// The credentials of a process connected over the Unix socket (SO_PEERCRED), as the kernel
/// reported them at connect time: a request extension, so identity can match `peer_uid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// A request extension: this request came in on the forward proxy. The pipeline routes it by
/// `host` and identifies it by `key`.
#[derive(Clone)]
pub struct Via {
    /// The host the CONNECT (or the plain-HTTP request's URL) named, canonical.
    pub host: String,
    /// The port the agent named (CONNECT port, or the URL's).
    pub port: u16,
    /// The port keyward connects to: the same, except 443 for a plain-HTTP request on port 80
    /// (keyward never sends a credential in cleartext).
    pub upstream_port: u16,
    /// From `Proxy-Authorization`; zeroed when the last copy is dropped.
    pub(crate) key: Zeroizing<String>,
    /// A plain-HTTP absolute-form request rather than a request inside a tunnel.
    pub(crate) plain: bool,
}

impl Via {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where the call goes: `https://host[:port]`.
    pub fn upstream(&self) -> Upstream {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let authority = if self.upstream_port == 443 { host } else { format!("{host}:{}", self.upstream_port) };
        Upstream {
            scheme: http::uri::Scheme::HTTPS,
            authority: authority.parse().expect("a canonical host and a port form an authority"),
            base_path: String::new(),
        }
    }

    pub fn refused(&self, reason: &'static str) -> ProxyError {
        ProxyError::ConnectRefused { host: self.host.clone(), port: self.port, reason }
    }

    /// The request's target and the host it names: no CONNECT or TRACE inside a tunnel, no
    /// absolute form except on a plain-HTTP request, and `Host` (or `:authority`, or the URL's
    /// authority) must name the tunnel's host and port, else 421.
    pub fn check_request<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        let method = request.method();
        if method == Method::CONNECT {
            return Err(ProxyError::BadTarget("CONNECT inside a tunnel is not supported"));
        }
        if method == Method::TRACE || method.as_str() == "TRACK" {
            return Err(ProxyError::BadTarget("TRACE and TRACK would echo credentials and are not supported"));
        }
        let uri = request.uri();
        if !self.plain
            && request.version() < http::Version::HTTP_2
            && (uri.scheme().is_some() || uri.authority().is_some())
        {
            return Err(ProxyError::BadTarget(
                "absolute-form targets are not accepted inside a tunnel; send an origin-form path",
            ));
        }
        // Every name the request gives its host must be the tunnel's: the URL's authority (HTTP/2's
        // `:authority`, a plain-HTTP request's URL) and each `Host` header, so no upstream or
        // framework can be shown another host than the one checked.
        let mismatch =
            |host: &str| ProxyError::HostMismatch { host: host.to_string(), connect_host: self.host.clone() };
        let default_port = if self.plain { 80 } else { 443 };
        let mut named = 0;
        let headers = request.headers().get_all(HOST).iter().map(|h| h.to_str().ok().and_then(|h| h.parse().ok()));
        for authority in uri.authority().cloned().map(Some).into_iter().chain(headers) {
            let Some(authority) = authority else { return Err(mismatch("(not a host)")) };
            let host = canonical_host(authority.host()).unwrap_or_else(|_| authority.host().to_string());
            // A port other than the tunnel's is another origin too.
            if host != self.host || authority.port_u16().unwrap_or(default_port) != self.port {
                return Err(mismatch(authority.as_str()));
            }
            named += 1;
        }
        if named == 0 {
            return Err(mismatch("(none)"));
        }
        Ok(())
    }
}

/// Whether the request asks to switch protocols (WebSocket over HTTP/1.1, or an extended
/// CONNECT over HTTP/2): not supported inside an intercepted tunnel.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.headers().contains_key(UPGRADE) || request.extensions().get::<hyper::ext::Protocol>().is_some()
}
