//! The request flow, in the one place that knows its order (`proxy` lists the stages):
//!
//! target check → route (by prefix, or by host on the forward proxy) → identify (agent or
//! delegated key) → authorize → URL check (no agent key, no `_method`) → admit → body check →
//! resolve → release (audit) → strip what the agent presented and inject → forward (one retry of
//! a refused credential) → settle → scrub → stream back, with the audit guard created first and
//! ended exactly once on every path.
//!
//! Each stage is a function that returns its own type. Detector decisions from the limits are
//! acted on in one place, `report_anomalies`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderValue, Request, StatusCode, Uri, Version};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditGuard, AuditedBody};
use crate::config::AnomalyAction;
use crate::config::{GrantConfig, RouteConfig, Upstream};
use crate::credentials::{Rejection, Resolved};
use crate::decode::{self, Coding, DecodedBody};
use crate::error::ProxyError;
use crate::forward::{self, Forwarder, TimedBody};
use crate::identity;
use crate::limit::Detection;
use crate::metrics::AnomalyLabels;
use crate::outbound;
use crate::policy;
use crate::principal::{self, Principal, delegation as delegations};
use crate::scrub::{ScrubbedBody, Scrubber};
use crate::server::PeerCred;
use crate::server::forward::Via;
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
        Ok(Answer { response: upstream, coding, scrub }) => {
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

/// What the pipeline hands back: the upstream's answer, how its body is coded, and whether the
/// route scrubs it.
struct Answer {
    response: http::Response<TimedBody>,
    coding: Coding,
    scrub: bool,
}

/// The stages, in order. Each takes what the ones before it established.
async fn proxy(
    state: &AppState,
    runtime: &Runtime,
    audit: &mut AuditGuard,
    request: Request<Body>,
) -> Result<Answer, ProxyError> {
    let routed = route(runtime, audit, &request)?;
    let identified = identify(state, runtime, audit, routed.route, &request)?;
    let admitted = admit(state, audit, &routed, &identified, request.method(), request.uri()).await?;
    let request = check_body(request, runtime.config.forward.max_request_body_bytes, &routed.route.name).await?;
    let secret = resolve(runtime, audit, admitted.grant).await?;
    let forwarded = forward(state, runtime, audit, &routed, &identified, secret, request).await?;
    settle(state, audit, &identified.caller, &forwarded).await;
    answer(routed.route, forwarded)
}

/// `route`: the route a request is for.
struct Routed<'r> {
    route: &'r RouteConfig,
    /// The route's index in the config, for its outbound client.
    index: usize,
    /// Where the call goes: the route's upstream, or on the forward proxy the host the agent named.
    upstream: Cow<'r, Upstream>,
    /// The path below the route's prefix, decoded, as grants are written.
    rest: String,
    /// The same, as the agent sent it, for the upstream.
    raw_rest: String,
}

/// Refuses what is not a plain request for a path (an absolute or authority form, a bad
/// version, a path that escapes), then finds the route by prefix. On the forward proxy the
/// route comes from the host instead (`route_by_host`).
fn route<'r>(runtime: &'r Runtime, audit: &mut AuditGuard, request: &Request<Body>) -> Result<Routed<'r>, ProxyError> {
    if let Some(via) = request.extensions().get::<Via>() {
        return route_by_host(runtime, audit, request, via);
    }
    policy::check_target(request.method(), request.version(), request.uri())?;
    let path = policy::check_path(request.uri().path())?;
    let matched = runtime.routes.find(&path).ok_or(ProxyError::NoRoute)?;
    let route = &runtime.config.routes[matched.route];
    audit.route(&route.name, &matched.rest);
    Ok(Routed {
        route,
        index: matched.route,
        upstream: Cow::Borrowed(&route.upstream),
        rest: matched.rest.into_owned(),
        raw_rest: matched.raw_rest.to_string(),
    })
}

/// A request that came in on the forward proxy: the host it names must be the tunnel's (421
/// otherwise), the route is the one that names that host, and the whole path is matched against
/// the grants. The call goes to that host, on the port the agent named.
fn route_by_host<'r>(
    runtime: &'r Runtime,
    audit: &mut AuditGuard,
    request: &Request<Body>,
    via: &Via,
) -> Result<Routed<'r>, ProxyError> {
    audit.via_forward(&via.host);
    via.check_request(request)?;
    let index = runtime.hosts.find(&via.host).ok_or_else(|| via.refused("no route names this host"))?;
    let route = &runtime.config.routes[index];
    if !route.ports.contains(&via.upstream_port) {
        return Err(via.refused("the route for this host does not allow this port"));
    }
    let path = policy::check_path(request.uri().path())?;
    audit.route(&route.name, &path.decoded);
    if crate::server::forward::is_upgrade(request) {
        return Err(ProxyError::UpgradeUnsupported { route: route.name.clone() });
    }
    Ok(Routed {
        route,
        index,
        upstream: Cow::Owned(via.upstream()),
        rest: path.decoded.into_owned(),
        raw_rest: path.raw.to_string(),
    })
}

/// `identify`: who is calling.
struct Identified<'r> {
    caller: Principal<'r>,
    /// The key the agent presented, kept to make sure it goes nowhere near the upstream.
    presented_key: Option<Zeroizing<String>>,
}

impl Identified<'_> {
    fn presented_key(&self) -> Option<&str> {
        self.presented_key.as_deref().map(String::as_str)
    }
}

/// The caller by its key, or, with no key on the Unix socket, by the uid the kernel names
/// (an agent may be bound to it).
fn identify<'r>(
    state: &AppState,
    runtime: &'r Runtime,
    audit: &mut AuditGuard,
    route: &RouteConfig,
    request: &Request<Body>,
) -> Result<Identified<'r>, ProxyError> {
    let peer_uid = request.extensions().get::<PeerCred>().map(|cred| cred.uid);
    if let Some(uid) = peer_uid {
        audit.unix_peer(uid);
    }
    // On the forward proxy the key came with the CONNECT (or plain-HTTP request) as
    // `Proxy-Authorization`; the request's own headers are not read for it.
    let key = match request.extensions().get::<Via>() {
        Some(via) => Ok(via.key()),
        None => identity::extract_key(&route.agent_key, request.headers(), &route.name),
    };
    let by_uid = peer_uid.and_then(|uid| principal::identify_peer(&state.revoked_agents, runtime, uid));
    let identified = match (key, by_uid) {
        (Err(ProxyError::MissingAgentKey { .. }), Some(by_uid)) => Identified { caller: by_uid?, presented_key: None },
        (key, _) => {
            let key = key?;
            audit.redact_agent_key(key);
            let caller =
                principal::identify(&state.delegations, &state.revoked_agents, runtime, key, &route.name, peer_uid)
                    .inspect_err(|e| {
                        if matches!(e, ProxyError::UnknownAgentKey { .. }) {
                            audit.key_fingerprint(identity::fingerprint(key));
                        }
                    })?;
            Identified { caller, presented_key: Some(Zeroizing::new(key.to_string())) }
        }
    };
    audit.agent(identified.caller.id());
    if let Some(delegation) = identified.caller.delegation() {
        audit.delegation(&delegation.chain, delegation.label.as_deref());
    }
    Ok(identified)
}

/// `authorize` and `admit`: the grant that allows this call, once the limits let it through.
struct Admitted<'r> {
    grant: &'r GrantConfig,
}

/// Limits, quarantine and detectors belong to the root agent: delegating never escapes them.
/// They run before the secret store is touched, so a refused or throttled call costs it nothing.
async fn admit<'r>(
    state: &AppState,
    audit: &mut AuditGuard,
    routed: &Routed<'_>,
    identified: &'r Identified<'_>,
    method: &http::Method,
    uri: &Uri,
) -> Result<Admitted<'r>, ProxyError> {
    let caller = &identified.caller;
    let route = &routed.route.name;
    let now = SystemTime::now();
    let root = caller.root();
    let throttled = state.limits.gate(root, now)?;
    let limits_role = caller.limits_role();
    let detectors = &limits_role.anomaly;
    let grant = caller.authorize(route, method, &routed.rest).inspect_err(|_| {
        report_anomalies(state, root, state.limits.observe_failure(root, detectors, now));
    })?;
    audit.credential(&grant.secret);
    // The request line would carry the agent's key upstream, or a `_method` that changes what
    // was authorized.
    outbound::check_url(uri, identified.presented_key(), route)?;
    if let Some(quota) = &grant.quota {
        state.limits.check_quota(root, route, quota, throttled).await?;
    }
    if let Some(max) = limits_role.max_in_flight {
        audit.hold(state.limits.enter(root, max)?);
    }
    if let Some(delegation) = caller.delegation() {
        // Counted only for calls the child key may make, exactly, however many race.
        delegations::admit(&state.delegations, state.limits.shared.as_deref(), delegation).await?;
    }
    report_anomalies(state, root, state.limits.observe_call(root, detectors, route, &grant.secret, now));
    Ok(Admitted { grant })
}

/// Refuses a body declared larger than the limit, and a form body that sets `_method`.
async fn check_body(request: Request<Body>, limit: u64, route: &str) -> Result<Request<Body>, ProxyError> {
    if declared_length(&request).is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    refuse_form_method_override(request, limit, route).await
}

/// `resolve`: the credential the grant names, from its store (or the cache).
async fn resolve(runtime: &Runtime, audit: &mut AuditGuard, grant: &GrantConfig) -> Result<Arc<Resolved>, ProxyError> {
    let secret = runtime.secrets.resolve(&grant.secret).await?;
    audit.secret(&secret.source, secret.version.as_deref(), secret.fallback_from.as_deref());
    Ok(secret)
}

/// `forward`: what came of sending the call upstream.
enum Forwarded {
    Answered(http::Response<TimedBody>),
    /// The upstream could not be reached, or timed out.
    Unreachable(ProxyError),
}

/// `release`, `inject` and `forward`: the request goes upstream with the credential, once its
/// release is durably audited; a refused credential gets one retry (`retry_refused`).
async fn forward(
    state: &AppState,
    runtime: &Runtime,
    audit: &mut AuditGuard,
    routed: &Routed<'_>,
    identified: &Identified<'_>,
    secret: Arc<Resolved>,
    request: Request<Body>,
) -> Result<Forwarded, ProxyError> {
    let limit = runtime.config.forward.max_request_body_bytes;
    // A small body is kept, so a call refused for a stale credential can be sent once more.
    let (request, replay) = keep_for_replay(request, runtime.config.forward.retry_body_bytes, limit).await?;
    let client = runtime.client_for(routed.index, &state.forwarder);
    let attempt = Attempt { routed, identified, client, body_limit: limit };
    match attempt.send(audit, request, &secret).await? {
        Forwarded::Answered(response) if is_refusal(response.status()) => {
            retry_refused(runtime, audit, &attempt, &secret, response, replay).await
        }
        forwarded => Ok(forwarded),
    }
}

/// What every send of one call shares: where it goes, who is calling, the client that sends
/// it, and the body limit.
struct Attempt<'a> {
    routed: &'a Routed<'a>,
    identified: &'a Identified<'a>,
    client: &'a Forwarder,
    body_limit: u64,
}

impl Attempt<'_> {
    /// Builds the outbound request with `secret`, records its release (no credential goes onto
    /// the network without a durable record of it), and sends it.
    async fn send(
        &self,
        audit: &mut AuditGuard,
        request: Request<Body>,
        secret: &Resolved,
    ) -> Result<Forwarded, ProxyError> {
        let route = self.routed.route;
        let presented_key = self.identified.presented_key();
        let upstream = &self.routed.upstream;
        let outbound = outbound::build_request(
            request,
            route,
            upstream,
            &self.routed.raw_rest,
            secret,
            presented_key,
            self.body_limit,
        )?;
        audit.release().await?;
        Ok(match self.client.send(outbound, &route.name).await {
            Ok(response) => Forwarded::Answered(response),
            Err(unreachable) => Forwarded::Unreachable(unreachable),
        })
    }
}

/// The upstream refused the credential: it leaves the cache at once (automatic invalidation),
/// and if the store has another version and the body was kept, the call goes once more with
/// it. Otherwise the refusal is the answer.
async fn retry_refused(
    runtime: &Runtime,
    audit: &mut AuditGuard,
    attempt: &Attempt<'_>,
    secret: &Resolved,
    refused: http::Response<TimedBody>,
    replay: Option<Replay>,
) -> Result<Forwarded, ProxyError> {
    let status = refused.status().as_u16();
    let next = match runtime.secrets.rejected(secret, status).await {
        Rejection::Newer(next) => Some(("new_version", next)),
        Rejection::Previous(next) => Some(("grace_previous", next)),
        Rejection::Fallback(next) => Some(("fallback_source", next)),
        Rejection::Nothing => None,
    };
    match (next, replay) {
        (Some((why, next)), Some(replay)) => {
            tracing::info!(route = %attempt.routed.route.name, secret = %secret.name, retry = why,
                "upstream refused the credential; retrying once with another version");
            audit.invalidated(status, secret.version.as_deref(), why);
            audit.secret(&next.source, next.version.as_deref(), next.fallback_from.as_deref());
            drop(refused);
            attempt.send(audit, replay.into_request(), &next).await
        }
        (Some(_), None) => {
            audit.invalidated(status, secret.version.as_deref(), "not_replayable");
            Ok(Forwarded::Answered(refused))
        }
        (None, _) => {
            audit.invalidated(status, secret.version.as_deref(), "none");
            Ok(Forwarded::Answered(refused))
        }
    }
}

/// What came of the call means for the caller, the one place that acts on it: an unreachable
/// upstream, a refusal or a server error revokes a child key minted with `revoke_on_failure`,
/// and a refusal counts against the root agent's detectors.
async fn settle(state: &AppState, audit: &mut AuditGuard, caller: &Principal<'_>, forwarded: &Forwarded) {
    let status = match forwarded {
        Forwarded::Answered(response) => response.status(),
        Forwarded::Unreachable(_) => {
            delegations::revoke_on_failure(state, caller, "the upstream could not be reached").await;
            return;
        }
    };
    audit.upstream_status(status.as_u16());
    if is_refusal(status) || status.is_server_error() {
        delegations::revoke_on_failure(state, caller, &format!("the upstream answered {}", status.as_u16())).await;
    }
    if is_refusal(status) {
        let root = caller.root();
        let detectors = &caller.limits_role().anomaly;
        report_anomalies(state, root, state.limits.observe_failure(root, detectors, SystemTime::now()));
    }
}

/// The answer, unless the upstream could not be reached or its body is coded in a way the
/// scrubber cannot read.
fn answer(route: &RouteConfig, forwarded: Forwarded) -> Result<Answer, ProxyError> {
    let response = match forwarded {
        Forwarded::Answered(response) => response,
        Forwarded::Unreachable(error) => return Err(error),
    };
    let coding = decode::coding(&response);
    if coding == Coding::Unsupported {
        tracing::warn!(route = %route.name, "upstream used a content or transfer coding that cannot be scrubbed; refused");
        return Err(ProxyError::UpstreamEncoding { route: route.name.clone() });
    }
    Ok(Answer { response, coding, scrub: route.scrub_responses })
}

fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
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
/// request's method. Other bodies stream through unread: multipart uploads, JSON, and bodies
/// without a `Content-Type` (which Rack also parses as a form); SECURITY.md lists the gap.
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

/// Acts on the detectors' decisions, the one place that does: each is audited, counted and sent
/// to the notify webhook, and a quarantine revokes what the agent delegated.
fn report_anomalies(state: &AppState, agent: &str, decisions: Vec<Detection>) {
    for decision in decisions {
        let action = match decision.action {
            AnomalyAction::Alert => "alert",
            AnomalyAction::Throttle => "throttle",
            AnomalyAction::Quarantine => "quarantine",
        };
        state.metrics.anomalies.get_or_create(&AnomalyLabels { detector: decision.finding.detector, action }).inc();
        let event = AuditEvent::Anomaly {
            detector: decision.finding.detector,
            agent_id: agent.to_string(),
            action,
            reason: decision.finding.reason,
            value: decision.finding.value,
            threshold: decision.finding.threshold,
        };
        state.audit_event(event.clone());
        if decision.action == AnomalyAction::Quarantine {
            // Quarantining a parent revokes every key it delegated, transitively.
            delegations::revoke_tree_of_agent(state, agent, "parent agent quarantined", "anomaly");
        }
        if let Some(url) = state.runtime.load().config.limits.notify.clone() {
            let forwarder = state.forwarder.clone();
            tokio::spawn(async move { forwarder.notify(&url, &event.to_json()).await });
        }
    }
}

fn declared_length(request: &Request<Body>) -> Option<u64> {
    request.headers().get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
