//! The `vault` provider: a HashiCorp Vault or OpenBao KV v2 secret over the HTTP API, with token
//! or AppRole login. The KV version is the secret's version; a newer one is read after the cache TTL.
//!
//! keyward's own Vault token and AppRole secret_id are read from an environment variable or a
//! file at login, held only in `SecretString`, sent only as `X-Vault-Token` or in the login body,
//! and never logged. Error messages carry HTTP statuses, never response bodies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use super::{Fetched, SecretProvider, StoreError, apply_mapping};
use crate::config::{SecretRef, Selector, VaultAuth, VaultConfig};

/// Largest Vault response read: a KV secret is small.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// One Vault call, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-login this long before an AppRole token's lease runs out.
const RENEW_MARGIN: Duration = Duration::from_secs(10);

pub struct VaultProvider {
    config: VaultConfig,
    mapping: BTreeMap<String, Selector>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// An AppRole login's token and when its lease ends.
    session: Mutex<Option<(SecretString, Option<Instant>)>>,
}

impl VaultProvider {
    pub fn new(config: VaultConfig, mapping: BTreeMap<String, Selector>) -> VaultProvider {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).build(https);
        VaultProvider { config, mapping, client, session: Mutex::new(None) }
    }

    /// One call to the Vault HTTP API; the JSON answer, or an error naming the status only.
    async fn call(
        &self,
        method: Method,
        api_path: &str,
        token: Option<&SecretString>,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Option<serde_json::Value>), StoreError> {
        let url = format!("{}/v1/{api_path}", self.config.address);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = token {
            let mut value = http::HeaderValue::from_str(token.expose_secret())
                .map_err(|_| StoreError::Unreachable("the Vault token is not a valid header value".to_string()))?;
            value.set_sensitive(true);
            builder = builder.header("x-vault-token", value);
        }
        if let Some(ns) = &self.config.namespace {
            builder = builder.header("x-vault-namespace", ns.as_str());
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = builder
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|_| StoreError::Unreachable(format!("'{url}' is not a valid request URL")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                StoreError::Unreachable(format!("Vault at {} cannot be reached: {}", self.config.address, chain(&e)))
            })?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|_| StoreError::Unreachable(format!("Vault's answer to {url} broke off or was too large")))?
                .to_bytes();
            // Only syntax is checked here; a body that is not JSON is reported by status alone.
            Ok((status, serde_json::from_slice(&bytes).ok()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| StoreError::Unreachable(format!("Vault did not answer {url} within 5 s")))?
    }

    /// The token to read with: the configured one, or a (cached) AppRole login.
    async fn token(&self, force_login: bool) -> Result<SecretString, StoreError> {
        match &self.config.auth {
            VaultAuth::Token { from } => read_ref(from, "token"),
            VaultAuth::AppRole { mount, role_id, secret_id } => {
                let mut session = self.session.lock().await;
                if !force_login
                    && let Some((token, expires)) = session.as_ref()
                    && expires.is_none_or(|at| Instant::now() + RENEW_MARGIN < at)
                {
                    return Ok(token.clone());
                }
                let secret_id = read_ref(secret_id, "AppRole secret_id")?;
                let body = serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() });
                let (status, answer) =
                    self.call(Method::POST, &format!("auth/{mount}/login"), None, Some(body)).await?;
                if !status.is_success() {
                    *session = None;
                    return Err(StoreError::Unreachable(format!(
                        "AppRole login at auth/{mount} was refused (HTTP {})",
                        status.as_u16()
                    )));
                }
                let auth = answer.as_ref().map(|a| &a["auth"]);
                let Some(token) = auth.and_then(|a| a["client_token"].as_str()) else {
                    return Err(StoreError::Malformed("the AppRole login answer has no auth.client_token".to_string()));
                };
                let token = SecretString::from(token.to_string());
                let lease = auth.and_then(|a| a["lease_duration"].as_u64()).unwrap_or(0);
                let expires = (lease > 0).then(|| Instant::now() + Duration::from_secs(lease));
                *session = Some((token.clone(), expires));
                Ok(token)
            }
        }
    }

    async fn read(&self, token: &SecretString) -> Result<(StatusCode, Option<serde_json::Value>), StoreError> {
        let api_path = format!("{}/data/{}", self.config.mount, self.config.path);
        self.call(Method::GET, &api_path, Some(token), None).await
    }
}

impl SecretProvider for VaultProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            let token = self.token(false).await?;
            let (mut status, mut answer) = self.read(&token).await?;
            if status == StatusCode::FORBIDDEN && matches!(self.config.auth, VaultAuth::AppRole { .. }) {
                // The AppRole token may have been revoked or expired early: log in once more.
                let token = self.token(true).await?;
                (status, answer) = self.read(&token).await?;
            }
            let at = format!("{}/data/{}", self.config.mount, self.config.path);
            match status {
                s if s.is_success() => {}
                StatusCode::NOT_FOUND => {
                    return Err(StoreError::Unreachable(format!("no KV v2 secret at {at} (HTTP 404)")));
                }
                StatusCode::FORBIDDEN => {
                    return Err(StoreError::Unreachable(format!("permission denied reading {at} (HTTP 403)")));
                }
                s => return Err(StoreError::Unreachable(format!("reading {at} failed (HTTP {})", s.as_u16()))),
            }
            let answer = answer.ok_or_else(|| StoreError::Malformed(format!("the answer for {at} is not JSON")))?;
            let data = &answer["data"];
            let version = data["metadata"]["version"].as_u64().map(|v| v.to_string());
            let fields = match &data["data"] {
                serde_json::Value::Object(fields) => fields,
                serde_json::Value::Null => {
                    return Err(StoreError::Malformed(format!(
                        "the current version of {at} is deleted or destroyed (is the mount KV v2?)"
                    )));
                }
                _ => return Err(StoreError::Malformed(format!("data.data of {at} is not an object of fields"))),
            };
            let document = serde_json::Value::Object(fields.clone()).to_string();
            let values = apply_mapping(&document, &self.mapping)?;
            Ok(Fetched { values, version })
        })
    }

    fn rotation(&self) -> Option<&dyn super::Rotatable> {
        Some(self)
    }
}

/// KV v2 has no pending stage: rotating means re-reading, and taking a newer version only once
/// the routes' probes accept it.
impl super::Rotatable for VaultProvider {
    fn candidate<'a>(&'a self, current: &'a Fetched) -> BoxFuture<'a, Result<Option<Fetched>, StoreError>> {
        Box::pin(async move {
            let latest = self.fetch().await?;
            Ok((latest.version != current.version).then_some(latest))
        })
    }

    fn stage<'a>(&'a self, _name: &'a str, _value: &'a secrecy::SecretString) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async {
            Err(StoreError::Unsupported(
                "Vault KV v2 has no pending stage: write the new version to Vault, then rotate without a body".into(),
            ))
        })
    }

    fn promote<'a>(&'a self, _candidate: &'a Fetched) -> BoxFuture<'a, Result<(), StoreError>> {
        // The newest KV version is already the one Vault serves; promoting is the swap in the cache.
        Box::pin(async { Ok(()) })
    }
}

/// Reads one of keyward's own credentials from where the config points, trimmed.
fn read_ref(from: &SecretRef, what: &str) -> Result<SecretString, StoreError> {
    let text = match from {
        SecretRef::Env(var) => std::env::var(var)
            .map_err(|_| StoreError::Unreachable(format!("the Vault {what} variable {var} is not set")))?,
        SecretRef::File(path) => std::fs::read_to_string(path).map_err(|e| {
            StoreError::Unreachable(format!("cannot read the Vault {what} file {}: {e}", path.display()))
        })?,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(StoreError::Unreachable(format!("the Vault {what} is empty")));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
