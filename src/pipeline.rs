//! The request flow, in the one place that knows its order:
//!
//! target check → route → identify (agent or delegated key) → authorize → URL check (no agent
//! key, no `_method`) → admit → resolve → release (audit) → strip what the agent presented and
//! inject → forward → scrub → stream back,
//! with the audit guard created first and ended exactly once on every path.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, HOST};
use http::{HeaderValue, Request, StatusCode, Uri, Version};

use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::audit::{AuditGuard, AuditedBody};
use crate::config::AnomalyAction;
use crate::config::RouteConfig;
use crate::decode::{self, Coding, DecodedBody};
use crate::error::ProxyError;
use crate::forward::{self, TimedBody, limited_body, strip_hop_by_hop};
use crate::identity;
use crate::inject;
use crate::limit::Decision;
use crate::metrics::AnomalyLabels;
use crate::outbound::{self, OVERRIDE_HEADERS};
use crate::policy;
use crate::principal::{self, delegation as delegations};
use crate::scrub::{ScrubbedBody, Scrubber};
use crate::secrets::{Rejection, Resolved};
use crate::server::PeerCred;
use crate::state::{AppState, Runtime};

/// The response header that carries the audit record's request id.
pub const REQUEST_ID_HEADER: &str = "x-keyward-request-id";

pub async fn handle(State(state): State<Arc<AppState>>, request: Request<Body>) -> Response {
    let runtime = state.runtime.load_full();
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let mut audit = AuditGuard::begin(
        state.audit.clone(),
        state.metrics.clone(),
        runtime.secrets.scrubber_cell(),
        runtime.audit_metadata.clone(),
        peer,
        request.method(),
        request.uri().path(),
    );
    audit.access_log(runtime.config.server.access_log);
    let request_id = HeaderValue::from_str(audit.request_id()).expect("hex is a valid header value");
    let mut response = match proxy(&state, &runtime, &mut audit, request).await {
        Ok((upstream, coding, scrub)) => {
            let (mut parts, body) = upstream.into_parts();
            // Only the status code and the (scrubbed) headers of the upstream's head go on: the
            // reason phrase (kept by hyper as an extension) and anything else in the extensions
            // would be written to the agent unscrubbed, so the agent gets the canonical phrase.
            parts.extensions = http::Extensions::new();
            let scrubber = if scrub { runtime.secrets.scrubber() } else { Arc::new(Scrubber::empty()) };
            scrubber.scrub_headers(&mut parts.headers);
            let body = match coding {
                Coding::Decode { layers, content } => {
                    // Decoded here, so the agent gets the plain body and its true length.
                    if content {
                        parts.headers.remove(CONTENT_ENCODING);
                    }
                    parts.headers.remove(CONTENT_LENGTH);
                    agent_body(DecodedBody::new(body, &layers), scrubber, audit)
                }
                _ => agent_body(body, scrubber, audit),
            };
            Response::from_parts(parts, body)
        }
        Err(error) => {
            let response = error.clone().into_response();
            audit.fail(&error);
            response
        }
    };
    response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    response
}

/// The body the agent receives: scrubbed (unless there is nothing to scrub for), then audited.
fn agent_body<B>(body: B, scrubber: Arc<Scrubber>, audit: AuditGuard) -> Body
where
    B: http_body::Body<Data = bytes::Bytes, Error = forward::BoxError> + Send + Unpin + 'static,
{
    if scrubber.is_empty() {
        Body::new(AuditedBody::new(body, audit))
    } else {
        Body::new(AuditedBody::new(ScrubbedBody::new(body, scrubber), audit))
    }
}

async fn proxy(
    state: &AppState,
    runtime: &Runtime,
    audit: &mut AuditGuard,
    request: Request<Body>,
) -> Result<(http::Response<TimedBody>, Coding, bool), ProxyError> {
    policy::check_target(request.method(), request.version(), request.uri())?;
    let path = policy::check_path(request.uri().path())?;
    let matched = runtime.routes.find(&path).ok_or(ProxyError::NoRoute)?;
    let route = &runtime.config.routes[matched.route];
    audit.route(&route.name, &matched.rest);

    // On the Unix socket the kernel names the caller's uid; an agent may be bound to it.
    let peer_uid = request.extensions().get::<PeerCred>().map(|cred| cred.uid);
    if let Some(uid) = peer_uid {
        audit.unix_peer(uid);
    }
    let key = identity::extract_key(&route.agent_key, request.headers(), &route.name);
    let by_uid = peer_uid.and_then(|uid| principal::identify_peer(&state.revoked_agents, runtime, uid));
    // The key the agent presented, kept to make sure it goes nowhere near the upstream.
    let (caller, presented_key) = match (key, by_uid) {
        (Err(ProxyError::MissingAgentKey { .. }), Some(by_uid)) => (by_uid?, None),
        (key, _) => {
            let key = key?;
            let caller =
                principal::identify(&state.delegations, &state.revoked_agents, runtime, key, &route.name, peer_uid)
                    .inspect_err(|e| {
                        if matches!(e, ProxyError::UnknownAgentKey { .. }) {
                            audit.key_fingerprint(identity::fingerprint(key));
                        }
                    })?;
            (caller, Some(Zeroizing::new(key.to_string())))
        }
    };
    let presented_key = presented_key.as_deref().map(String::as_str);
    audit.agent(caller.id());
    if let Some(delegation) = caller.delegation() {
        audit.delegation(&delegation.chain, delegation.label.as_deref());
    }

    // Limits, quarantine and detectors belong to the root agent: delegating never escapes them.
    let now = SystemTime::now();
    let root = caller.root();
    let throttled = state.limits.gate(root, now)?;
    let limits_role = caller.limits_role();
    let detectors = &limits_role.anomaly;
    let grant = caller.authorize(&route.name, request.method(), &matched.rest).inspect_err(|_| {
        report_anomalies(state, root, state.limits.observe_failure(root, detectors, now));
    })?;
    audit.credential(&grant.secret);
    // Refused before limits and the secret store: the request line would carry the agent's key
    // upstream, or a `_method` that changes what was authorized.
    outbound::check_url(request.uri(), presented_key, &route.name)?;

    // Limits run before the secret store is touched: a throttled call costs it nothing.
    if let Some(quota) = &grant.quota {
        state.limits.check_quota(root, &route.name, quota, throttled).await?;
    }
    if let Some(max) = limits_role.max_in_flight {
        audit.hold(state.limits.enter(root, max)?);
    }
    if let Some(delegation) = caller.delegation() {
        // Counted only for calls the child key may make, exactly, however many race.
        delegations::admit(&state.delegations, state.limits.shared.as_deref(), delegation).await?;
    }
    report_anomalies(state, root, state.limits.observe_call(root, detectors, &route.name, &grant.secret, now));

    let limit = runtime.config.forward.max_request_body_bytes;
    if declared_length(&request).is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let raw_rest = matched.raw_rest.to_string();
    let request = refuse_form_method_override(request, limit, &route.name).await?;

    let secret = runtime.secrets.resolve(&grant.secret).await?;
    audit.secret(&secret.source, secret.version.as_deref(), secret.fallback_from.as_deref());

    // A small body is kept, so a call refused for a stale credential can be sent once more.
    let (request, replay) = keep_for_replay(request, runtime.config.forward.retry_body_bytes, limit).await?;
    let outbound = outbound_request(request, route, &raw_rest, &secret, presented_key, limit)?;
    // No credential goes onto the network without a durable record of its release.
    audit.release().await?;
    let mut response = send(state, &caller, route, outbound).await?;
    if is_refusal(response.status()) {
        // The article's automatic invalidation: the refused credential leaves the cache at once.
        let status = response.status().as_u16();
        let next = match runtime.secrets.rejected(&secret, status).await {
            Rejection::Newer(next) => Some(("new_version", next)),
            Rejection::Previous(next) => Some(("grace_previous", next)),
            Rejection::Fallback(next) => Some(("fallback_source", next)),
            Rejection::Nothing => None,
        };
        match (next, replay) {
            (Some((why, next)), Some(replay)) => {
                tracing::info!(route = %route.name, secret = %secret.name, retry = why,
                    "upstream refused the credential; retrying once with another version");
                audit.invalidated(status, secret.version.as_deref(), why);
                audit.secret(&next.source, next.version.as_deref(), next.fallback_from.as_deref());
                let outbound = outbound_request(replay.into_request(), route, &raw_rest, &next, presented_key, limit)?;
                audit.release().await?;
                drop(response);
                response = send(state, &caller, route, outbound).await?;
            }
            (Some(_), None) => audit.invalidated(status, secret.version.as_deref(), "not_replayable"),
            (None, _) => audit.invalidated(status, secret.version.as_deref(), "none"),
        }
    }
    let status = response.status();
    audit.upstream_status(status.as_u16());
    if is_refusal(status) || status.is_server_error() {
        delegations::revoke_on_failure(state, &caller, &format!("the upstream answered {}", status.as_u16())).await;
    }
    if is_refusal(status) {
        report_anomalies(state, root, state.limits.observe_failure(root, detectors, SystemTime::now()));
    }
    let coding = decode::coding(&response);
    if coding == Coding::Unsupported {
        tracing::warn!(route = %route.name, "upstream used a content or transfer coding that cannot be scrubbed; refused");
        return Err(ProxyError::UpstreamEncoding { route: route.name.clone() });
    }
    Ok((response, coding, route.scrub_responses))
}

fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

async fn send(
    state: &AppState,
    caller: &principal::Principal<'_>,
    route: &RouteConfig,
    outbound: Request<forward::OutboundBody>,
) -> Result<http::Response<TimedBody>, ProxyError> {
    let sent = state.forwarder.send(outbound, &route.name).await;
    if sent.is_err() {
        delegations::revoke_on_failure(state, caller, "the upstream could not be reached").await;
    }
    sent
}

/// A request kept whole, to be sent again.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Replay {
    fn into_request(self) -> Request<Body> {
        let mut request = Request::new(Body::from(self.body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Reads up to `limit` bytes of the body before any credential is released, so a small body can
/// be replayed and a malformed one (broken chunked framing) is refused with 400 while nothing has
/// gone out. A body declared larger than `limit` is not read ahead; one that turns out larger
/// streams on after the bytes read (not replayable), still held to `max_body` bytes.
async fn keep_for_replay(
    request: Request<Body>,
    limit: u64,
    max_body: u64,
) -> Result<(Request<Body>, Option<Replay>), ProxyError> {
    use http_body_util::BodyExt;
    if limit == 0 || declared_length(&request).is_some_and(|len| len > limit) {
        return Ok((request, None));
    }
    let (parts, mut body) = request.into_parts();
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers are not forwarded; only data is kept.
        let Ok(data) = frame.map_err(|_| ProxyError::BadBody)?.into_data() else { continue };
        kept.extend_from_slice(&data);
        if kept.len() as u64 > max_body {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
        if kept.len() as u64 > limit {
            // Larger than a replay may keep: what was read goes first, the rest streams after it.
            use futures_util::StreamExt;
            let read = futures_util::stream::once(std::future::ready(Ok(kept.freeze())));
            let body = Body::from_stream(read.chain(body.into_data_stream()));
            return Ok((Request::from_parts(parts, body), None));
        }
    }
    let body = kept.freeze();
    let replay = Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    Ok((Request::from_parts(parts, Body::from(body)), Some(replay)))
}

/// A form-encoded body is read whole (it is bounded by the body limit, and such bodies are small
/// form posts) and refused if it sets `_method`, which Rails, Laravel and Symfony honour as the
/// request's method. Other bodies, multipart uploads included, stream through unread.
async fn refuse_form_method_override(
    request: Request<Body>,
    limit: u64,
    route: &str,
) -> Result<Request<Body>, ProxyError> {
    use http_body_util::BodyExt;
    let is_form = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, limit as usize).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => return Err(ProxyError::BodyTooLarge { limit }),
        Err(_) => return Err(ProxyError::BadBody),
    };
    if outbound::has_method_parameter(&body) {
        return Err(ProxyError::MethodOverride { route: route.to_string() });
    }
    Ok(Request::from_parts(parts, Body::from(body)))
}

/// Audits each detector decision, counts it, and sends it to the notify webhook.
fn report_anomalies(state: &AppState, agent: &str, decisions: Vec<Decision>) {
    for decision in decisions {
        let action = match decision.action {
            AnomalyAction::Alert => "alert",
            AnomalyAction::Throttle => "throttle",
            AnomalyAction::Quarantine => "quarantine",
        };
        state.metrics.anomalies.get_or_create(&AnomalyLabels { detector: decision.finding.detector, action }).inc();
        let event = serde_json::json!({
            "type": format!("anomaly.{}", decision.finding.detector),
            "agentId": agent,
            "action": action,
            "reason": decision.finding.reason,
            "value": decision.finding.value,
            "threshold": decision.finding.threshold,
        });
        state.audit_event(event.clone());
        if decision.action == AnomalyAction::Quarantine {
            // Quarantining a parent revokes every key it delegated, transitively.
            delegations::revoke_tree_of_agent(state, agent, "parent agent quarantined", "anomaly");
        }
        if let Some(url) = state.runtime.load().config.limits.notify.clone() {
            let forwarder = state.forwarder.clone();
            tokio::spawn(async move { forwarder.notify(&url, &event).await });
        }
    }
}

fn declared_length(request: &Request<Body>) -> Option<u64> {
    request.headers().get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The agent's request re-addressed to the route's upstream: every credential the agent
/// presented and hop-by-hop headers removed, Host left for the client to set from the URI, and
/// the credential injected.
fn outbound_request(
    request: Request<Body>,
    route: &RouteConfig,
    raw_rest: &str,
    secret: &Resolved,
    agent_key: Option<&str>,
    body_limit: u64,
) -> Result<Request<forward::OutboundBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    outbound::strip_agent_credentials(headers, route, agent_key);
    // Framing is rebuilt by the client from the body; overrides could change what was authorized.
    for name in [HOST, CONTENT_LENGTH] {
        headers.remove(name);
    }
    for name in OVERRIDE_HEADERS {
        headers.remove(name);
    }
    // Compressed answers could hide an echoed credential from the scrubber.
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let mut query = parts.uri.query().map(str::to_string);
    inject::apply(&route.inject, &secret.value, headers, &mut query)?;

    let mut path_and_query = format!("{}{}", route.upstream.base_path, raw_rest);
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(&query);
    }
    parts.uri = Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::Internal("could not build the upstream URI"))?;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, limited_body(body, body_limit)))
}
