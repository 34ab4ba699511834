//! The `vault` provider: a HashiCorp Vault or OpenBao KV v2 secret over the HTTP API, with token
//! or AppRole login. The KV version is the secret's version; a newer one is read after the cache TTL.
//!
//! keyward's own Vault token and AppRole secret_id are read from an environment variable or a
//! file at login, held only in `SecretString`, sent only as `X-Vault-Token` or in the login body,
//! and never logged. Error messages carry HTTP statuses, never response bodies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
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
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Check, Fetched, Provider, SecretProvider, Selector, StoreError, apply_mapping};

/// A HashiCorp Vault or OpenBao KV v2 secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// The server's base URL, e.g. `https://vault.internal:8200`.
    pub address: String,
    /// The KV v2 mount (default `secret`).
    pub mount: String,
    /// The secret's path below the mount.
    pub path: String,
    pub namespace: Option<String>,
    pub auth: VaultAuth,
}

/// Where keyward's Vault credentials come from: never written in the config itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    Token { from: SecretRef },
    AppRole { mount: String, role_id: String, secret_id: SecretRef },
}

/// A credential keyward itself needs, named by where it is read from at fetch time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

/// The vault fields of a source table: the server's base URL, KV v2 mount, secret path, auth.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultFields {
    address: Option<String>,
    mount: Option<String>,
    namespace: Option<String>,
    path: Option<String>,
    auth: Option<RawVaultAuth>,
}

/// How keyward logs in to Vault/OpenBao: a token, or an AppRole. Secrets are named by the
/// environment variable or file that holds them, never written in the config.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultAuth {
    method: String,
    token_env: Option<String>,
    token_file: Option<String>,
    role_id: Option<String>,
    secret_id_env: Option<String>,
    secret_id_file: Option<String>,
    approle_mount: Option<String>,
}

impl Provider for VaultConfig {
    const KIND: &'static str = "vault";
    type Fields = VaultFields;

    fn configure(
        fields: VaultFields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<VaultConfig> {
        let config = vault_config(fields, check)?;
        if mapping.as_ref().is_none_or(BTreeMap::is_empty) {
            check.problem("mapping", "is required for provider 'vault' (secret name = \"{{FIELD}}\")");
        }
        Some(config)
    }

    fn build(&self, _source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(VaultProvider::new(self.clone(), mapping))
    }
}

/// A credential keyward itself reads: exactly one of an environment variable or a file.
fn secret_ref(check: &mut Check<'_>, field: &str, env: Option<&String>, file: Option<&String>) -> Option<SecretRef> {
    match (env, file) {
        (Some(var), None) if !var.is_empty() => Some(SecretRef::Env(var.clone())),
        (None, Some(path)) if path.starts_with('/') => Some(SecretRef::File(PathBuf::from(path))),
        (None, Some(_)) => {
            check.problem(&format!("{field}_file"), "must be an absolute path");
            None
        }
        _ => {
            let at = check.at();
            check.problem(&format!("{field}_env"), format!("set exactly one of {at}.{field}_env or {at}.{field}_file"));
            None
        }
    }
}

fn vault_config(s: VaultFields, check: &mut Check<'_>) -> Option<VaultConfig> {
    let address = s.address.clone().unwrap_or_default();
    let address_ok = match address.parse::<http::Uri>() {
        Ok(uri) => {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
                && uri.query().is_none()
        }
        Err(_) => false,
    };
    if !address_ok {
        check.problem("address", "is required for provider 'vault': an http:// or https:// URL without user info");
    } else if address.starts_with("http://")
        && !address.parse::<http::Uri>().is_ok_and(|u| u.host().is_some_and(crate::policy::is_loopback_host))
    {
        check.problem("address", "would send the Vault token in cleartext; use https (http:// only on loopback)");
    }
    let segment_ok = |text: &str| {
        !text.is_empty()
            && text.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.@+=:".contains(ch))
            })
    };
    let mount = s.mount.clone().unwrap_or_else(|| "secret".to_string());
    if !segment_ok(&mount) {
        check.problem("mount", format!("'{mount}' is not a mount path like \"secret\""));
    }
    let path = s.path.clone().unwrap_or_default();
    if !segment_ok(&path) {
        check.problem(
            "path",
            "is required for provider 'vault': the secret's path below the mount, like \"agents/openai\"",
        );
    }
    if let Some(ns) = &s.namespace
        && !segment_ok(ns)
    {
        check.problem("namespace", format!("'{ns}' is not a namespace path"));
    }
    let Some(auth) = &s.auth else {
        check.problem(
            "auth",
            "is required for provider 'vault': { method = \"token\" } or { method = \"approle\", ... }",
        );
        return None;
    };
    let unused_auth = |check: &mut Check<'_>, fields: &[(&str, bool)]| {
        for (name, present) in fields {
            if *present {
                check.problem(&format!("auth.{name}"), format!("is not used by auth method '{}'", auth.method));
            }
        }
    };
    let auth = match auth.method.as_str() {
        "token" => {
            unused_auth(
                check,
                &[
                    ("role_id", auth.role_id.is_some()),
                    ("secret_id_env", auth.secret_id_env.is_some()),
                    ("secret_id_file", auth.secret_id_file.is_some()),
                    ("approle_mount", auth.approle_mount.is_some()),
                ],
            );
            let default_env = "VAULT_TOKEN".to_string();
            let env = if auth.token_file.is_none() {
                Some(auth.token_env.as_ref().unwrap_or(&default_env))
            } else {
                auth.token_env.as_ref()
            };
            VaultAuth::Token { from: secret_ref(check, "auth.token", env, auth.token_file.as_ref())? }
        }
        "approle" => {
            unused_auth(check, &[("token_env", auth.token_env.is_some()), ("token_file", auth.token_file.is_some())]);
            let Some(role_id) = auth.role_id.clone().filter(|r| !r.is_empty()) else {
                check.problem("auth.role_id", "is required for auth method 'approle'");
                return None;
            };
            let mount = auth.approle_mount.clone().unwrap_or_else(|| "approle".to_string());
            if !segment_ok(&mount) {
                check.problem("auth.approle_mount", format!("'{mount}' is not a mount path"));
            }
            let secret_id =
                secret_ref(check, "auth.secret_id", auth.secret_id_env.as_ref(), auth.secret_id_file.as_ref())?;
            VaultAuth::AppRole { mount, role_id, secret_id }
        }
        other => {
            check.problem("auth.method", format!("'{other}' is not \"token\" or \"approle\""));
            return None;
        }
    };
    Some(VaultConfig { address: address.trim_end_matches('/').to_string(), mount, path, namespace: s.namespace, auth })
}

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
                StoreError::Unreachable(format!("Vault at {} cannot be reached: {}", self.config.address, crate::error::error_chain(&e)))
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

