//! Admin API for the secret lifecycle: manual rotation and config reload.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde_json::json;
use zeroize::Zeroize;

use super::admin_error;
use crate::credentials::StoreError;
use crate::reload::{self, ReloadError};
use crate::rotation::{self, RotationError, Trigger};
use crate::state::AppState;

/// `POST /admin/secrets/{name}/rotate`, optionally with `{"value": "<new credential>"}`: stages
/// the value as the pending version, then tests and promotes it like a scheduled run.
pub async fn rotate(State(state): State<Arc<AppState>>, Path(name): Path<String>, body: Bytes) -> Response {
    let runtime = state.runtime.load_full();
    let Some(source) = rotation::source_for(&runtime, &name) else {
        return admin_error(StatusCode::NOT_FOUND, "unknown_secret", &format!("no secret or source is named '{name}'"));
    };
    let new_value = match staged_value(&body) {
        Ok(None) => None,
        Ok(Some(value)) => {
            let secret = if runtime.secrets.source_of(&name).is_some() {
                name.clone()
            } else {
                match runtime.secrets.names_of(&source).as_slice() {
                    [only] => only.clone(),
                    _ => {
                        return admin_error(
                            StatusCode::BAD_REQUEST,
                            "name_a_secret",
                            &format!("source '{source}' holds several secrets: rotate one of them by its secret name"),
                        );
                    }
                }
            };
            Some((secret, value))
        }
        Err(message) => return admin_error(StatusCode::BAD_REQUEST, "invalid_body", message),
    };
    match rotation::rotate(&state, &source, Trigger::Manual, new_value).await {
        Ok(run) => axum::Json(json!({ "rotation": run })).into_response(),
        Err(error) => {
            let (status, code) = match &error {
                RotationError::UnknownSecret(_) => (StatusCode::NOT_FOUND, "unknown_secret"),
                RotationError::Unsupported(..) | RotationError::Store(StoreError::Unsupported(_)) => {
                    (StatusCode::CONFLICT, "rotation_unsupported")
                }
                RotationError::AlreadyRunning(_) => (StatusCode::CONFLICT, "rotation_running"),
                RotationError::Store(_) => (StatusCode::BAD_GATEWAY, "secret_store_error"),
                RotationError::Failed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rotation_failed"),
            };
            admin_error(status, code, &error.to_string())
        }
    }
}

/// An empty body, or `{"value": "..."}`. Messages never echo the body: it holds a credential.
fn staged_value(body: &[u8]) -> Result<Option<SecretString>, &'static str> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let shape = "the body must be empty or {\"value\": \"<new credential>\"}";
    let mut parsed: serde_json::Value = serde_json::from_slice(body).map_err(|_| shape)?;
    let value = match parsed.get_mut("value") {
        Some(serde_json::Value::String(value)) if !value.is_empty() => std::mem::take(value),
        _ => return Err(shape),
    };
    if parsed.as_object().is_none_or(|o| o.len() != 1) {
        let mut value = value;
        value.zeroize();
        return Err(shape);
    }
    Ok(Some(SecretString::from(value)))
}

/// `POST /admin/reload`: the same as SIGHUP.
pub async fn reload(State(state): State<Arc<AppState>>) -> Response {
    let worker = state.clone();
    let result = tokio::task::spawn_blocking(move || reload::reload(&worker)).await;
    match result {
        Ok(Ok(reloaded)) => axum::Json(json!({ "reloaded": reloaded })).into_response(),
        Ok(Err(ReloadError::NoFile)) => {
            admin_error(StatusCode::CONFLICT, "no_config_file", &ReloadError::NoFile.to_string())
        }
        Ok(Err(ReloadError::Invalid(errors))) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "error": {
                    "code": "invalid_config",
                    "message": "the new config is invalid; keyward keeps serving the last good one",
                    "problems": errors.0.iter().map(|p| p.redacted()).collect::<Vec<_>>(),
                }
            })),
        )
            .into_response(),
        Err(_) => admin_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the reload task failed"),
    }
}
