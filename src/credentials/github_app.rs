//! The `github-app` kind: the secret is a GitHub App's private key (PEM). keyward signs an RS256
//! App JWT and asks the route's upstream for an installation token narrowed to the grant's
//! `repositories` and `permissions` (`POST /app/installations/{id}/access_tokens`).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, Method};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::kind::{Kind, MintError, MintRequest, MintScope, Minted, exchange, mint_headers, rsa_key, unix_now};
use super::registry::Check;
use crate::forward::Forwarder;

/// How far in the past `iat` is set, against clock drift (GitHub's advice).
const IAT_BACKDATE_SECS: u64 = 60;
/// How far ahead `exp` is set: GitHub refuses more than 10 minutes; `exp - iat` stays at 10.
const EXP_AHEAD_SECS: u64 = 540;
/// Installation tokens are re-minted this long before `expires_at` by default.
const DEFAULT_MARGIN: Duration = Duration::from_secs(300);
const API_VERSION: &str = "2022-11-28";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubAppFields {
    /// The App's id (a number) or its client id (`Iv1.…`): the JWT's `iss`.
    app_id: Option<serde_json::Value>,
    installation_id: Option<u64>,
    /// The account the App is installed on, when `installation_id` is not given.
    owner: Option<String>,
    refresh_margin_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installation {
    Id(u64),
    /// Looked up on each mint: `GET /orgs/{owner}/installation`, then `/users/{owner}/installation`.
    Owner(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubAppConfig {
    pub app_id: String,
    pub installation: Installation,
    pub refresh_margin: Duration,
}

impl Kind for GithubAppConfig {
    const KIND: &'static str = "github-app";
    const GRANT_SCOPE: bool = true;
    type Fields = GithubAppFields;

    fn configure(fields: GithubAppFields, check: &mut Check<'_>) -> Option<GithubAppConfig> {
        let app_id = match fields.app_id {
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => Some(n.to_string()),
            Some(serde_json::Value::String(s))
                if !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') =>
            {
                Some(s)
            }
            Some(_) => {
                check.problem("app_id", "must be the App's id (a number) or its client id (like \"Iv1.abc123\")");
                None
            }
            None => {
                check.problem("app_id", "is required for kind 'github-app': the App's id");
                None
            }
        };
        let installation = match (fields.installation_id, fields.owner) {
            (Some(_), Some(_)) => {
                check.problem("owner", "give installation_id or owner, not both");
                None
            }
            (Some(0), None) => {
                check.problem("installation_id", "must be a positive number");
                None
            }
            (Some(id), None) => Some(Installation::Id(id)),
            (None, Some(owner)) if valid_owner(&owner) => Some(Installation::Owner(owner)),
            (None, Some(owner)) => {
                check.problem("owner", format!("'{owner}' is not a GitHub account name"));
                None
            }
            (None, None) => {
                check.problem(
                    "installation_id",
                    "is required for kind 'github-app' (or `owner`, to look the installation up)",
                );
                None
            }
        };
        let refresh_margin = fields.refresh_margin_seconds.map_or(DEFAULT_MARGIN, Duration::from_secs);
        if refresh_margin >= Duration::from_secs(3600) {
            check.problem("refresh_margin_seconds", "must be less than 3600 (installation tokens live one hour)");
        }
        Some(GithubAppConfig { app_id: app_id?, installation: installation?, refresh_margin })
    }

    fn check_root(&self, root: &SecretString) -> Result<(), String> {
        rsa_key(root.expose_secret()).map(|_| ())
    }

    fn refresh_margin(&self) -> Duration {
        self.refresh_margin
    }

    fn check_scope(scope: &MintScope) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, repository) in scope.repositories.iter().enumerate() {
            if !valid_repository(repository) {
                problems.push((
                    format!("repositories[{i}]"),
                    format!("'{repository}' is not a repository name (the name alone, without its owner)"),
                ));
            }
        }
        for (name, level) in &scope.permissions {
            if let Err(why) = check_permission(name, level) {
                problems.push((format!("permissions.{name}"), why));
            }
        }
        problems
    }

    fn mint<'a>(&'a self, http: &'a Forwarder, request: &'a MintRequest) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move {
            let key = rsa_key(request.root.expose_secret())
                .map_err(|why| MintError::new(None, format!("the App private key '{}' {why}", request.secret)))?;
            let jwt = app_jwt(&key, &self.app_id, unix_now())
                .map_err(|_| MintError::new(None, "the App JWT could not be signed"))?;
            let bearer = Zeroizing::new(format!("Bearer {}", jwt.expose_secret()));
            let bearer = HeaderValue::from_str(&bearer).map_err(|_| MintError::new(None, "the App JWT is not a header"))?;
            let installation = match &self.installation {
                Installation::Id(id) => *id,
                Installation::Owner(owner) => find_installation(http, request, owner, &bearer).await?,
            };
            let path = format!("/app/installations/{installation}/access_tokens");
            let body = scope_body(&request.scope);
            let (status, answer) = exchange(
                http,
                Method::POST,
                uri(request, &path)?,
                github_headers(&bearer, "application/json"),
                Bytes::from(body),
            )
            .await?;
            if !(200..300).contains(&status) {
                return Err(MintError::new(
                    Some(status),
                    format!("GitHub refused an installation token for installation {installation}"),
                ));
            }
            installation_token(status, &answer)
        })
    }
}

/// Signs the App JWT: RS256, `iat` 60 s in the past, `exp` 9 minutes ahead, `iss` the App id.
pub fn app_jwt(key: &jsonwebtoken::EncodingKey, app_id: &str, now: u64) -> Result<SecretString, String> {
    #[derive(serde::Serialize)]
    struct Claims {
        iat: u64,
        exp: u64,
        iss: serde_json::Value,
    }
    // A numeric App id goes as the number GitHub documents; a client id as its string.
    let iss = app_id.parse::<u64>().map_or_else(|_| serde_json::Value::from(app_id), serde_json::Value::from);
    let claims = Claims { iat: now.saturating_sub(IAT_BACKDATE_SECS), exp: now + EXP_AHEAD_SECS, iss };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    jsonwebtoken::encode(&header, &claims, key).map(SecretString::from).map_err(|_| "signing failed".to_string())
}

/// The `access_tokens` request body: the grant's repositories and permissions, or `{}` for the
/// installation's own.
fn scope_body(scope: &MintScope) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    if !scope.repositories.is_empty() {
        body.insert("repositories".into(), serde_json::json!(scope.repositories));
    }
    if !scope.permissions.is_empty() {
        body.insert("permissions".into(), serde_json::json!(scope.permissions));
    }
    serde_json::Value::Object(body).to_string().into_bytes()
}

fn github_headers(bearer: &HeaderValue, content_type: &str) -> http::HeaderMap {
    let mut headers = mint_headers(content_type, [(http::header::AUTHORIZATION, bearer.clone())]);
    headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/vnd.github+json"));
    headers.insert(HeaderName::from_static("x-github-api-version"), HeaderValue::from_static(API_VERSION));
    headers
}

fn uri(request: &MintRequest, path: &str) -> Result<http::Uri, MintError> {
    request.upstream.uri(path, None)
        .map_err(|_| MintError::new(None, "the route's upstream gives no valid mint URL"))
}

/// The installation of the App on `owner`: as an organization, else as a user.
async fn find_installation(
    http: &Forwarder,
    request: &MintRequest,
    owner: &str,
    bearer: &HeaderValue,
) -> Result<u64, MintError> {
    #[derive(Deserialize)]
    struct Found {
        id: u64,
    }
    let mut last = 404;
    for account in ["orgs", "users"] {
        let path = format!("/{account}/{owner}/installation");
        let (status, answer) =
            exchange(http, Method::GET, uri(request, &path)?, github_headers(bearer, "application/json"), Bytes::new())
                .await?;
        if status == 404 {
            last = status;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(MintError::new(Some(status), format!("GitHub refused the installation lookup for '{owner}'")));
        }
        let found: Found = serde_json::from_slice(&answer)
            .map_err(|_| MintError::new(Some(status), "GitHub's installation answer has no numeric id"))?;
        return Ok(found.id);
    }
    Err(MintError::new(Some(last), format!("the App is not installed on '{owner}'")))
}

/// GitHub's `{token, expires_at}` answer.
fn installation_token(status: u16, answer: &[u8]) -> Result<Minted, MintError> {
    #[derive(Deserialize)]
    struct Answer {
        token: String,
        expires_at: String,
    }
    let answer: Answer = serde_json::from_slice(answer).map_err(|e| {
        MintError::new(
            Some(status),
            format!("GitHub's answer has no token and expires_at (line {} column {})", e.line(), e.column()),
        )
    })?;
    let expires_at = chrono::DateTime::parse_from_rfc3339(&answer.expires_at)
        .map_err(|_| MintError::new(Some(status), "GitHub's expires_at is not an RFC 3339 time"))?;
    let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(expires_at.timestamp().max(0) as u64);
    if answer.token.is_empty() {
        return Err(MintError::new(Some(status), "GitHub answered an empty token"));
    }
    Ok(Minted { token: SecretString::from(answer.token), expires_at })
}

/// A GitHub account name: letters, digits and single hyphens, up to 39 characters.
fn valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= 39
        && owner.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !owner.starts_with('-')
}

/// A repository name as GitHub's `repositories` takes it (no owner): letters, digits, `.`, `-`, `_`.
pub fn valid_repository(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A permission as GitHub names them (`contents`, `pull_requests`) with `read`, `write` or `admin`.
pub fn check_permission(name: &str, level: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(format!("'{name}' is not a GitHub App permission name (like contents or pull_requests)"));
    }
    if !matches!(level, "read" | "write" | "admin") {
        return Err(format!("'{level}' must be read, write or admin"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(fields: serde_json::Value) -> (Option<GithubAppConfig>, Vec<(String, String)>) {
        let mut report = Vec::new();
        let fields = serde_json::from_value(fields).unwrap();
        let config = GithubAppConfig::configure(fields, &mut Check::new("secrets.GH", &mut report));
        (config, report)
    }

    #[test]
    fn fields_are_checked() {
        let (ok, report) = configure(serde_json::json!({"app_id": 12345, "installation_id": 678}));
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(ok.unwrap().installation, Installation::Id(678));
        let (ok, _) = configure(serde_json::json!({"app_id": "Iv1.abc123", "owner": "octo-org"}));
        assert_eq!(ok.unwrap().installation, Installation::Owner("octo-org".into()));
        let (none, report) = configure(serde_json::json!({"app_id": -3, "owner": "bad owner!"}));
        assert!(none.is_none());
        assert_eq!(
            report,
            [
                (
                    "secrets.GH.app_id".to_string(),
                    "must be the App's id (a number) or its client id (like \"Iv1.abc123\")".to_string()
                ),
                ("secrets.GH.owner".to_string(), "'bad owner!' is not a GitHub account name".to_string()),
            ]
        );
        let (_, report) = configure(serde_json::json!({"app_id": 1}));
        assert_eq!(report[0].0, "secrets.GH.installation_id");
        let (_, report) = configure(serde_json::json!({"app_id": 1, "installation_id": 2, "owner": "o"}));
        assert_eq!(report[0].1, "give installation_id or owner, not both");
    }

    #[test]
    fn scopes_and_names() {
        assert!(valid_repository("keyward") && valid_repository("my.repo-2_x"));
        assert!(!valid_repository("octo/keyward") && !valid_repository("..") && !valid_repository(""));
        assert!(check_permission("pull_requests", "write").is_ok());
        assert!(check_permission("Contents", "read").is_err());
        assert_eq!(check_permission("contents", "all").unwrap_err(), "'all' must be read, write or admin");
        let scope = MintScope {
            repositories: vec!["a".into()],
            permissions: [("contents".to_string(), "read".to_string())].into(),
        };
        assert_eq!(String::from_utf8(scope_body(&scope)).unwrap(), r#"{"permissions":{"contents":"read"},"repositories":["a"]}"#);
        assert_eq!(scope_body(&MintScope::default()), b"{}");
    }

    #[test]
    fn the_app_jwt_has_githubs_claims() {
        let key = rsa_key(include_str!("../../tests/keys/test-rsa-2048.pem")).unwrap();
        let jwt = app_jwt(&key, "12345", 1_900_000_000).unwrap();
        let payload = jwt.expose_secret().split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims, serde_json::json!({"iat": 1_899_999_940u64, "exp": 1_900_000_540u64, "iss": 12345}));
        let by_client_id = app_jwt(&key, "Iv1.abc", 1).unwrap();
        let payload = by_client_id.expose_secret().split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["iss"], "Iv1.abc");
    }

    #[test]
    fn installation_tokens_are_read() {
        let minted = installation_token(201, br#"{"token":"ghs_x","expires_at":"2030-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(minted.expires_at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_893_456_000);
        let bad = installation_token(201, br#"{"token":"ghs_canary","expires_at":"soon"}"#).err().unwrap();
        assert!(!bad.to_string().contains("canary"));
    }
}
