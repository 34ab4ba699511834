//! Admin views and actions on delegated child keys: the live ones, and revoking one with its
//! subtree.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::admin_error;
use crate::delegation::describe;
use crate::principal::delegation::revoke as revoke_and_audit;
use crate::state::AppState;

/// `GET /admin/delegations`: the live ones.
pub async fn list(State(state): State<Arc<AppState>>) -> Response {
    let live: Vec<Value> = state.delegations.live().iter().map(|d| describe(d)).collect();
    axum::Json(json!({ "delegations": live })).into_response()
}

/// `DELETE /admin/delegations/{id}`
pub async fn revoke(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if state.delegations.get(&id).is_none() {
        return admin_error(StatusCode::NOT_FOUND, "unknown_delegation", &format!("no delegation '{id}'"));
    }
    let revoked = revoke_and_audit(&state, &id, "revoked by admin", "admin");
    crate::persist::save_or_log(&state, &id, "delegation revocation").await;
    axum::Json(json!({ "revoked": revoked })).into_response()
}
