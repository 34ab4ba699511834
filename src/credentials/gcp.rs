//! The `gcp-service-account` kind: the secret is a Google service-account JSON key. keyward signs
//! an RS256 JWT assertion with its private key and exchanges it at the key's `token_uri` for an
//! access token (RFC 7523), injected as `Bearer`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::kind::{Kind, MintError, MintRequest, Minted, check_endpoint, exchange, mint_headers, rsa_key, token_answer};
use super::oauth2::encode_form;
use super::registry::Check;
use crate::forward::Forwarder;

const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const DEFAULT_MARGIN: Duration = Duration::from_secs(300);
/// The assertion's lifetime: Google accepts at most one hour.
const ASSERTION_SECS: u64 = 3600;
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpFields {
    scopes: Option<Vec<String>>,
    /// Overrides the key's own `token_uri` (a private endpoint, or a test).
    token_uri: Option<String>,
    /// A user to impersonate with domain-wide delegation (the JWT's `sub`).
    subject: Option<String>,
    refresh_margin_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpConfig {
    pub scopes: Vec<String>,
    pub token_uri: Option<String>,
    pub subject: Option<String>,
    pub refresh_margin: Duration,
}

/// The fields of a service-account key keyward reads. Deliberately not `Debug`.
#[derive(Deserialize)]
struct ServiceAccountKey {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

impl Drop for ServiceAccountKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl ServiceAccountKey {
    fn parse(root: &SecretString) -> Result<ServiceAccountKey, String> {
        let key: ServiceAccountKey = serde_json::from_str(root.expose_secret()).map_err(|e| {
            format!(
                "is not a service-account JSON key (type, client_email, private_key; line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        if key.kind != "service_account" {
            return Err("is a JSON key whose type is not \"service_account\"".to_string());
        }
        Ok(key)
    }
}

impl Kind for GcpConfig {
    const KIND: &'static str = "gcp-service-account";
    type Fields = GcpFields;

    fn configure(fields: GcpFields, check: &mut Check<'_>) -> Option<GcpConfig> {
        let scopes = fields.scopes.unwrap_or_else(|| vec![DEFAULT_SCOPE.to_string()]);
        if scopes.is_empty() {
            check.problem("scopes", "lists no scope; leave it out for cloud-platform");
        }
        for (i, scope) in scopes.iter().enumerate() {
            if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
                check.problem(&format!("scopes[{i}]"), format!("'{scope}' is not an OAuth2 scope"));
            }
        }
        let token_uri_ok = fields.token_uri.as_deref().is_none_or(|uri| check_endpoint(check, "token_uri", uri).is_some());
        let refresh_margin = fields.refresh_margin_seconds.map_or(DEFAULT_MARGIN, Duration::from_secs);
        token_uri_ok.then_some(GcpConfig {
            scopes,
            token_uri: fields.token_uri,
            subject: fields.subject,
            refresh_margin,
        })
    }

    fn check_root(&self, root: &SecretString) -> Result<(), String> {
        let key = ServiceAccountKey::parse(root)?;
        rsa_key(&key.private_key).map_err(|why| format!("has a private_key that {}", why.trim_start_matches("is ")))?;
        match (&self.token_uri, &key.token_uri) {
            (None, None) => Err("has no token_uri, and the secret's kind sets none".to_string()),
            // The key's own token_uri receives a signed assertion: the same rule as the config's.
            (None, Some(uri)) => super::kind::endpoint(uri).map(|_| ()).map_err(|why| format!("has a token_uri {why}")),
            _ => Ok(()),
        }
    }

    fn refresh_margin(&self) -> Duration {
        self.refresh_margin
    }

    fn mint<'a>(&'a self, http: &'a Forwarder, request: &'a MintRequest) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move {
            let key = ServiceAccountKey::parse(&request.root)
                .map_err(|why| MintError::new(None, format!("the secret '{}' {why}", request.secret)))?;
            let token_uri = self
                .token_uri
                .clone()
                .or(key.token_uri.clone())
                .ok_or_else(|| MintError::new(None, "the service-account key has no token_uri"))?;
            let signing = rsa_key(&key.private_key)
                .map_err(|why| MintError::new(None, format!("the service-account private_key {why}")))?;
            let assertion = assertion(&signing, &key, self, &token_uri, super::kind::unix_now())
                .map_err(|_| MintError::new(None, "the JWT assertion could not be signed"))?;
            let body =
                Zeroizing::new(encode_form(&[("grant_type", GRANT_TYPE), ("assertion", assertion.expose_secret())]));
            let uri = super::kind::endpoint(&token_uri)
                .map_err(|why| MintError::new(None, format!("the service-account key's token_uri: {why}")))?;
            let headers = mint_headers("application/x-www-form-urlencoded", []);
            let (status, answer) =
                exchange(http, Method::POST, uri, headers, Bytes::copy_from_slice(body.as_bytes())).await?;
            token_answer(status, &answer, Duration::from_secs(ASSERTION_SECS))
        })
    }
}

/// The signed assertion: `iss` the service account, `scope`, `aud` the token URI, one hour.
fn assertion(
    signing: &jsonwebtoken::EncodingKey,
    key: &ServiceAccountKey,
    config: &GcpConfig,
    token_uri: &str,
    now: u64,
) -> Result<SecretString, jsonwebtoken::errors::Error> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        iss: &'a str,
        scope: String,
        aud: &'a str,
        iat: u64,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        sub: Option<&'a str>,
    }
    let claims = Claims {
        iss: &key.client_email,
        scope: config.scopes.join(" "),
        aud: token_uri,
        iat: now,
        exp: now + ASSERTION_SECS,
        sub: config.subject.as_deref(),
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = key.private_key_id.clone();
    jsonwebtoken::encode(&header, &claims, signing).map(SecretString::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_keys_are_checked() {
        let mut report = Vec::new();
        let fields = serde_json::from_value(serde_json::json!({"scopes": ["a b"], "token_uri": "ftp://x"})).unwrap();
        assert!(GcpConfig::configure(fields, &mut Check::new("secrets.G", &mut report)).is_none());
        let fields: Vec<&str> = report.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["secrets.G.scopes[0]", "secrets.G.token_uri"]);

        let config = GcpConfig { scopes: vec![DEFAULT_SCOPE.into()], token_uri: None, subject: None, refresh_margin: DEFAULT_MARGIN };
        let not_json = config.check_root(&SecretString::from("-----BEGIN sk-canary")).unwrap_err();
        assert!(not_json.starts_with("is not a service-account JSON key") && !not_json.contains("canary"));
        let wrong_type = r#"{"type":"authorized_user","client_email":"a@b","private_key":"x"}"#;
        assert!(config.check_root(&SecretString::from(wrong_type)).unwrap_err().contains("service_account"));
        let bad_pem = r#"{"type":"service_account","client_email":"a@b","private_key":"nope","token_uri":"https://t"}"#;
        assert!(config.check_root(&SecretString::from(bad_pem)).unwrap_err().starts_with("has a private_key that"));
    }
}
