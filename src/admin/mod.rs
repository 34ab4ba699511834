//! The admin listener: liveness, readiness and Prometheus metrics (open, for probes and
//! scrapers), and the admin API and dashboard under `/admin` (behind the admin token). It is a
//! separate listener so it can stay on loopback or inside the pod.

mod agents;
mod api;
mod budgets;
mod delegations;
mod lifecycle;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::Exposition;
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/admin/audit", get(api::audit))
        .route("/admin/audit/summary", get(api::summary))
        .route("/admin/report", get(api::report))
        .route("/admin/secrets", get(api::secrets))
        .route("/admin/secrets/{name}/rotate", axum::routing::post(lifecycle::rotate))
        .route("/admin/reload", axum::routing::post(lifecycle::reload))
        .route("/admin/delegations", get(delegations::list))
        .route("/admin/delegations/{id}", axum::routing::delete(delegations::revoke))
        .route("/admin/agents", get(agents::list))
        .route("/admin/budgets", get(budgets::list))
        .route("/admin/agents/{id}/quarantine", axum::routing::post(agents::quarantine))
        .route("/admin/agents/{id}/release", axum::routing::post(agents::release))
        .route("/admin/agents/{id}/revoke", axum::routing::post(agents::revoke))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/ui", get(ui::page))
        .route("/admin/ui.js", get(ui::script))
        .merge(protected)
        .with_state(state)
}

pub(crate) use crate::error::error_response as admin_error;

/// `Authorization: Bearer <token>` whose SHA-256 matches `admin.token_sha256`, compared in
/// constant time. Without a configured token the admin API is off.
async fn require_token(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let runtime = state.runtime.load();
    let Some(expected) = runtime.config.admin.token_sha256 else {
        return admin_error(
            StatusCode::UNAUTHORIZED,
            "admin_disabled",
            "the admin API is off: set admin.token_sha256 (see `keyward admin token`)",
        );
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(crate::identity::hash_key);
    match presented {
        Some(hash) if bool::from(hash.ct_eq(&expected)) => next.run(request).await,
        _ => admin_error(StatusCode::UNAUTHORIZED, "invalid_admin_token", "send 'Authorization: Bearer <admin token>'"),
    }
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// Ready once every secret source has answered at least one fetch.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime.load();
    let waiting = runtime.secrets.unreached();
    if waiting.is_empty() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "not_ready", "waiting_for_sources": waiting })))
            .into_response()
    }
}

/// Prometheus text 0.0.4 unless the scraper's `Accept` prefers OpenMetrics.
async fn metrics(State(state): State<Arc<AppState>>, headers: header::HeaderMap) -> Response {
    let format = Exposition::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    ([(header::CONTENT_TYPE, format.content_type()), (header::VARY, "Accept")], state.metrics.encode(format))
        .into_response()
}
