//! The request flow, in the one place that knows its order (`proxy` lists the stages):
//!
//! target check → route (by prefix, or by host on the forward proxy) → identify (agent or
//! delegated key) → authorize → URL check (no agent key, no `_method`) → admit → body check →
//! meter (reserve budgets) → resolve (and mint, for a minted kind) → release (audit) → strip what
//! the agent presented and inject (or sign) → forward (one retry of a refused credential) →
//! settle → meter usage and scrub → stream back, with the audit guard created first and ended
//! exactly once on every path (it settles the budgets too).
//!
//! Each stage is a function that returns its own type. Detector decisions from the limits are
//! acted on in one place, `report_anomalies`.

mod body;
mod meter;

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

use crate::arrival::{PeerCred, Via};
use crate::audit::{AuditEvent, AuditGuard, AuditedBody};
use crate::config::AnomalyAction;
use crate::config::budget::Mode;
use crate::config::{GrantConfig, RouteConfig, Upstream};
use crate::credentials::sigv4::{self, Signer};
use crate::credentials::{Rejection, Resolved, SecretStore};
use crate::decode::{self, Coding, DecodedBody};
use crate::error::ProxyError;
use crate::forward::{self, Forwarder, TimedBody};
use crate::identity;
use crate::limit::Detection;
use crate::limit::budget::{self, Claim};
use crate::limit::metered::{Call, Handles, MeteredBody, Metering, Reserved};
use crate::metrics::{AnomalyLabels, BudgetLabel, WouldDenyLabels};
use crate::outbound;
use crate::policy;
use crate::principal::{self, Principal, delegation as delegations};
use crate::scrub::{ScrubbedBody, Scrubber};
use crate::state::{AppState, Runtime};
use crate::usage::{self, Api};
use body::{Replay, check_body, keep_for_replay, whole_body};
use meter::{meter, shadow_denied};

/// The response header that carries the audit record's request id.
pub const REQUEST_ID_HEADER: http::HeaderName = http::HeaderName::from_static("x-keyward-request-id");

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
    let head = request.method() == http::Method::HEAD;
    let mut response = match proxy(&state, &runtime, &mut audit, request).await {
        Ok(Answer { response: upstream, coding, scrub, metering }) => {
            let (mut parts, body) = upstream.into_parts();
            // Only the status code and the (scrubbed) headers of the upstream's head go on: the
            // reason phrase (kept by hyper as an extension) and anything else in the extensions
            // would be written to the agent unscrubbed, so the agent gets the canonical phrase.
            parts.extensions = http::Extensions::new();
            let scrubber = if scrub { runtime.secrets.scrubber() } else { Arc::new(Scrubber::empty()) };
            scrubber.scrub_headers(&mut parts.headers);
            if let Some(metering) = &metering {
                // A metered stream may lose the usage chunk keyward asked for, or end early.
                if metering.answered(parts.status, &parts.headers) {
                    parts.headers.remove(CONTENT_LENGTH);
                }
            }
            let body = match coding {
                Coding::Decode { layers, content } => {
                    // Decoded here, so the agent gets the plain body and its true length.
                    if content {
                        parts.headers.remove(CONTENT_ENCODING);
                    }
                    parts.headers.remove(CONTENT_LENGTH);
                    agent_body(MeteredBody::new(DecodedBody::new(body, &layers), metering), scrubber, audit)
                }
                _ => agent_body(MeteredBody::new(body, metering), scrubber, audit),
            };
            Response::from_parts(parts, body)
        }
        Err(error) => {
            let mut response = error.clone().into_response();
            audit.fail(&error);
            if head {
                // A HEAD answer has no body (HTTP/2 would send one as DATA frames): the length
                // of the error it would have carried, as for GET, and nothing else.
                let (mut parts, body) = response.into_parts();
                if let Some(length) = http_body::Body::size_hint(&body).exact() {
                    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
                }
                response = Response::from_parts(parts, Body::empty());
            }
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

/// What the pipeline hands back: the upstream's answer, how its body is coded, whether the
/// route scrubs it, and the meter of a metered call.
struct Answer {
    response: http::Response<TimedBody>,
    coding: Coding,
    scrub: bool,
    metering: Option<Arc<Metering>>,
}

/// The stages, in order. Each takes what the ones before it established.
async fn proxy(
    state: &AppState,
    runtime: &Arc<Runtime>,
    audit: &mut AuditGuard,
    request: Request<Body>,
) -> Result<Answer, ProxyError> {
    let routed = route(runtime, audit, &request)?;
    let identified = identify(state, runtime, audit, routed.route, &request)?;
    let admitted = admit(state, audit, &routed, &identified, request.method(), request.uri()).await?;
    let request = check_body(request, runtime.config.forward.max_request_body_bytes, &routed.route.name).await?;
    let (request, metering) = meter(state, runtime, audit, &routed, &identified, request).await?;
    let secret = resolve(state, runtime, audit, routed.route, admitted.grant).await?;
    let forwarded = forward(state, runtime, audit, &routed, &identified, secret, request).await?;
    settle(state, audit, &identified.caller, &forwarded).await;
    answer(routed.route, forwarded, metering)
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
    if crate::arrival::is_upgrade(request) {
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
    // A role in shadow mode lets its own agents' refused calls through (not its delegated keys').
    let role_shadow = limits_role.mode == Mode::Shadow && caller.delegation().is_none();
    let role_policy = || format!("role:{}", limits_role.name);
    let shadowed = Shadowed { agent: root, presented_key: identified.presented_key() };
    let grant = match caller.authorize(route, method, &routed.rest) {
        Ok(grant) => {
            if grant.mode == Mode::Shadow
                && let Some(refusal) = caller.refusal_without_shadow(route, method, &routed.rest)
            {
                let index = limits_role.grants.iter().position(|g| std::ptr::eq(g, grant)).unwrap_or_default();
                let policy = format!("grant:{}[{index}]", limits_role.name);
                shadow_denied(state, audit, shadowed, "grant", policy, refusal.message());
            }
            grant
        }
        // The call goes with the credential of the role's first grant on the route; with none
        // there is no credential to send, and the refusal stands.
        Err(refusal) if role_shadow && limits_role.grants.iter().any(|g| g.route == *route) => {
            shadow_denied(state, audit, shadowed, "role", role_policy(), refusal.message());
            limits_role.grants.iter().find(|g| g.route == *route).expect("checked above")
        }
        Err(refusal) => {
            report_anomalies(state, root, state.limits.observe_failure(root, detectors, now));
            return Err(refusal);
        }
    };
    audit.credential(&grant.secret);
    // The request line would carry the agent's key upstream, or a `_method` that changes what
    // was authorized.
    outbound::check_url(uri, identified.presented_key(), route)?;
    if let Some(quota) = &grant.quota {
        match state.limits.check_quota(root, route, quota, throttled).await {
            Err(over @ ProxyError::Throttled { .. }) if grant.quota_mode == Mode::Shadow || role_shadow => {
                let kind = if grant.quota_mode == Mode::Shadow { "quota" } else { "role" };
                let policy = if kind == "quota" { format!("quota:{route}") } else { role_policy() };
                shadow_denied(state, audit, shadowed, kind, policy, over.message());
            }
            checked => checked?,
        }
    }
    if let Some(max) = limits_role.max_in_flight {
        match state.limits.enter(root, max) {
            Ok(slot) => audit.hold(slot),
            Err(over) if role_shadow => shadow_denied(state, audit, shadowed, "role", role_policy(), over.message()),
            Err(over) => return Err(over),
        }
    }
    if let Some(delegation) = caller.delegation() {
        // Counted only for calls the child key may make, exactly, however many race.
        delegations::admit(&state.delegations, state.limits.shared.as_deref(), delegation).await?;
    }
    report_anomalies(state, root, state.limits.observe_call(root, detectors, route, &grant.secret, now));
    Ok(Admitted { grant })
}

/// Who a shadow-mode decision is recorded for: the root agent, and the key it presented.
#[derive(Clone, Copy)]
struct Shadowed<'a> {
    agent: &'a str,
    presented_key: Option<&'a str>,
}

/// `resolve`: the credential the grant names, from its store (or the cache); for a secret whose
/// kind mints, the token minted from it for this grant's scope (or the mint cache). An
/// `aws-sigv4` secret whose keys come from the AWS chain has nothing in a store.
async fn resolve(
    state: &AppState,
    runtime: &Runtime,
    audit: &mut AuditGuard,
    route: &RouteConfig,
    grant: &GrantConfig,
) -> Result<Arc<Resolved>, ProxyError> {
    let signer = runtime.signers.get(&grant.secret);
    let secret = match signer.and_then(|signer| signer.chain_resolved()) {
        Some(chain) => chain,
        None => runtime.secrets.resolve(&grant.secret).await?,
    };
    audit.secret(&secret.source, secret.version.as_deref(), secret.fallback_from.as_deref());
    if let Some(signer) = signer {
        audit.signed(sigv4::KIND, &signer.config.service, &signer.config.region);
        return Ok(secret);
    }
    let credential = runtime.minter.credential(&state.forwarder, secret, &route.upstream, &grant.scope).await;
    match &credential {
        Ok(credential) => audit_minted(audit, credential),
        Err(ProxyError::MintFailed { kind, status, .. }) => audit.minted(kind, &grant.scope, None, *status),
        Err(_) => {}
    }
    credential
}

fn audit_minted(audit: &mut AuditGuard, credential: &Resolved) {
    if let Some(minted) = &credential.minted {
        audit.minted(minted.kind, &minted.scope, Some(minted.expires_at), None);
    }
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
    let signer = runtime.signers.get(&secret.name).map(|signer| (signer.as_ref(), &runtime.secrets));
    let attempt = Attempt { routed, identified, client, mint_client: &state.forwarder, body_limit: limit, signer };
    match attempt.send(audit, request, &secret).await? {
        Forwarded::Answered(response) if is_refusal(response.status()) => {
            // Boxed, like signing below: a rare stage's future would make every request's larger.
            Box::pin(retry_refused(runtime, audit, &attempt, &secret, response, replay)).await
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
    /// The shared client a minted token is minted with (never a route's pinned one: a token
    /// endpoint is another host).
    mint_client: &'a Forwarder,
    body_limit: u64,
    /// For an `aws-sigv4` secret: its signer, and the store that holds its keys for the scrubber.
    signer: Option<(&'a Signer, &'a SecretStore)>,
}

impl Attempt<'_> {
    /// Builds the outbound request with `secret`, records its release (no credential goes onto
    /// the network without a durable record of it), and sends it.
    async fn send(
        &self,
        audit: &mut AuditGuard,
        request: Request<Body>,
        secret: &Arc<Resolved>,
    ) -> Result<Forwarded, ProxyError> {
        let route = self.routed.route;
        let presented_key = self.identified.presented_key();
        // A signature covers the body's SHA-256, so a signed request's body is read whole first
        // (bounded by the body limit).
        let (request, whole) = match self.signer {
            Some(_) => whole_body(request, self.body_limit).await.map(|(request, body)| (request, Some(body)))?,
            None => (request, None),
        };
        let outbound = outbound::build_request(
            request,
            route,
            &self.routed.upstream,
            &self.routed.raw_rest,
            secret,
            presented_key,
            self.body_limit,
        )?;
        let outbound = match (self.signer, whole) {
            // Boxed: signing's future is tens of KiB, which every request's future would carry.
            (Some((signer, store)), Some(body)) => Box::pin(signer.sign(outbound, &body, secret, store)).await?,
            _ => outbound,
        };
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
    if let Some((signer, _)) = attempt.signer {
        signer.refused().await;
    }
    let next = match &secret.minted {
        // A minted token was refused, not the root it was minted from: one new token.
        Some(_) => remint(runtime, attempt, secret, status).await.map(|next| ("reminted", next)),
        None => match runtime.secrets.rejected(secret, status).await {
            Rejection::Newer(next) => Some(("new_version", next)),
            Rejection::Previous(next) => Some(("grace_previous", next)),
            Rejection::Fallback(next) => Some(("fallback_source", next)),
            Rejection::Nothing => None,
        },
    };
    match (next, replay) {
        (Some((why, next)), Some(replay)) => {
            tracing::info!(route = %attempt.routed.route.name, secret = %secret.name, retry = why,
                "upstream refused the credential; retrying once with another version");
            audit.invalidated(status, secret.version.as_deref(), why);
            audit.secret(&next.source, next.version.as_deref(), next.fallback_from.as_deref());
            audit_minted(audit, &next);
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

/// After the upstream refused a minted token: the token leaves the mint cache and one new one is
/// minted from the secret (`Minter::rejected`).
async fn remint(runtime: &Runtime, attempt: &Attempt<'_>, used: &Resolved, status: u16) -> Option<Arc<Resolved>> {
    let root = runtime.secrets.resolve(&used.name).await.ok()?;
    let upstream = &attempt.routed.route.upstream;
    runtime.minter.rejected(attempt.mint_client, root, used, upstream, status).await
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
fn answer(route: &RouteConfig, forwarded: Forwarded, metering: Option<Arc<Metering>>) -> Result<Answer, ProxyError> {
    let response = match forwarded {
        Forwarded::Answered(response) => response,
        Forwarded::Unreachable(error) => return Err(error),
    };
    let coding = decode::coding(&response);
    if coding == Coding::Unsupported {
        tracing::warn!(route = %route.name, "upstream used a content or transfer coding that cannot be scrubbed; refused");
        return Err(ProxyError::UpstreamEncoding { route: route.name.clone() });
    }
    Ok(Answer { response, coding, scrub: route.scrub_responses, metering })
}

fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
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

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F: std::future::Future>(_: impl Fn(State<Arc<AppState>>, Request<Body>) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request's future is moved whole (into its box, through the router's futures), and each
    /// move copies its full size: rare, large stages (SigV4 signing, the retry) are boxed so the
    /// common path stays small. It was 34 KiB before they were.
    #[test]
    fn the_request_future_stays_small() {
        let size = future_size(handle);
        assert!(size < 8 * 1024, "pipeline::handle's future is {size} bytes");
    }
}
