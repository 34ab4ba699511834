//! `POST /v1/delegations` and `DELETE /v1/delegations/{id}` on the agent listener: a caller,
//! authenticated by its own key (or its uid on the Unix socket), mints a narrowed child key or
//! revokes one it minted.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http::HeaderName;
use serde_json::json;

use super::Principal;

/// Where agents mint delegated keys (POST), and revoke one (DELETE, below it by id).
pub const DELEGATIONS_PATH: &str = "/v1/delegations";
pub const DELEGATION_PATH: &str = "/v1/delegations/{id}";
use crate::arrival::PeerCred;
use crate::audit::AuditEvent;
use crate::config::AgentKeySpec;
use crate::delegation::{DelegationRequest, MintError, describe};
use crate::error::{ProxyError, error_response as error};
use crate::state::{AppState, Runtime};

const MAX_BODY: usize = 64 * 1024;

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
    runtime: &'r Runtime,
    headers: &HeaderMap,
    peer: Option<Extension<PeerCred>>,
) -> Result<Principal<'r>, ProxyError> {
    let uid = peer.map(|p| p.0.uid);
    let by_uid = uid.and_then(|uid| super::identify_peer(&state.revoked_agents, runtime, uid));
    match (parent_key(headers), by_uid) {
        (Err(ProxyError::MissingAgentKey { .. }), Some(by_uid)) => by_uid,
        (key, _) => super::identify(&state.delegations, &state.revoked_agents, runtime, key?, "delegations", uid),
    }
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
                && shared.publish_delegation(&crate::delegation::export(&delegation)).await.is_err()
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
    let revoked = super::delegation::revoke(&state, &id, "revoked by parent", caller.id());
    crate::persist::save_or_log(&state, &id, "delegation revocation").await;
    axum::Json(json!({ "revoked": revoked })).into_response()
}
