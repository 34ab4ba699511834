//! Admin views and actions on agents: standing (rate, baseline, quarantine, throttle, flags),
//! quarantine, release and revocation (which cascades into every delegation the agent minted).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::admin_error;
use crate::audit::AuditEvent;
use crate::state::AppState;

/// `GET /admin/agents`
pub async fn list(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime.load();
    let revoked = state.revoked_agents.load();
    let now = SystemTime::now();
    let agents: Vec<Value> = runtime
        .config
        .agents
        .iter()
        .map(|a| {
            let standing = state.limits.standing(&a.id, now);
            let status = if revoked.contains(&a.id) {
                "revoked"
            } else if a.disabled {
                "disabled"
            } else if standing.quarantined_until.is_some() {
                "quarantined"
            } else if standing.throttled_until.is_some() {
                "throttled"
            } else {
                "active"
            };
            json!({ "id": a.id, "role": a.role, "status": status, "standing": standing })
        })
        .collect();
    axum::Json(json!({ "agents": agents })).into_response()
}

fn known(state: &AppState, id: &str) -> bool {
    state.runtime.load().config.agents.iter().any(|a| a.id == id)
}

/// `POST /admin/agents/{id}/quarantine`, optionally with `{"minutes": N}`; without it the
/// quarantine lasts until released.
pub async fn quarantine(State(state): State<Arc<AppState>>, Path(id): Path<String>, body: Bytes) -> Response {
    if !known(&state, &id) {
        return admin_error(StatusCode::NOT_FOUND, "unknown_agent", &format!("no agent '{id}'"));
    }
    let minutes = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("minutes").and_then(Value::as_u64)) {
            Some(m) if (1..=525_600).contains(&m) => Some(m),
            _ => {
                return admin_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body may only be {\"minutes\": N} with N from 1 to 525600 (a year)",
                );
            }
        }
    };
    let shared = state.limits.quarantine(&id, minutes.map(|m| Duration::from_secs(m * 60)), SystemTime::now()).await;
    let revoked = crate::principal::delegation::revoke_tree_of_agent(&state, &id, "parent agent quarantined", "admin");
    let persisted = durable(&state, &id, "quarantine", shared).await;
    match minutes {
        Some(minutes) => {
            tracing::info!(agent = %id, minutes, revoked_delegations = revoked.len(), persisted, "agent quarantined by admin")
        }
        None => {
            tracing::info!(agent = %id, revoked_delegations = revoked.len(), persisted, "agent quarantined by admin until released")
        }
    }
    state.audit_event(AuditEvent::AgentQuarantined {
        agent_id: id.clone(),
        by: "admin".into(),
        minutes,
        revoked_delegations: revoked.clone(),
    });
    axum::Json(json!({ "agent": id, "quarantined": true, "revoked_delegations": revoked, "persisted": persisted }))
        .into_response()
}

/// `POST /admin/agents/{id}/release`
pub async fn release(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if !known(&state, &id) {
        return admin_error(StatusCode::NOT_FOUND, "unknown_agent", &format!("no agent '{id}'"));
    }
    let (was, shared) = state.limits.release(&id).await;
    let persisted = durable(&state, &id, "release", shared).await;
    tracing::info!(agent = %id, was_limited = was, persisted, "agent released by admin");
    state.audit_event(AuditEvent::AgentReleased { agent_id: id.clone(), by: "admin".into(), was_limited: was });
    axum::Json(json!({ "agent": id, "released": was, "persisted": persisted })).into_response()
}

/// Whether an admin's change to `agent` will survive a restart: written to Redis (`shared`,
/// with that backend) or to the state file.
async fn durable(state: &Arc<AppState>, agent: &str, what: &str, shared: Result<(), ()>) -> bool {
    match (&state.limits.shared, shared) {
        (Some(_), Ok(())) => true,
        (Some(_), Err(())) => {
            tracing::error!(agent, "the {what} holds on this replica only: redis is unreachable");
            false
        }
        (None, _) => crate::persist::save_or_log(state, agent, what).await,
    }
}

/// `POST /admin/agents/{id}/revoke`: the agent's key stops working at once, and every
/// delegation it minted, directly or not, is revoked with it.
pub async fn revoke(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if !known(&state, &id) {
        return admin_error(StatusCode::NOT_FOUND, "unknown_agent", &format!("no agent '{id}'"));
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
    let revoked = crate::principal::delegation::revoke_tree_of_agent(&state, &id, "parent agent revoked", "admin");
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
