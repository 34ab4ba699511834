//! keyward: a credential-injecting reverse proxy for AI agents.
//!
//! The request flow lives in `pipeline`; each stage module is independent of the others.
//! Modules the integration tests, benches and the binary use are `pub`; the rest are
//! `pub(crate)`, so what the crate offers stays as small as what it is tested through.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod arrival;
pub mod audit;
pub mod config;
pub mod credentials;
pub(crate) mod decode;
pub(crate) mod delegation;
pub mod demo;
pub(crate) mod dns;
pub mod error;
pub mod fake_upstream;
pub(crate) mod forward;
pub mod health;
pub mod identity;
pub mod inject;
pub mod instance;
pub(crate) mod limit;
pub(crate) mod metrics;
pub(crate) mod outbound;
pub(crate) mod persist;
pub(crate) mod pipeline;
pub mod policy;
pub(crate) mod principal;
pub mod reload;
pub(crate) mod rotation;
pub mod scrub;
pub(crate) mod server;
pub(crate) mod state;
pub(crate) mod suggest;
pub(crate) mod timestamp;
pub mod usage;

use std::sync::Arc;

use axum::Router;

pub use server::forward::{CertAuthority, IssuedLeaf};
pub use state::{AppState, Runtime};

/// The agent-facing router: every path goes through the pipeline. Tests drive it with
/// `app(state).oneshot(request)` without a socket. The agent listener sends only paths under
/// `DELEGATIONS_PATH` through this router and everything else to the pipeline directly
/// (`server::App::respond`): a route added here outside that prefix must be added there too.
pub fn app(state: Arc<AppState>) -> Router {
    use axum::routing::{delete, post};
    Router::new()
        .route(principal::api::DELEGATIONS_PATH, post(principal::api::mint))
        .route(principal::api::DELEGATION_PATH, delete(principal::api::revoke))
        .fallback(pipeline::handle)
        .with_state(state)
}
