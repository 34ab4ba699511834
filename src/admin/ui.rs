//! The dashboard: one self-contained page and its script, both served by the admin listener
//! under a strict content security policy (no CDN, no request leaves the admin listener).
//! The page holds no data; its script reads the admin API with the admin token.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("ui.html");
const SCRIPT: &str = include_str!("ui.js");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], SCRIPT)
        .into_response()
}
