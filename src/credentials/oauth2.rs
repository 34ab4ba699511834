//! The `oauth2-client-credentials` kind: the secret is an OAuth2 client secret. keyward asks the
//! token endpoint for an access token (RFC 6749 §4.4, the client authenticating by HTTP basic
//! auth or in the body) and injects that.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::kind::{Kind, MintError, MintRequest, Minted, check_endpoint, exchange, mint_headers, token_answer};
use super::registry::Check;
use crate::forward::Forwarder;

const DEFAULT_MARGIN: Duration = Duration::from_secs(60);
/// The lifetime assumed for a token answered without `expires_in` (it is optional in RFC 6749).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// `application/x-www-form-urlencoded` escapes everything but unreserved characters.
const FORM: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Fields {
    token_url: Option<String>,
    client_id: Option<String>,
    /// One scope string (space-separated) or a list.
    scope: Option<ScopeField>,
    audience: Option<String>,
    /// `basic` (default) or `body`.
    client_auth: Option<String>,
    refresh_margin_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic` with the form-encoded id and secret (RFC 6749 §2.3.1).
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub client_auth: ClientAuth,
    pub refresh_margin: Duration,
}

impl Kind for OAuth2Config {
    const KIND: &'static str = "oauth2-client-credentials";
    const ROOT_SENT: bool = true;
    type Fields = OAuth2Fields;

    fn configure(fields: OAuth2Fields, check: &mut Check<'_>) -> Option<OAuth2Config> {
        let token_url = match &fields.token_url {
            Some(url) => check_endpoint(check, "token_url", url).map(|_| url.clone()),
            None => {
                check.problem("token_url", "is required for kind 'oauth2-client-credentials'");
                None
            }
        };
        let client_id = match fields.client_id {
            Some(id) if !id.is_empty() && !id.chars().any(char::is_control) => Some(id),
            Some(_) => {
                check.problem("client_id", "must be non-empty text");
                None
            }
            None => {
                check.problem("client_id", "is required for kind 'oauth2-client-credentials'");
                None
            }
        };
        let scope = match fields.scope {
            None => None,
            Some(ScopeField::One(s)) => Some(s),
            Some(ScopeField::Many(list)) => Some(list.join(" ")),
        };
        if scope.as_deref().is_some_and(|s| s.trim().is_empty() || s.chars().any(|c| c.is_control() || c == '"'))
        {
            check.problem("scope", "must be scope names (RFC 6749 §3.3), like \"read:items write:items\"");
        }
        let client_auth = match fields.client_auth.as_deref() {
            None | Some("basic") => Some(ClientAuth::Basic),
            Some("body") => Some(ClientAuth::Body),
            Some(other) => {
                check.problem("client_auth", format!("'{other}' must be 'basic' or 'body'"));
                None
            }
        };
        let refresh_margin = fields.refresh_margin_seconds.map_or(DEFAULT_MARGIN, Duration::from_secs);
        Some(OAuth2Config {
            token_url: token_url?,
            client_id: client_id?,
            scope,
            audience: fields.audience,
            client_auth: client_auth?,
            refresh_margin,
        })
    }

    fn check_root(&self, root: &SecretString) -> Result<(), String> {
        if root.expose_secret().trim().is_empty() {
            return Err("is empty: it should hold the OAuth2 client secret".to_string());
        }
        Ok(())
    }

    fn refresh_margin(&self) -> Duration {
        self.refresh_margin
    }

    fn mint<'a>(&'a self, http: &'a Forwarder, request: &'a MintRequest) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move {
            let secret = request.root.expose_secret().trim();
            let mut form = vec![("grant_type", "client_credentials")];
            if let Some(scope) = &self.scope {
                form.push(("scope", scope));
            }
            if let Some(audience) = &self.audience {
                form.push(("audience", audience));
            }
            let mut extra = Vec::new();
            match self.client_auth {
                ClientAuth::Basic => {
                    let pair = Zeroizing::new(format!(
                        "{}:{}",
                        utf8_percent_encode(&self.client_id, FORM),
                        utf8_percent_encode(secret, FORM)
                    ));
                    let value = Zeroizing::new(format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                    ));
                    let value = HeaderValue::from_str(&value)
                        .map_err(|_| MintError::new(None, "the client credentials are not a header value"))?;
                    extra.push((http::header::AUTHORIZATION, value));
                }
                ClientAuth::Body => {
                    form.push(("client_id", &self.client_id));
                    form.push(("client_secret", secret));
                }
            }
            let body = Zeroizing::new(encode_form(&form));
            let uri = self.token_url.parse().map_err(|_| MintError::new(None, "token_url is not a URL"))?;
            let headers = mint_headers("application/x-www-form-urlencoded", extra);
            let (status, answer) =
                exchange(http, Method::POST, uri, headers, Bytes::copy_from_slice(body.as_bytes())).await?;
            token_answer(status, &answer, DEFAULT_LIFETIME)
        })
    }
}

/// `a=1&b=2`, form-encoded.
pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", utf8_percent_encode(k, FORM), utf8_percent_encode(v, FORM)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(fields: serde_json::Value) -> (Option<OAuth2Config>, Vec<(String, String)>) {
        let mut report = Vec::new();
        let fields = serde_json::from_value(fields).unwrap();
        let config = OAuth2Config::configure(fields, &mut Check::new("secrets.O", &mut report));
        (config, report)
    }

    #[test]
    fn fields_are_checked() {
        let (ok, report) = configure(serde_json::json!({
            "token_url": "https://auth.example/token", "client_id": "svc", "scope": ["a", "b"], "client_auth": "body"
        }));
        assert!(report.is_empty(), "{report:?}");
        let ok = ok.unwrap();
        assert_eq!((ok.scope.as_deref(), ok.client_auth), (Some("a b"), ClientAuth::Body));
        let (_, report) = configure(serde_json::json!({"token_url": "http://auth.example/token", "client_auth": "jwt"}));
        let fields: Vec<&str> = report.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["secrets.O.token_url", "secrets.O.client_id", "secrets.O.client_auth"]);
        assert!(report[0].1.contains("plain http"), "{report:?}");
        let (ok, _) = configure(serde_json::json!({"token_url": "http://127.0.0.1:9/token", "client_id": "x"}));
        assert_eq!(ok.unwrap().client_auth, ClientAuth::Basic);
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(encode_form(&[("a", "x y"), ("b", "p&q=r")]), "a=x%20y&b=p%26q%3Dr");
    }
}
