//! keyward: a credential-injecting reverse proxy for AI agents.
//!
//! The request flow lives in `pipeline`; each stage module is independent of the others.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod decode;
pub mod delegation;
pub mod demo;
pub mod error;
pub mod fake_upstream;
pub mod forward;
pub mod health;
pub mod identity;
pub mod inject;
pub mod limit;
pub mod metrics;
pub mod outbound;
pub mod persist;
pub mod pipeline;
pub mod policy;
pub mod principal;
pub mod reload;
pub mod resolve;
pub mod rotation;
pub mod scrub;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod state;
pub mod timestamp;

use std::sync::Arc;

use axum::Router;

pub use state::{AppState, Runtime};

/// The agent-facing router: every path goes through the pipeline. Tests drive it with
/// `app(state).oneshot(request)` without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    use axum::routing::{delete, post};
    Router::new()
        .route("/v1/delegations", post(principal::api::mint))
        .route("/v1/delegations/{id}", delete(principal::api::revoke))
        .fallback(pipeline::handle)
        .with_state(state)
}
