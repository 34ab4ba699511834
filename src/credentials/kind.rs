//! Credential kinds: what keyward does with a secret's value before it injects anything. A
//! `static` secret (the default) is injected as stored; a minted kind treats the stored value as
//! a root (an App private key, a client secret, a service-account key) and injects a short-lived
//! token minted from it. One module per kind owns its fields, their validation and its minting;
//! the `kinds!` macro defined here generates `KindConfig` from the list in `credentials/mod.rs`, one
//! line per kind (as `providers!` does for the secret providers). Shared helpers for the kinds
//! (the mint HTTP exchange, OAuth2 token answers, RS256 keys) and `keyward check`'s root check
//! live here too.
//!
//! A kind is configured in a `[secrets.NAME]` table, where NAME is a secret some source maps:
//! `kind = "github-app"` and the kind's own fields beside it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request};
use secrecy::SecretString;
use serde::de::DeserializeOwned;

use super::registry::Check;
pub(super) use super::registry::either;
use crate::forward::Forwarder;
pub use crate::policy::MintScope;
use crate::policy::Upstream;

/// What a kind module supplies: its config, its checks and its minting.
pub trait Kind: Sized + Clone + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// What a `[secrets.NAME]` table's `kind` names it.
    const KIND: &'static str;
    /// Whether the kind mints tokens (`mint`, through the mint cache). `false` for a kind that
    /// uses its root another way, such as signing each outbound request: the minter then leaves
    /// its secrets alone and the pipeline gets the resolved root.
    const MINTS: bool = true;
    /// Whether a grant's `repositories` and `permissions` narrow the tokens it mints.
    const GRANT_SCOPE: bool = false;
    /// Whether the root itself is sent anywhere (an OAuth2 client secret goes to the token
    /// endpoint). A root that only signs locally (a private key) never leaves keyward, so it is
    /// kept out of the response scrubber: a multi-kilobyte PEM in every base64 and escaped form
    /// would make the scrubber hold back kilobytes of every streamed answer.
    const ROOT_SENT: bool = false;
    /// The kind's fields as written (beside `kind`): a serde struct that refuses unknown ones.
    type Fields: DeserializeOwned;

    /// Checks `fields` and builds the kind's validated config; `None` when it cannot be used (the
    /// problems say why).
    fn configure(fields: Self::Fields, check: &mut Check<'_>) -> Option<Self>;

    /// Whether `root` (the secret's stored value) is a usable root for this kind: a PEM that
    /// parses and signs, a service-account key with its fields. Never quotes the value.
    fn check_root(&self, root: &SecretString) -> Result<(), String>;

    /// How long before a minted token's expiry keyward mints the next one.
    fn refresh_margin(&self) -> Duration {
        Duration::ZERO
    }

    /// Problems with a grant's scope for this kind, as (field below the grant, message).
    fn check_scope(scope: &MintScope) -> Vec<(String, String)> {
        let _ = scope;
        Vec::new()
    }

    /// Mints one token from `request.root` (only called when `MINTS`).
    fn mint<'a>(&'a self, http: &'a Forwarder, request: &'a MintRequest) -> BoxFuture<'a, Result<Minted, MintError>> {
        let _ = (http, request);
        Box::pin(async { Err(MintError::new(None, format!("kind '{}' does not mint tokens", Self::KIND))) })
    }
}

/// What one mint works from. Deliberately not `Debug`: it holds the root.
pub struct MintRequest {
    /// The secret's name, for messages.
    pub secret: String,
    /// The secret's stored value: the root the token is minted from.
    pub root: SecretString,
    /// The upstream of the route the call is for (a GitHub App mints on it).
    pub upstream: Upstream,
    /// What the grant narrows the token to.
    pub scope: Arc<MintScope>,
}

/// A minted token and when it expires. Deliberately not `Debug`.
pub struct Minted {
    pub token: SecretString,
    pub expires_at: SystemTime,
}

/// Why a mint failed: the mint endpoint's status where it answered, and a reason built from
/// names, statuses and positions only (never a body, a token or a key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintError {
    pub status: Option<u16>,
    pub reason: String,
}

impl MintError {
    pub fn new(status: Option<u16>, reason: impl Into<String>) -> MintError {
        MintError { status, reason: reason.into() }
    }
}

impl fmt::Display for MintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} (status {status})", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// Lists the kinds: declares each module, and generates `KindConfig` (one variant per kind) and
/// the dispatch from a `kind` name to the module that owns it.
macro_rules! kinds {
    ($($variant:ident => $module:ident::$config:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// A minted secret's validated kind settings: one variant per kind module.
        #[derive(Debug, Clone, PartialEq)]
        pub enum KindConfig {
            $($variant($module::$config),)*
        }

        impl KindConfig {
            /// What the `kind` field names it.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(KindConfig::$variant(_) => <$module::$config as $crate::credentials::kind::Kind>::KIND,)*
                }
            }

            /// Whether the kind mints tokens (see `Kind::MINTS`).
            pub fn mints(&self) -> bool {
                match self {
                    $(KindConfig::$variant(_) => <$module::$config as $crate::credentials::kind::Kind>::MINTS,)*
                }
            }

            /// Whether the root itself goes over the network (see `Kind::ROOT_SENT`).
            pub fn root_sent(&self) -> bool {
                match self {
                    $(KindConfig::$variant(_) => <$module::$config as $crate::credentials::kind::Kind>::ROOT_SENT,)*
                }
            }

            /// Whether grants may narrow its tokens (`repositories`, `permissions`).
            pub fn grant_scope(&self) -> bool {
                match self {
                    $(KindConfig::$variant(_) => <$module::$config as $crate::credentials::kind::Kind>::GRANT_SCOPE,)*
                }
            }

            pub fn check_root(&self, root: &secrecy::SecretString) -> Result<(), String> {
                match self {
                    $(KindConfig::$variant(config) => config.check_root(root),)*
                }
            }

            pub fn check_scope(&self, scope: &$crate::credentials::kind::MintScope) -> Vec<(String, String)> {
                match self {
                    $(KindConfig::$variant(_) => <$module::$config as $crate::credentials::kind::Kind>::check_scope(scope),)*
                }
            }

            pub fn refresh_margin(&self) -> std::time::Duration {
                match self {
                    $(KindConfig::$variant(config) => config.refresh_margin(),)*
                }
            }

            pub fn mint<'a>(
                &'a self,
                http: &'a $crate::forward::Forwarder,
                request: &'a $crate::credentials::kind::MintRequest,
            ) -> futures_util::future::BoxFuture<'a, Result<$crate::credentials::kind::Minted, $crate::credentials::kind::MintError>> {
                match self {
                    $(KindConfig::$variant(config) => config.mint(http, request),)*
                }
            }

            /// Validates a `[secrets.NAME]` table whose `kind` is `kind` (its other fields in
            /// `fields`). `Ok(None)`: the kind is known but its fields have problems; `Err` lists
            /// the known kinds.
            pub fn configure(
                kind: &str,
                fields: serde_json::Map<String, serde_json::Value>,
                check: &mut $crate::credentials::Check<'_>,
            ) -> Result<Option<KindConfig>, String> {
                $(if kind == <$module::$config as $crate::credentials::kind::Kind>::KIND {
                    let value = serde_json::Value::Object(fields);
                    return Ok(match serde_path_to_error::deserialize(value) {
                        Ok(own) => <$module::$config>::configure(own, check).map(KindConfig::$variant),
                        Err(e) => {
                            let field = e.path().to_string();
                            let field = if field == "." { "kind".to_string() } else { field };
                            check.problem(&field, $crate::credentials::kind::described(e.inner()));
                            None
                        }
                    });
                })*
                Err(format!("expected {}", $crate::credentials::kind::either(&[$crate::credentials::kind::STATIC, $(<$module::$config as $crate::credentials::kind::Kind>::KIND),*, $crate::credentials::sigv4::KIND])))
            }
        }
    };
}

pub(super) use kinds;

/// The longest keyward keeps a minted token, whatever its endpoint says (a day).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The kind of a secret injected as stored.
pub const STATIC: &str = "static";

/// A serde error about a kind's fields, without the value it quotes: a value pasted into the
/// wrong field could be a credential.
pub(crate) fn described(error: &serde_json::Error) -> String {
    let text = error.to_string();
    if let Some(unknown) = text.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
        // It quotes field names, which the user typed as names; the nearest known one helps.
        let expected: Vec<&str> = text.split('`').skip(3).step_by(2).collect();
        return match crate::suggest::suggest(unknown, expected.iter().copied()) {
            Some(near) => format!("{text} (did you mean `{near}`?)"),
            None => text,
        };
    }
    if text.starts_with("missing field") {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().expect("found above");
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find(quote) {
            Some(close) => {
                out.push('…');
                out.push(quote);
                rest = &rest[close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// A token endpoint URL: https, or http to a loopback host only.
pub fn check_endpoint(check: &mut Check<'_>, field: &str, url: &str) -> Option<http::Uri> {
    endpoint(url).map_err(|why| check.problem(field, why)).ok()
}

/// `url` as a token endpoint keyward may send a credential to: https, or http to a loopback
/// host only; the error says why not.
pub fn endpoint(url: &str) -> Result<http::Uri, String> {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Err(format!("'{url}' is not a URL"));
    };
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if crate::policy::is_loopback_host(host) => Ok(uri),
        Some("http") => Err(format!("'{url}' is plain http: use https (http is allowed to loopback hosts only)")),
        _ => Err(format!("'{url}' is not an https:// URL")),
    }
}

/// The most of a mint endpoint's answer keyward reads.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends a small request to a mint endpoint and reads its whole answer, bounded in size and by
/// the forward timeouts. The request's headers are marked sensitive by the caller.
pub async fn exchange(
    http: &Forwarder,
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(u16, Bytes), MintError> {
    use http_body_util::BodyExt;
    let mut request = Request::new(http_body_util::combinators::UnsyncBoxBody::new(
        http_body_util::Full::new(body).map_err(|never| match never {}),
    ));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let response = http.send(request, "(mint)").await.map_err(|e| {
        let what = match e {
            crate::error::ProxyError::UpstreamTimeout { .. } => "the mint endpoint timed out",
            _ => "the mint endpoint could not be reached",
        };
        MintError::new(None, what)
    })?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|_| MintError::new(Some(status), "the mint endpoint's answer broke off or is too large"))?
        .to_bytes();
    Ok((status, body))
}

/// Headers for a mint request: JSON accepted, keyward's user agent, and `extra` marked sensitive.
pub fn mint_headers(content_type: &str, extra: impl IntoIterator<Item = (http::HeaderName, HeaderValue)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(http::header::USER_AGENT, HeaderValue::from_static(concat!("keyward/", env!("CARGO_PKG_VERSION"))));
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    for (name, mut value) in extra {
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    headers
}

/// An OAuth2 token answer (RFC 6749 §5.1), as the oauth2 and gcp kinds read it. The token goes
/// straight into a `SecretString`; a parse error names a position, never the content.
pub fn token_answer(status: u16, body: &[u8], default_lifetime: Duration) -> Result<Minted, MintError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: Option<serde_json::Value>,
    }
    if !(200..300).contains(&status) {
        return Err(MintError::new(Some(status), "the token endpoint refused the request"));
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        MintError::new(
            Some(status),
            format!(
                "the token endpoint's answer is not a token (JSON with access_token; line {} column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    if answer.access_token.is_empty() {
        return Err(MintError::new(Some(status), "the token endpoint answered an empty access_token"));
    }
    // Some endpoints send `expires_in` as a string of digits.
    let lifetime = match answer.expires_in {
        None => default_lifetime,
        Some(serde_json::Value::Number(n)) => Duration::from_secs(n.as_u64().unwrap_or(0)),
        Some(serde_json::Value::String(s)) => Duration::from_secs(s.trim().parse().unwrap_or(0)),
        Some(_) => Duration::ZERO,
    };
    if lifetime.is_zero() {
        return Err(MintError::new(Some(status), "the token endpoint's expires_in is not a positive number"));
    }
    let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
    Ok(Minted { token: SecretString::from(answer.access_token), expires_at: SystemTime::now() + lifetime })
}

/// Seconds since the Unix epoch, for JWT claims.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The private key of a PEM for RS256 signing: parsed and test-signed, so a key that parses
/// but cannot sign is caught by `keyward check` too.
pub fn rsa_key(pem: &str) -> Result<jsonwebtoken::EncodingKey, String> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
        "is not an RSA private key in PEM form (BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY)".to_string()
    })?;
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    jsonwebtoken::encode(&header, &serde_json::json!({"check": true}), &key)
        .map_err(|_| "holds a PEM that cannot sign RS256 (an RSA key of at least 2048 bits is needed)".to_string())?;
    Ok(key)
}

/// What `keyward check` found about one minted secret's stored value (its root).
pub enum RootCheck {
    /// The root parses for its kind.
    Usable,
    /// The root does not suit its kind; the message never quotes it.
    Invalid(String),
    /// The root's source could not be read now, so it was not checked.
    Unchecked(String),
}

/// Reads each minted secret's root from its source and checks that it suits its kind (a PEM that
/// parses and signs, a service-account key with its fields), for `keyward check`.
pub async fn check_roots(
    sources: &[super::SourceConfig],
    kinds: &std::collections::BTreeMap<String, super::KindConfig>,
) -> Vec<(String, RootCheck)> {
    let store = super::SecretStore::new(sources, Arc::new(crate::metrics::Metrics::new()));
    // As when serving: private keys stay out of the scrubber.
    let _minter = store.minter(kinds);
    let mut out = Vec::new();
    for (name, kind) in kinds {
        let read = tokio::time::timeout(Duration::from_secs(15), store.resolve(name)).await;
        let found = match read {
            Ok(Ok(root)) => match kind.check_root(&root.value) {
                Ok(()) => RootCheck::Usable,
                Err(why) => RootCheck::Invalid(format!("the value of secret '{name}' {why}")),
            },
            Ok(Err(error)) => RootCheck::Unchecked(error.message()),
            Err(_) => RootCheck::Unchecked("its source did not answer within 15 s".to_string()),
        };
        out.push((name.to_string(), found));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_are_read_without_echoing_them() {
        let minted = token_answer(200, br#"{"access_token":"tok-1234567890","expires_in":3599}"#, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
        let left = minted.expires_at.duration_since(SystemTime::now()).unwrap().as_secs();
        assert!((3590..=3599).contains(&left), "{left}");
        let as_string =
            token_answer(200, br#"{"access_token":"tok-1234567890","expires_in":"60"}"#, Duration::ZERO).unwrap();
        assert!(as_string.expires_at > SystemTime::now());
        let refused = token_answer(401, br#"{"error":"invalid_client","secret":"sk-canary"}"#, Duration::ZERO);
        assert_eq!(refused.err().unwrap().status, Some(401));
        let garbled = token_answer(200, br#"{"access_token": 5, "leak":"sk-canary-xyz"}"#, Duration::ZERO);
        let error = garbled.err().unwrap().to_string();
        assert!(!error.contains("canary") && error.contains("line 1"), "{error}");
        let no_expiry = token_answer(200, br#"{"access_token":"tok-1234567890"}"#, Duration::from_secs(300)).unwrap();
        assert!(no_expiry.expires_at > SystemTime::now() + Duration::from_secs(290));
        let forever =
            token_answer(200, br#"{"access_token":"tok-1234567890","expires_in":9300000000000000000}"#, Duration::ZERO)
                .unwrap();
        assert!(forever.expires_at <= SystemTime::now() + MAX_TOKEN_LIFETIME, "capped, no overflow");
        let zero = token_answer(200, br#"{"access_token":"tok-1234567890","expires_in":0}"#, Duration::ZERO);
        assert!(zero.is_err());
    }

    #[test]
    fn field_errors_do_not_quote_values() {
        let error = serde_json::from_str::<u64>("\"sk-canary-pasted\"").unwrap_err();
        let text = described(&error);
        assert!(!text.contains("canary"), "{text}");
        assert_eq!(text, "invalid type: string \"…\", expected u64 at line 1 column 18");
    }

    #[test]
    fn unknown_kinds_list_the_known_ones() {
        let mut report: Vec<(String, String)> = Vec::new();
        let error = crate::credentials::KindConfig::configure(
            "kerberos",
            serde_json::Map::new(),
            &mut Check::new("secrets.K", &mut report),
        );
        assert_eq!(
            error.unwrap_err(),
            "expected 'static', 'github-app', 'oauth2-client-credentials', 'gcp-service-account' or 'aws-sigv4'"
        );
    }
}
