//! The one error type of the request path, and the one place that maps it to a status and JSON body.
//!
//! Messages are built from configuration names only (agent ids, route names, secret names),
//! never from secret values, agent keys or upstream error text.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

/// Where a failure came from (pingora's idiom): it decides the status family and the audit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The agent's request was refused: 4xx.
    Downstream,
    /// The upstream or the secret store failed: 5xx.
    Upstream,
    /// keyward itself failed: 500/503.
    Internal,
}

/// What the policy refused, for a 403 message that names what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Route,
    Method,
    Path,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The request target is absolute-form or authority-form (`CONNECT`), or otherwise not a plain path.
    BadTarget(&'static str),
    /// The path contains traversal, encoded separators, or bytes we refuse to forward.
    BadPath(&'static str),
    /// No route prefix matches the path.
    NoRoute,
    MissingAgentKey {
        route: String,
        expected: String,
    },
    MalformedAgentKey {
        route: String,
        reason: &'static str,
    },
    UnknownAgentKey {
        route: String,
    },
    /// The key belongs to an agent bound to a Unix-socket uid, and the caller is not that uid.
    PeerMismatch {
        agent: String,
    },
    Forbidden {
        agent: String,
        role: String,
        route: String,
        method: String,
        path: String,
        missing: Missing,
    },
    /// A child key's own grant allows the call, but its root agent's role (as configured now)
    /// no longer does: 403 like `Forbidden`, naming the root.
    ParentForbidden {
        agent: String,
        parent: String,
        route: String,
        method: String,
        path: String,
    },
    BodyTooLarge {
        limit: u64,
    },
    SecretStoreUnavailable {
        secret: String,
        source: String,
    },
    SecretNotFound {
        secret: String,
        source: String,
    },
    /// A credential kind that signs (`aws-sigv4`) has no usable keys: the source's value is not
    /// an AWS key pair, or the AWS credential chain found none. `reason` never holds a value.
    SigningUnavailable {
        secret: String,
        reason: &'static str,
    },
    /// A token could not be minted from the secret (its kind is not `static`): the mint endpoint
    /// is down or refused. `status` is the mint endpoint's; `reason` is built from names only.
    MintFailed {
        secret: String,
        kind: &'static str,
        status: Option<u16>,
        reason: String,
        /// Until the next mint may be tried (the backoff).
        retry_after: std::time::Duration,
    },
    UpstreamUnavailable {
        route: String,
    },
    UpstreamTimeout {
        route: String,
    },
    /// The upstream compressed its answer in a way the scrubber cannot see through.
    UpstreamEncoding {
        route: String,
    },
    /// The audit trail cannot record the release, so the credential is withheld.
    AuditUnavailable,
    AgentRevoked {
        agent: String,
    },
    Quarantined {
        agent: String,
    },
    Throttled {
        agent: String,
        route: String,
        limit: u32,
        retry_after: std::time::Duration,
        window: std::time::Duration,
    },
    TooManyInFlight {
        agent: String,
        max: u32,
    },
    /// The call's reservation does not fit in what is left of a budget.
    BudgetExceeded {
        budget: String,
        agent: String,
        /// `tokens` or `cost`.
        limit: &'static str,
        window: String,
        retry_after: std::time::Duration,
    },
    /// A cost budget applies, the model has no price, and `usage.unknown_model = "refuse"`.
    /// (The model is the agent's text, so the message does not repeat it.)
    ModelNotPriced {
        budget: String,
    },
    /// The shared limiter (Redis) is down and `redis_failure = "fail_closed"`.
    LimiterUnavailable,
    DelegationRevoked {
        id: String,
    },
    DelegationExpired {
        id: String,
    },
    DelegationExhausted {
        id: String,
    },
    /// The agent's key is in the request's path or query, where it would reach the upstream.
    AgentKeyInUrl {
        route: String,
    },
    /// A `_method` parameter (query or form body) that frameworks use to change the method.
    MethodOverride {
        route: String,
    },
    /// The child key's root agent no longer holds the authority it was minted under.
    DelegationWithdrawn {
        id: String,
        reason: String,
    },
    /// The agent's request body broke off before keyward had it all, or was not valid chunked
    /// encoding.
    BadBody,
    /// The HTTP parser refused the request head (duplicate `Content-Length`, obs-fold, a bad
    /// token, ...): hyper answers it itself, this names it for the audit record.
    BadRequestHead,
    /// The request head is larger than `server.max_header_bytes` (or has too many headers).
    RequestHeadTooLarge,
    /// The request target alone is too long for the parser.
    UriTooLong,
    /// The request head did not arrive whole within `server.header_read_timeout_ms`.
    RequestHeadTimeout,
    /// The listener already holds `server.max_connections` connections.
    TooManyConnections {
        max: usize,
    },
    /// Forward proxy: no `Proxy-Authorization`, or one that names no agent (407).
    ProxyAuthRequired {
        reason: &'static str,
    },
    /// Forward proxy: a CONNECT (or plain-HTTP request) to a host or port no route names, or to
    /// an address keyward does not connect to for agents.
    ConnectRefused {
        host: String,
        port: u16,
        reason: &'static str,
    },
    /// Forward proxy: the request inside the tunnel names another host than the CONNECT did.
    HostMismatch {
        host: String,
        connect_host: String,
    },
    /// Forward proxy: a protocol upgrade (WebSocket) inside an intercepted tunnel.
    UpgradeUnsupported {
        route: String,
    },
    /// Forward proxy: the host of a blind tunnel could not be reached.
    TunnelUnreachable {
        host: String,
        port: u16,
    },
    Internal(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        self.describe().0
    }

    pub fn code(&self) -> &'static str {
        self.describe().1
    }

    pub fn origin(&self) -> Origin {
        self.describe().2
    }

    /// The single exhaustive mapping: a new variant does not compile until it is placed here.
    fn describe(&self) -> (StatusCode, &'static str, Origin) {
        use Origin::*;
        match self {
            ProxyError::BadTarget(_) => (StatusCode::BAD_REQUEST, "invalid_request_target", Downstream),
            ProxyError::BadPath(_) => (StatusCode::BAD_REQUEST, "invalid_path", Downstream),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "route_not_found", Downstream),
            ProxyError::MissingAgentKey { .. } => (StatusCode::UNAUTHORIZED, "missing_agent_key", Downstream),
            ProxyError::MalformedAgentKey { .. } => (StatusCode::UNAUTHORIZED, "malformed_agent_key", Downstream),
            ProxyError::UnknownAgentKey { .. } => (StatusCode::UNAUTHORIZED, "unknown_agent_key", Downstream),
            ProxyError::PeerMismatch { .. } => (StatusCode::UNAUTHORIZED, "peer_mismatch", Downstream),
            ProxyError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", Downstream),
            ProxyError::ParentForbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", Downstream),
            ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", Downstream),
            ProxyError::SecretStoreUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "secret_store_unavailable", Upstream)
            }
            ProxyError::SecretNotFound { .. } => (StatusCode::SERVICE_UNAVAILABLE, "secret_not_found", Upstream),
            ProxyError::SigningUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "signing_credentials_unavailable", Upstream)
            }
            ProxyError::MintFailed { .. } => (StatusCode::SERVICE_UNAVAILABLE, "credential_mint_failed", Upstream),
            ProxyError::UpstreamUnavailable { .. } => (StatusCode::BAD_GATEWAY, "upstream_unavailable", Upstream),
            ProxyError::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", Upstream),
            ProxyError::UpstreamEncoding { .. } => (StatusCode::BAD_GATEWAY, "upstream_encoding_unsupported", Upstream),
            ProxyError::AuditUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", Internal),
            ProxyError::AgentRevoked { .. } => (StatusCode::UNAUTHORIZED, "agent_revoked", Downstream),
            ProxyError::Quarantined { .. } => (StatusCode::FORBIDDEN, "agent_quarantined", Downstream),
            ProxyError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Downstream),
            ProxyError::TooManyInFlight { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_in_flight", Downstream),
            ProxyError::BudgetExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "budget_exceeded", Downstream),
            ProxyError::ModelNotPriced { .. } => (StatusCode::FORBIDDEN, "model_not_priced", Downstream),
            ProxyError::LimiterUnavailable => (StatusCode::TOO_MANY_REQUESTS, "rate_limiter_unavailable", Downstream),
            ProxyError::DelegationRevoked { .. } => (StatusCode::UNAUTHORIZED, "delegation_revoked", Downstream),
            ProxyError::DelegationExpired { .. } => (StatusCode::UNAUTHORIZED, "delegation_expired", Downstream),
            ProxyError::DelegationExhausted { .. } => (StatusCode::UNAUTHORIZED, "delegation_exhausted", Downstream),
            ProxyError::AgentKeyInUrl { .. } => (StatusCode::BAD_REQUEST, "agent_key_in_url", Downstream),
            ProxyError::MethodOverride { .. } => (StatusCode::BAD_REQUEST, "method_override_refused", Downstream),
            ProxyError::DelegationWithdrawn { .. } => (StatusCode::UNAUTHORIZED, "delegation_withdrawn", Downstream),
            ProxyError::BadBody => (StatusCode::BAD_REQUEST, "invalid_body", Downstream),
            ProxyError::BadRequestHead => (StatusCode::BAD_REQUEST, "invalid_request_head", Downstream),
            ProxyError::RequestHeadTooLarge => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_head_too_large", Downstream)
            }
            ProxyError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long", Downstream),
            ProxyError::RequestHeadTimeout => (StatusCode::REQUEST_TIMEOUT, "request_head_timeout", Downstream),
            ProxyError::TooManyConnections { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections", Internal)
            }
            ProxyError::ProxyAuthRequired { .. } => {
                (StatusCode::PROXY_AUTHENTICATION_REQUIRED, "proxy_auth_required", Downstream)
            }
            ProxyError::ConnectRefused { .. } => (StatusCode::FORBIDDEN, "connect_refused", Downstream),
            ProxyError::HostMismatch { .. } => (StatusCode::MISDIRECTED_REQUEST, "host_mismatch", Downstream),
            ProxyError::UpgradeUnsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "upgrade_unsupported", Downstream),
            ProxyError::TunnelUnreachable { .. } => (StatusCode::BAD_GATEWAY, "tunnel_unreachable", Upstream),
            ProxyError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", Internal),
        }
    }

    /// A message that helps the agent fix its call. Built from config names only.
    pub fn message(&self) -> String {
        match self {
            ProxyError::BadTarget(why) => format!("request target refused: {why}"),
            ProxyError::BadPath(why) => format!("path refused: {why}"),
            ProxyError::NoRoute => "no route matches this path; check the base URL prefix".to_string(),
            ProxyError::MissingAgentKey { route, expected } => {
                format!("route '{route}' needs an agent key in {expected}")
            }
            ProxyError::MalformedAgentKey { route, reason } => {
                format!("agent key for route '{route}' is malformed: {reason}")
            }
            ProxyError::UnknownAgentKey { route } => format!("agent key not recognised on route '{route}'"),
            ProxyError::PeerMismatch { agent } => {
                format!("agent '{agent}' must connect through keyward's Unix socket as its configured uid (peer_uid)")
            }
            ProxyError::Forbidden { agent, role, route, method, path, missing } => {
                let what = match missing {
                    Missing::Route => format!("has no grant on route '{route}'"),
                    Missing::Method => format!("is not granted method {method} on route '{route}'"),
                    Missing::Path => format!("is not granted {method} {path} on route '{route}'"),
                };
                format!("agent '{agent}' (role '{role}') {what}")
            }
            ProxyError::ParentForbidden { agent, parent, route, method, path } => format!(
                "delegated key '{agent}' may not call {method} {path} on route '{route}' any more: its parent agent '{parent}' no longer holds that grant"
            ),
            ProxyError::BodyTooLarge { limit } => format!("request body exceeds the limit of {limit} bytes"),
            ProxyError::SecretStoreUnavailable { secret, source } => {
                format!("credential '{secret}' is unavailable: secret source '{source}' cannot be reached")
            }
            ProxyError::SecretNotFound { secret, source } => {
                format!("credential '{secret}' has no value in secret source '{source}'")
            }
            ProxyError::SigningUnavailable { secret, reason } => {
                format!("credential '{secret}' cannot sign the request: {reason}")
            }
            ProxyError::MintFailed { secret, kind, status, reason, .. } => {
                let answered = status.map(|s| format!("; the mint endpoint answered {s}")).unwrap_or_default();
                format!("credential '{secret}' ({kind}) could not be minted: {reason}{answered}")
            }
            ProxyError::UpstreamUnavailable { route } => format!("upstream of route '{route}' could not be reached"),
            ProxyError::UpstreamTimeout { route } => format!("upstream of route '{route}' timed out"),
            ProxyError::UpstreamEncoding { route } => format!(
                "upstream of route '{route}' compressed its answer with an encoding keyward cannot inspect for credentials"
            ),
            ProxyError::AgentRevoked { agent } => format!("agent '{agent}' has been revoked"),
            ProxyError::Quarantined { agent } => {
                format!("agent '{agent}' is quarantined after unusual activity; an admin can release it")
            }
            ProxyError::Throttled { agent, route, limit, retry_after, window } => format!(
                "agent '{agent}' is over its quota of {limit} per {} s on route '{route}'; retry in {} s",
                window.as_secs(),
                retry_after.as_secs_f64().ceil() as u64
            ),
            ProxyError::LimiterUnavailable => {
                "the shared rate limiter cannot be reached and limits fail closed; retry shortly".to_string()
            }
            ProxyError::TooManyInFlight { agent, max } => {
                format!("agent '{agent}' already has {max} requests in flight")
            }
            ProxyError::BudgetExceeded { budget, agent, limit, window, retry_after } => format!(
                "budget '{budget}' has no room left for this call of agent '{agent}' ({limit} per {window}); it resets in {} s",
                retry_after.as_secs_f64().ceil() as u64
            ),
            ProxyError::ModelNotPriced { budget } => format!(
                "budget '{budget}' limits cost, and the requested model has no price in [usage.prices] (usage.unknown_model = \"refuse\")"
            ),
            ProxyError::DelegationRevoked { id } => format!("delegated key '{id}' has been revoked"),
            ProxyError::DelegationExpired { id } => format!("delegated key '{id}' has expired"),
            ProxyError::DelegationExhausted { id } => {
                format!("delegated key '{id}' has used all its requests (its own and those of the keys it delegated)")
            }
            ProxyError::DelegationWithdrawn { id, reason } => format!("delegated key '{id}' no longer works: {reason}"),
            ProxyError::AuditUnavailable => {
                "the audit trail cannot be written, so no credential is released; try again later".to_string()
            }
            ProxyError::AgentKeyInUrl { route } => format!(
                "the agent key is in the URL on route '{route}'; send it only in the agent key header, it is never forwarded"
            ),
            ProxyError::MethodOverride { route } => format!(
                "a '_method' parameter on route '{route}' would change the method upstream; send the real HTTP method instead"
            ),
            ProxyError::BadBody => {
                "the request body could not be read to its end, or its chunked encoding is malformed".to_string()
            }
            ProxyError::BadRequestHead => "the request head is not valid HTTP/1.1".to_string(),
            ProxyError::RequestHeadTooLarge => "the request head is too large".to_string(),
            ProxyError::UriTooLong => "the request target is too long".to_string(),
            ProxyError::RequestHeadTimeout => "the request head did not arrive in time".to_string(),
            ProxyError::TooManyConnections { max } => {
                format!("keyward already holds its limit of {max} connections on this listener; retry shortly")
            }
            ProxyError::ProxyAuthRequired { reason } => format!(
                "keyward's forward proxy needs 'Proxy-Authorization: Basic' with agent-id:agent-key (HTTPS_PROXY=http://ID:KEY@host:port): {reason}"
            ),
            ProxyError::ConnectRefused { host, port, reason } => format!("CONNECT to {host}:{port} refused: {reason}"),
            ProxyError::HostMismatch { host, connect_host } => format!(
                "the request names host '{host}' but the tunnel was opened to '{connect_host}'; open a tunnel per host"
            ),
            ProxyError::UpgradeUnsupported { route } => format!(
                "protocol upgrades (WebSocket) are not supported inside an intercepted tunnel (route '{route}'); use plain HTTP requests"
            ),
            ProxyError::TunnelUnreachable { host, port } => format!("tunnel host {host}:{port} could not be reached"),
            ProxyError::Internal(what) => format!("internal error: {what}"),
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ProxyError {}

/// An error and its sources as one line, `outer: inner: innermost`, for logs (never `Debug`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The JSON error body every keyward-generated error uses.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message } })
}

/// An error answer of the API handlers (admin, delegation) that is not a `ProxyError`: `status`
/// with the same JSON body.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(error_body(code, message))).into_response()
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(error_body(self.code(), &self.message()))).into_response();
        let retry = |secs: u64| http::HeaderValue::from(secs.max(1));
        match &self {
            ProxyError::Throttled { limit, retry_after, window, .. } => {
                let headers = response.headers_mut();
                let reset = retry_after.as_secs_f64().ceil() as u64;
                headers.insert(http::header::RETRY_AFTER, retry(reset));
                headers.insert("ratelimit-limit", http::HeaderValue::from(*limit));
                headers.insert("ratelimit-remaining", http::HeaderValue::from(0u32));
                headers.insert("ratelimit-reset", retry(reset));
                let policy = format!("{limit};w={}", window.as_secs());
                if let Ok(value) = http::HeaderValue::from_str(&policy) {
                    headers.insert("ratelimit-policy", value);
                }
            }
            ProxyError::BudgetExceeded { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, retry(retry_after.as_secs_f64().ceil() as u64));
            }
            ProxyError::TooManyInFlight { .. } | ProxyError::LimiterUnavailable => {
                response.headers_mut().insert(http::header::RETRY_AFTER, retry(1));
            }
            ProxyError::MintFailed { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, retry(retry_after.as_secs_f64().ceil() as u64));
            }
            _ => {}
        }
        if self.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            response
                .headers_mut()
                .insert(http::header::PROXY_AUTHENTICATE, http::HeaderValue::from_static("Basic realm=\"keyward\""));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"keyward\""));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_message_names_agent_route_and_missing_part() {
        let e = ProxyError::Forbidden {
            agent: "a1".into(),
            role: "worker".into(),
            route: "openai".into(),
            method: "DELETE".into(),
            path: "/v1/files".into(),
            missing: Missing::Method,
        };
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.message(), "agent 'a1' (role 'worker') is not granted method DELETE on route 'openai'");
    }

    #[test]
    fn origins_map_to_status_families() {
        assert_eq!(ProxyError::NoRoute.origin(), Origin::Downstream);
        assert!(ProxyError::UpstreamTimeout { route: "r".into() }.status().is_server_error());
        assert_eq!(ProxyError::Internal("x").origin(), Origin::Internal);
    }
}
