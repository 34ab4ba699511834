//! HTTP handlers: `POST /v1/delegations` and `DELETE /v1/delegations/{id}` on the agent listener
//! (authenticated by the parent's own key), and the admin views and revocations.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http::HeaderName;
use serde_json::{Value, json};

use super::{Delegation, DelegationRequest, MintError};
use crate::audit::AuditEvent;
use crate::config::AgentKeySpec;
use crate::error::{ProxyError, error_body};
use crate::principal::{self, Principal};
use crate::server::PeerCred;
use crate::state::AppState;

const MAX_BODY: usize = 64 * 1024;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(error_body(code, message))).into_response()
}

pub fn describe(d: &Delegation) -> Value {
    json!({
        "id": d.id,
        "delegatedBy": d.chain,
        "label": d.label,
        "grants": d.role.grants.iter().map(|g| json!({
            "route": g.route, "secret": g.secret,
            "methods": match &g.methods { crate::policy::MethodSet::Any => vec!["*".to_string()], crate::policy::MethodSet::Only(m) => m.iter().map(|m| m.to_string()).collect() },
            "paths": g.paths.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "created_at": crate::timestamp::seconds(d.created),
        "expires_at": crate::timestamp::seconds(d.expires),
        "max_requests": d.max_requests,
        "used": d.used(),
        "revoke_on_failure": d.revoke_on_failure,
        "allow_subdelegation": d.allow_subdelegation,
        "depth": d.depth,
    })
}

/// The parent's key: `Authorization: Bearer|token <key>`, `x-api-key`, or `Proxy-Authorization`.
fn parent_key(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let bearer = AgentKeySpec { header: http::header::AUTHORIZATION, schemes: vec!["Bearer".into(), "token".into()] };
    match crate::identity::extract_key(std::slice::from_ref(&bearer), headers, "delegations") {
        Err(ProxyError::MissingAgentKey { .. }) => {
            let api_key = AgentKeySpec { header: HeaderName::from_static("x-api-key"), schemes: vec![] };
            crate::identity::extract_key(std::slice::from_ref(&api_key), headers, "delegations")
        }
        other => other,
    }
}

/// The caller of the delegation API: by its key, or, with no key on the Unix socket, by its uid.
fn caller<'r>(
    state: &AppState,
    runtime: &'r crate::state::Runtime,
    headers: &HeaderMap,
    peer: Option<Extension<PeerCred>>,
) -> Result<Principal<'r>, ProxyError> {
    let uid = peer.map(|p| p.0.uid);
    match (parent_key(headers), uid.and_then(|uid| principal::identify_peer(state, runtime, uid))) {
        (Err(ProxyError::MissingAgentKey { .. }), Some(by_uid)) => by_uid,
        (key, _) => principal::identify(state, runtime, key?, "delegations", uid),
    }
}

/// Tells the other replicas (through Redis, when it is the limits backend).
fn share_revocations(state: &AppState, ids: &[String]) {
    if let Some(shared) = state.limits.shared.clone()
        && !ids.is_empty()
    {
        let ids = ids.to_vec();
        tokio::spawn(async move {
            let _ = shared.revoke_delegations(&ids).await;
        });
    }
}

/// Revokes every delegation an agent minted, transitively, with one audit event each.
pub fn revoke_tree_of_agent(state: &AppState, agent: &str, reason: &str, by: &str) -> Vec<String> {
    let revoked = state.delegations.revoke_rooted_at(agent);
    state.limits.changed.notify_one();
    for child in &revoked {
        state.audit_event(AuditEvent::DelegationRevoked {
            delegation_id: child.clone(),
            reason: reason.into(),
            by: by.into(),
        });
    }
    share_revocations(state, &revoked);
    revoked
}

/// Counts one use of a child key against its own budget and every budget above it (a key's
/// `max_requests` bounds its whole subtree): exact across replicas with the Redis backend.
pub async fn admit(state: &AppState, delegation: &Arc<Delegation>) -> Result<(), ProxyError> {
    let lineage = state.delegations.lineage(delegation)?;
    let now = state.delegations.now();
    let budgets: Vec<(&str, u64, std::time::Duration)> = lineage
        .iter()
        .filter_map(|d| {
            let max = d.max_requests?;
            // The shared counter outlives the key by an hour, for the admin view.
            let keep = d.expires.duration_since(now).unwrap_or_default() + std::time::Duration::from_secs(3600);
            Some((d.id.as_str(), max, keep))
        })
        .collect();
    match &state.limits.shared {
        Some(shared) if !budgets.is_empty() => match shared.spend(&budgets).await {
            Ok(None) => {
                lineage.iter().for_each(|d| d.note_use());
                Ok(())
            }
            Ok(Some(spent)) => Err(ProxyError::DelegationExhausted { id: budgets[spent].0.to_string() }),
            Err(()) if shared.fail_open => state.delegations.admit(&lineage),
            Err(()) => Err(ProxyError::LimiterUnavailable),
        },
        _ => state.delegations.admit(&lineage),
    }
}

/// Revokes `id` and its descendants, with one audit event each.
pub fn revoke_and_audit(state: &AppState, id: &str, reason: &str, by: &str) -> Vec<String> {
    let revoked = state.delegations.revoke(id);
    // Written in the background at once; the callers that can wait for it do (`persist::save`).
    state.limits.changed.notify_one();
    share_revocations(state, &revoked);
    for child in &revoked {
        state.audit_event(AuditEvent::DelegationRevoked {
            delegation_id: child.clone(),
            reason: reason.into(),
            by: by.into(),
        });
    }
    revoked
}

/// `POST /v1/delegations`: mint a narrowed child key.
pub async fn mint(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerCred>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let runtime = state.runtime.load_full();
    let parent = match caller(&state, &runtime, &headers, peer) {
        Ok(parent) => parent,
        Err(e) => {
            state.audit_event(AuditEvent::DelegationRefused {
                agent_id: None,
                status: e.status().as_u16(),
                error_code: e.code().into(),
                message: None,
            });
            return e.into_response();
        }
    };
    if let Err(quarantined) = state.limits.gate(parent.root(), std::time::SystemTime::now()) {
        return quarantined.into_response();
    }
    if body.len() > MAX_BODY {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "a delegation request is at most 64 KiB");
    }
    let request: DelegationRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_delegation",
                &format!("the body is not a delegation request: {e}"),
            );
        }
    };
    for route in &request.routes {
        if !runtime.config.routes.iter().any(|r| &r.name == route) {
            return error(StatusCode::BAD_REQUEST, "invalid_delegation", &format!("no route named '{route}'"));
        }
    }
    match state.delegations.mint(&parent.delegator(), &request) {
        Ok((delegation, key)) => {
            // Durable before the key is handed out, so a key once given survives a restart.
            crate::persist::save_or_log(&state, &delegation.id, "delegation").await;
            if let Some(shared) = &state.limits.shared
                && shared.publish_delegation(&super::export(&delegation)).await.is_err()
            {
                tracing::warn!(id = %delegation.id, "the delegation could not be shared through redis; it works on this replica only");
            }
            state.audit_event(AuditEvent::DelegationMinted {
                delegation_id: delegation.id.clone(),
                description: describe(&delegation),
            });
            let mut answer = describe(&delegation);
            answer["key"] = json!(key);
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        Err(refused) => {
            let (status, code, message) = match refused {
                MintError::Excess(m) => (StatusCode::FORBIDDEN, "delegation_exceeds_parent", m),
                MintError::Invalid(m) => (StatusCode::BAD_REQUEST, "invalid_delegation", m),
                MintError::Full => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_delegations",
                    "too many live delegations; try later".to_string(),
                ),
            };
            state.audit_event(AuditEvent::DelegationRefused {
                agent_id: Some(parent.id().into()),
                status: status.as_u16(),
                error_code: code.into(),
                message: Some(message.clone()),
            });
            error(status, code, &message)
        }
    }
}

/// `DELETE /v1/delegations/{id}`: the parent (or any ancestor) revokes a child and its subtree.
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    peer: Option<Extension<PeerCred>>,
    headers: HeaderMap,
) -> Response {
    let runtime = state.runtime.load_full();
    let caller = match caller(&state, &runtime, &headers, peer) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let Some(target) = state.delegations.get(&id) else {
        return error(StatusCode::NOT_FOUND, "unknown_delegation", &format!("no delegation '{id}'"));
    };
    if !target.chain.iter().any(|ancestor| ancestor == caller.id()) {
        return error(StatusCode::FORBIDDEN, "not_your_delegation", &format!("'{}' did not mint '{id}'", caller.id()));
    }
    let revoked = revoke_and_audit(&state, &id, "revoked by parent", caller.id());
    crate::persist::save_or_log(&state, &id, "delegation revocation").await;
    axum::Json(json!({ "revoked": revoked })).into_response()
}

/// `GET /admin/delegations`: the live ones.
pub async fn admin_list(State(state): State<Arc<AppState>>) -> Response {
    let live: Vec<Value> = state.delegations.live().iter().map(|d| describe(d)).collect();
    axum::Json(json!({ "delegations": live })).into_response()
}

/// `DELETE /admin/delegations/{id}`
pub async fn admin_revoke(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if state.delegations.get(&id).is_none() {
        return error(StatusCode::NOT_FOUND, "unknown_delegation", &format!("no delegation '{id}'"));
    }
    let revoked = revoke_and_audit(&state, &id, "revoked by admin", "admin");
    crate::persist::save_or_log(&state, &id, "delegation revocation").await;
    axum::Json(json!({ "revoked": revoked })).into_response()
}

/// `POST /admin/agents/{id}/revoke`: the agent's key stops working at once, and every
/// delegation it minted, directly or not, is revoked with it.
pub async fn admin_revoke_agent(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if !state.runtime.load().config.agents.iter().any(|a| a.id == id) {
        return error(StatusCode::NOT_FOUND, "unknown_agent", &format!("no agent '{id}'"));
    }
    // With Redis, the other replicas learn of it within a second; say so if Redis is down.
    let all_replicas = match &state.limits.shared {
        Some(shared) => shared.revoke(&id).await.is_ok(),
        None => true,
    };
    if !all_replicas {
        tracing::error!(agent = %id, "revoked on this replica only: redis is unreachable");
    }
    state.revoked_agents.rcu(|set| {
        let mut set = (**set).clone();
        set.insert(id.clone());
        set
    });
    state.audit_event(AuditEvent::AgentRevoked { agent_id: id.clone(), by: "admin".into() });
    let revoked = revoke_tree_of_agent(&state, &id, "parent agent revoked", "admin");
    // With Redis the revocation is already kept there; locally it is written to the state file.
    let persisted = match state.limits.shared {
        Some(_) => all_replicas,
        None => crate::persist::save_or_log(&state, &id, "revocation").await,
    };
    tracing::info!(agent = %id, revoked_delegations = revoked.len(), persisted, "agent revoked by admin");
    axum::Json(
        json!({ "agent": id, "revoked_delegations": revoked, "all_replicas": all_replicas, "persisted": persisted }),
    )
    .into_response()
}

/// Treat a principal as a refusal reason for the pipeline's revoke-on-failure; returns once
/// the revocation is durable.
pub async fn revoke_on_failure(state: &AppState, principal: &Principal<'_>, why: &str) {
    if let Some(d) = principal.delegation()
        && d.revoke_on_failure
        && !d.is_revoked()
    {
        revoke_and_audit(state, &d.id, why, "revoke_on_failure");
        crate::persist::save_or_log(state, &d.id, "delegation revocation").await;
    }
}
